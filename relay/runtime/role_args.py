"""How many role processes the supervisor starts, and what it tells each on its command line (``serve --role ...``).

Kept apart from :mod:`relay.runtime.roles` (which runs a role and so imports the whole relay) so that the
supervisor, which only starts children, does not load what only they use.
"""

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
    """What the supervisor tells a child on its command line."""

    role: Role
    index: int
    state: Path  # the shared state directory
    wake: str  # the wake-up socket names' common part
    deliveries: int  # how many delivery processes to wake
    parent: int  # the supervisor's pid
    fds: tuple[tuple[str, int], ...] = ()  # (FileDescriptorName, descriptor) of the passed listening sockets
    generation: int = 1  # the validated configuration to run (relay.runtime.snapshot)

    def argv(self) -> list[str]:
        """The ``serve`` options that carry these values (see :func:`parse_role`)."""
        fds = ",".join(f"{name}={fd}" for name, fd in self.fds)
        return ["--role", f"{self.role}.{self.index}", "--role-state", str(self.state), "--role-wake", self.wake,
                "--role-deliveries", str(self.deliveries), "--role-parent", str(self.parent),
                "--role-generation", str(self.generation), *(["--role-fds", fds] if fds else [])]


def parse_role(role: str, state: str, wake: str, deliveries: int, parent: int, fds: str | None,
               generation: int = 1) -> RoleArgs:
    """The inverse of :meth:`RoleArgs.argv`."""
    name, _, index = role.partition(".")
    if name not in ROLES or not index.isdigit():
        raise ValueError(f"--role must be ingest.N or delivery.N, not {role!r}")
    pairs = tuple((n, int(fd)) for n, _, fd in (item.partition("=") for item in (fds or "").split(",") if item))
    return RoleArgs(ROLES[ROLES.index(name)], int(index), Path(state), wake, deliveries, parent, pairs, generation)


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
