"""How many role processes the supervisor starts, and what it hands each (:func:`relay.runtime.roles.serve_role`)."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from relay.config.model import Processes

Role = Literal["ingest", "delivery"]
ROLES: tuple[Role, ...] = ("ingest", "delivery")
# Sent to the delivery processes once every process took a reload: release what waited on the old configuration.
RELEASE_SIGNAL = signal.SIGUSR2


@dataclass(frozen=True)
class RoleArgs:
    """What the supervisor hands a child it forks."""

    role: Role
    index: int
    state: Path  # the shared state directory
    wake: str  # the wake-up socket names' common part
    deliveries: int  # how many delivery processes to wake
    parent: int  # the supervisor's pid
    fds: tuple[tuple[str, int], ...] = ()  # (FileDescriptorName, descriptor) of the passed listening sockets
    generation: int = 1  # the validated configuration to run (relay.runtime.snapshot)


@dataclass(frozen=True)
class Counts:
    ingest: int
    delivery: int


def plan_counts(settings: Processes, backend: str, cpus: int | None = None) -> Counts:
    """``auto``: a quarter of the CPUs take webhooks (at least one), the rest deliver (at least one).

    Delivery (TLS, HTTP/2, JSON per push) costs several times what storing a webhook costs, hence the
    split. On SQLite, which has one writer at a time, more than two delivery processes only queue for the
    write lock, so ``auto`` stops there; Redis takes as many as there are CPUs.
    """
    cpus = cpus or len(os.sched_getaffinity(0))
    ingest = settings.ingest or max(1, cpus // 4)
    delivery = settings.delivery or max(1, cpus - ingest)
    if settings.delivery is None and backend == "sqlite":
        delivery = min(delivery, 2)
    return Counts(ingest, delivery)
