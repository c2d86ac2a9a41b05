"""One role of a multi-process relay, in a child the supervisor started (``serve --role ...``).

* ``ingest``: the webhook listener (and the API, health and metrics endpoints) on the listening sockets the
  supervisor passed down; after each accepted webhook it wakes the delivery processes (:mod:`waker`).
* ``delivery``: no listener; recovers what a dead process had claimed, then claims, translates, sends and
  records. Its app alarms go to the shared state directory, where ``/readyz`` of the ingest processes
  reads them.

A child speaks ``sd_notify`` to the supervisor (its ``$NOTIFY_SOCKET``), exactly as a single relay speaks to
systemd, and dies with the supervisor (``PR_SET_PDEATHSIG``): a killed supervisor leaves no orphan.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import signal
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from aiohttp import web

from relay.config import Config
from relay.delivery.health import AppHealth
from relay.observability import name_process
from relay.running import RELAY_KEY, Relay
from relay.runtime.service import Plan, serve
from relay.runtime.shared import SharedState
from relay.runtime.systemd import ListenSocket
from relay.runtime.waker import WakeReceiver, WakeSender

Role = Literal["ingest", "delivery"]
ROLES: tuple[Role, ...] = ("ingest", "delivery")
PUBLISH_EVERY = 0.25  # seconds between looks at this process's alarms and commit count
_PR_SET_PDEATHSIG = 1  # prctl(2)


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

    def argv(self) -> list[str]:
        """The ``serve`` options that carry these values (see :func:`parse_role`)."""
        fds = ",".join(f"{name}={fd}" for name, fd in self.fds)
        return ["--role", f"{self.role}.{self.index}", "--role-state", str(self.state), "--role-wake", self.wake,
                "--role-deliveries", str(self.deliveries), "--role-parent", str(self.parent),
                *(["--role-fds", fds] if fds else [])]


def parse_role(role: str, state: str, wake: str, deliveries: int, parent: int, fds: str | None) -> RoleArgs:
    """The inverse of :meth:`RoleArgs.argv`."""
    name, _, index = role.partition(".")
    if name not in ROLES or not index.isdigit():
        raise ValueError(f"--role must be ingest.N or delivery.N, not {role!r}")
    pairs = tuple((n, int(fd)) for n, _, fd in (item.partition("=") for item in (fds or "").split(",") if item))
    return RoleArgs(ROLES[ROLES.index(name)], int(index), Path(state), wake, deliveries, parent, pairs)


async def run_role(config: Config, args: RoleArgs) -> None:
    """Serve one role until ``SIGTERM`` (the supervisor forwards it), then drain and return."""
    _die_with_parent(args.parent)
    name_process(f"{args.role}.{args.index}")
    shared = SharedState(args.state)

    def merged_health(app: web.Application) -> None:  # /status and STATUS=: every delivery process's view
        app[RELAY_KEY].peer_health = shared.app_health

    counting = [] if (args.role, args.index) == ("ingest", 0) else [_reloads_uncounted]
    if args.role == "ingest":
        sender = WakeSender(args.wake, args.deliveries)
        sockets = [_adopt(name, fd) for name, fd in args.fds]

        def wake_on_accept(app: web.Application) -> None:
            app.middlewares.append(sender.middleware(config.webhook.path))
            app.cleanup_ctx.append(_publishing(shared, None))

        plan = Plan(listen=True, deliver=False, sockets=sockets, prepare=[wake_on_accept, merged_health, *counting],
                    ready_problems=shared.problems)
        try:
            await serve(config, plan=plan)
        finally:
            sender.close()
    else:
        def woken(app: web.Application) -> None:
            app.cleanup_ctx.append(_woken_ctx(args))
            app.cleanup_ctx.append(_publishing(shared, args.index))

        await serve(config, plan=Plan(listen=False, deliver=True, sockets=[],
                                      prepare=[woken, merged_health, *counting]))


class _Uncounted:
    """Stands in for the reloads counter in every process but ``ingest.0``: a reload of the service is one
    reload in ``parley_relay_reloads_total``, not one per process."""

    def labels(self, *values: str) -> _Uncounted:
        return self

    def inc(self, amount: float = 1) -> None:
        return None


def _reloads_uncounted(app: web.Application) -> None:
    app[RELAY_KEY].metrics.reloads = _Uncounted()  # type: ignore[assignment]


def _adopt(name: str, fd: int) -> ListenSocket:
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return ListenSocket(name, sock)


def _die_with_parent(parent: int) -> None:
    """SIGTERM (a drain) when the supervisor dies, however it dies; and now if it is already gone."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)


def _woken_ctx(args: RoleArgs) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        relay = app[RELAY_KEY]
        receiver = WakeReceiver(args.wake, args.index, lambda: _wake(relay))
        yield
        receiver.close()

    return ctx


def _wake(relay: Relay) -> None:
    if relay.dispatcher is not None:
        relay.dispatcher.wake()


def _publishing(shared: SharedState, index: int | None) -> Callable[[web.Application], AsyncIterator[None]]:
    """Keeps what other processes read about this one current: a delivery process's alarms (``index``), and
    the store commit count every process adds to ``/metrics``."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        relay = app[RELAY_KEY]
        task = asyncio.get_running_loop().create_task(_publish(relay, shared, index))
        yield
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if index is not None:
            shared.write_alarms(index, {})  # this process stops: its alarms go with it
            shared.write_health(index, {})

    return ctx


async def _publish(relay: Relay, shared: SharedState, index: int | None) -> None:
    written: dict[str, str] | None = None
    published: dict[str, AppHealth] | None = None
    while True:
        if index is not None:
            alarms = dict(relay.dispatcher.alarms) if relay.dispatcher is not None else {}
            if alarms != written:
                shared.write_alarms(index, alarms)
                written = alarms
            states = relay.own_health()
            if states != published:
                shared.write_health(index, states)
                published = states
        commits = getattr(relay.store, "commits", None)
        if commits is not None:
            relay.metrics.store_commits.set(commits)
        await asyncio.sleep(PUBLISH_EVERY)
