"""One role of a multi-process relay, in a child the supervisor forked (:func:`serve_role`).

* ``ingest``: the webhook listener (and the API, health and metrics endpoints) on the listening sockets the
  supervisor passed down; after each accepted webhook it wakes the delivery processes (:mod:`waker`).
* ``delivery``: no listener; recovers what a dead process had claimed, then claims, translates, sends and
  records. Its app alarms go to the shared state directory, where the supervisor's ``STATUS=`` line (and
  the status endpoint) read them; they never make ``/readyz`` fail. A webhook process builds no provider.

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
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path

from aiohttp import web

from relay.config import Config
from relay.delivery.health import AppHealth
from relay.errors import ConfigError, RelayError
from relay.observability import name_process, setup_logging
from relay.running import RELAY_KEY, Relay
from relay.runtime import snapshot
from relay.runtime.loop import run
from relay.runtime.relay import release_waiting
from relay.runtime.role_args import RELEASE_SIGNAL, ROLES, RoleArgs
from relay.runtime.service import Plan, serve
from relay.runtime.shared import SharedState
from relay.runtime.systemd import ListenSocket
from relay.runtime.waker import WakeReceiver, WakeSender

PUBLISH_EVERY = 0.25  # seconds between looks at this process's alarms and commit count
SUCCESS_RESOLUTION = 1.0  # seconds: a published last success is at most this much older than the real one
_PR_SET_PDEATHSIG = 1  # prctl(2)


def serve_role(source: Path, args: RoleArgs) -> int:
    """A role process from start to exit: the configuration the supervisor validated (``args.generation`` of
    ``source``) and its log settings, then :func:`run_role`; the exit status (1, said on stderr as by
    ``parley-relay``, when the configuration or a part of the relay cannot be loaded)."""
    try:
        config = snapshot.load(args.state, args.generation, source)
        setup_logging(config.logging.format, config.logging.level)
        run(run_role(config, args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    except RelayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


async def run_role(config: Config, args: RoleArgs) -> None:
    """Serve one role until ``SIGTERM`` (the supervisor forwards it), then drain and return."""
    _die_with_parent(args.parent)
    name_process(f"{args.role}.{args.index}")
    shared = SharedState(args.state)

    def merged_health(app: web.Application) -> None:  # /status and STATUS=: every delivery process's view
        app[RELAY_KEY].peer_health = shared.app_health

    counting = [_counting_service_reloads(shared) if (args.role, args.index) == ("ingest", 0) else _reloads_uncounted]

    def validated() -> Config:  # a reload takes what the supervisor validated and published, never the file
        return snapshot.load(args.state, snapshot.latest(args.state), config.source)

    if args.role == "ingest":
        sender = WakeSender(args.wake, args.deliveries)
        sockets = [_adopt(name, fd) for name, fd in args.fds]

        def wake_on_accept(app: web.Application) -> None:
            app.middlewares.append(sender.middleware(config.webhook.path))
            app.cleanup_ctx.append(_publishing(shared, None))

        plan = Plan(listen=True, deliver=False, sockets=sockets, prepare=[wake_on_accept, merged_health, *counting],
                    ready_problems=shared.problems, load=validated, release_on_reload=False)
        try:
            await serve(config, plan=plan)
        finally:
            sender.close()
    else:
        def woken(app: web.Application) -> None:
            app.cleanup_ctx.append(_woken_ctx(args))
            app.cleanup_ctx.append(_release_ctx)
            app.cleanup_ctx.append(_publishing(shared, args.index))

        await serve(config, plan=Plan(listen=False, deliver=True, sockets=[],
                                      prepare=[woken, merged_health, *counting], load=validated,
                                      release_on_reload=False))


class _Uncounted:
    """Stands in for the reloads counter in every role process: a reload of the service is one reload in
    ``parley_relay_reloads_total``, not one per process, and the supervisor's outcome is what counts (it
    may reject the files before any process sees them, or report a partial reload)."""

    def labels(self, *values: str) -> _Uncounted:
        return self

    def inc(self, amount: float = 1) -> None:
        return None


def _reloads_uncounted(app: web.Application) -> None:
    app[RELAY_KEY].metrics.reloads = _Uncounted()  # type: ignore[assignment]


def _counting_service_reloads(shared: SharedState) -> Callable[[web.Application], None]:
    """``ingest.0`` counts the service's reloads (ok, rejected, partial) from the supervisor's outcomes."""

    def prepare(app: web.Application) -> None:
        counter = app[RELAY_KEY].metrics.reloads
        _reloads_uncounted(app)

        async def count() -> None:
            last = shared.last_reload()
            counted = dict(last.counts) if last is not None else {}
            while True:
                await asyncio.sleep(PUBLISH_EVERY)
                outcome = shared.last_reload()
                for result, total in (outcome.counts if outcome is not None else {}).items():
                    if total > counted.get(result, 0):
                        counter.labels(result).inc(total - counted.get(result, 0))
                        counted[result] = total

        async def ctx(app: web.Application) -> AsyncIterator[None]:
            task = asyncio.get_running_loop().create_task(count())
            yield
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        app.cleanup_ctx.append(ctx)

    return prepare


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


async def _release_ctx(app: web.Application) -> AsyncIterator[None]:
    """``SIGUSR2`` from the supervisor, once every process took a reload: release what waited on the old
    configuration (:func:`~relay.runtime.relay.release_waiting`)."""
    relay = app[RELAY_KEY]
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[int]] = set()

    def release() -> None:
        task = loop.create_task(release_waiting(relay))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    loop.add_signal_handler(RELEASE_SIGNAL, release)
    yield
    loop.remove_signal_handler(RELEASE_SIGNAL)
    await asyncio.gather(*tasks, return_exceptions=True)


def _wake(relay: Relay) -> None:
    if relay.dispatcher is not None:
        relay.dispatcher.wake()


def _health_moved(published: dict[str, AppHealth], states: dict[str, AppHealth]) -> bool:
    """Whether the published health is out of date: a circuit, alarm or reason changed, or an app's last success
    moved by SUCCESS_RESOLUTION. Under traffic the last success changes with every push; writing the file at
    each look (4 a second) cost the delivery loop more than anything but the sends in a saturated profile."""
    if published.keys() != states.keys():
        return True
    for app, state in states.items():
        old = published[app]
        if replace(old, last_success=state.last_success) != state:
            return True
        if (old.last_success is None) != (state.last_success is None) or (
                state.last_success is not None and old.last_success is not None
                and abs(state.last_success - old.last_success) >= SUCCESS_RESOLUTION):
            return True
    return False


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
            if published is None or _health_moved(published, states):
                shared.write_health(index, states)
                published = states
        else:  # a webhook process answers /metrics: the processes the supervisor reports down, by role
            down = [d.role for d in shared.down()]
            for role in ROLES:
                relay.metrics.role_down.labels(role).set(down.count(role))
        commits = getattr(relay.store, "commits", None)
        if commits is not None:
            relay.metrics.store_commits.set(commits)
        await asyncio.sleep(PUBLISH_EVERY)
