"""Running the relay as a long-lived service: listeners, signals, systemd notifications, drain.

Start: the store is opened and every app's credentials are loaded (``AppRunner.setup``), then the listeners
come up, then ``READY=1``. ``SIGHUP`` reloads (the old configuration stays on any error). ``SIGTERM`` and
``SIGINT`` drain: ``STOPPING=1``, stop accepting (under socket activation the kernel queues new connections
for the next process), finish in-flight requests and then in-flight sends, all within one
``shutdown_timeout``, leave everything else stored, return (exit 0).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from relay import __version__
from relay.config import Config, Listen
from relay.delivery.health import summary_line
from relay.errors import ConfigError, ConfigProblem, StoreError
from relay.http.app import create_ops_app, runner_options
from relay.http.errors import Handler
from relay.http.ops import SHARED_PROBLEMS_KEY
from relay.observability import event
from relay.outcome import EndState
from relay.running import RELAY_KEY, Relay
from relay.runtime.relay import ConfigLoader, create_app, remaining, try_reload
from relay.runtime.shared import RUNTIME_ENV, SharedState, state_dir
from relay.runtime.systemd import ListenSocket, Notifier, describe, inherited_sockets

# After the listeners close, a connection accepted a moment earlier may not have sent its request yet:
# give it this long to arrive (and so count as in flight) before idle connections are closed.
ACCEPT_GRACE = 0.2
HEALTH_LOOK_EVERY = 0.5  # seconds between looks at the apps' circuits for a changed STATUS= line
METRICS_FD_NAME = "metrics"  # FileDescriptorName= of an optional second .socket for /metrics


class _InFlight:
    """Counts requests whose handler runs, so the drain can wait for them *before* aiohttp closes the
    connections (once closed, aiohttp drops the rest of a body still arriving)."""

    def __init__(self) -> None:
        self.count = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.count += 1
        self._idle.clear()
        try:
            return await handler(request)
        finally:
            self.count -= 1
            if self.count == 0:
                self._idle.set()

    async def wait(self, seconds: float) -> bool:
        """True when every in-flight request finished within ``seconds``."""
        try:
            await asyncio.wait_for(self._idle.wait(), seconds)
        except TimeoutError:
            return False
        return True


@dataclass
class _Listeners:
    """The runners and sites of the webhook listener and the optional metrics listener."""

    runners: list[web.AppRunner] = field(default_factory=list)
    sites: list[web.BaseSite] = field(default_factory=list)
    in_flight: _InFlight = field(default_factory=_InFlight)

    def addresses(self) -> str:
        found = []
        for site in self.sites:
            server = getattr(site, "_server", None)  # aiohttp keeps the asyncio Server private
            found += [describe(s) for s in (getattr(server, "sockets", None) or [])]
        return ", ".join(found) or "-"

    async def stop_accepting(self) -> None:
        for site in self.sites:
            await site.stop()
        self.sites.clear()

    async def cleanup(self) -> None:
        # The ops runner first: the main runner's cleanup closes the store the ops handlers read.
        for runner in reversed(self.runners):
            await runner.cleanup()


@dataclass
class Plan:
    """What this process runs: everything (one process, the default of :func:`serve`), or one role of a
    multi-process relay (:mod:`relay.runtime.roles` fills it in)."""

    listen: bool = True  # serve HTTP (webhooks, API, health, metrics)
    deliver: bool = True  # run the dispatcher
    sockets: list[ListenSocket] | None = None  # listening sockets handed over; None = socket activation or bind
    prepare: list[Callable[[web.Application], None]] = field(default_factory=list)  # before start: middlewares...
    ready_problems: Callable[[], list[str]] | None = None  # /readyz: what other processes know
    reloads: SharedState | None = None  # where reload outcomes go for `parley-relay reload` (the main process)
    load: ConfigLoader | None = None  # what a reload reads; None = the config file (a child: its snapshot)
    release_on_reload: bool = True  # False in a child: the supervisor has delivery processes release later


async def serve(config: Config, *, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None,
                notifier: Notifier | None = None, plan: Plan | None = None) -> None:
    """Serve until ``SIGTERM``/``SIGINT`` (or ``stop`` is set), then drain and return."""
    owned = notifier is None
    notifier = notifier or Notifier()
    shared = None
    if plan is None:  # one process doing everything: it is the main process and records its reloads
        shared = SharedState(state_dir(os.getpid()))
        shared.reset()
        plan = Plan(reloads=shared)
    try:
        await _serve(config, notifier, ready, stop, plan)
    finally:
        if owned:
            notifier.close()
        if shared is not None and not os.environ.get(RUNTIME_ENV):
            shared.remove()


async def _serve(config: Config, notifier: Notifier, ready: asyncio.Event | None, stop: asyncio.Event | None,
                 plan: Plan) -> None:
    inherited = plan.sockets if plan.sockets is not None else inherited_sockets() if plan.listen else []
    app = create_app(config, run_dispatcher=plan.deliver, accepts_webhooks=plan.listen)
    for prepare in plan.prepare:
        prepare(app)
    relay = app[RELAY_KEY]
    listeners = _Listeners()
    try:
        await _start(config, app, relay, inherited, listeners, plan)
    except BaseException as exc:
        notifier.status(f"failed to start: {exc}")
        await listeners.cleanup()
        raise
    supervisor = _Supervisor(relay, notifier, stop or asyncio.Event(), plan)
    supervisor.install()
    addresses = listeners.addresses()
    event(logging.INFO, "relay ready", version=__version__, listen=addresses, apps=len(relay.config.apps),
          devices=len(relay.registry), store=config.store.backend, socket_activation=bool(inherited),
          watchdog=notifier.watchdog_interval() is not None)
    notifier.ready(f"ready on {addresses}; {await _status(relay)}")
    if ready is not None:
        ready.set()
    try:
        await supervisor.stop.wait()
    finally:
        await supervisor.shutdown(listeners)


class _Supervisor:
    """Signals, reloads and the notify loops of one running relay."""

    def __init__(self, relay: Relay, notifier: Notifier, stop: asyncio.Event, plan: Plan) -> None:
        self.relay, self.notifier, self.stop, self.reloads, self.plan = relay, notifier, stop, plan.reloads, plan
        self._loop = asyncio.get_running_loop()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()  # the watchdog and status loops, and reloads in progress

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._on_stop, sig)
        self._loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        self._spawn(self.notifier.watchdog_loop())
        self._spawn(self.notifier.status_loop(lambda: _status(self.relay)))
        self._spawn(_status_on_change(self.relay, self.notifier))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_stop(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            event(logging.WARNING, "already stopping", signal=sig.name)
        self.stop.set()

    def _on_reload(self) -> None:
        if self.stop.is_set():
            event(logging.WARNING, "reload ignored while stopping")
        else:
            self._spawn(self._reload())

    async def _reload(self) -> None:
        async with self._reload_lock:  # SIGHUPs in quick succession reload one after the other
            self.notifier.reloading()
            why = await _reload(self.relay, self.plan.load, self.plan.release_on_reload)
            summary = await _status(self.relay)
            status = summary if why is None else f"reload rejected ({why}), previous configuration in force; {summary}"
            if self.reloads is not None:
                self.reloads.write_reload(why is None, status)
            self.notifier.reloaded(status)

    async def shutdown(self, listeners: _Listeners) -> None:
        """Drain; signal handlers stay until the end, so a second SIGTERM is logged instead of killing us."""
        self.stop.set()  # also when leaving by an exception: late signals are then only logged
        async with self._reload_lock:  # a reload in progress finishes first: never half a configuration
            await _drain(self.relay, self.notifier, listeners)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._loop.remove_signal_handler(sig)


async def _start(config: Config, app: web.Application, relay: Relay, inherited: list[ListenSocket],
                 listeners: _Listeners, plan: Plan) -> None:
    """Open the store and load credentials (the app's cleanup contexts), then bring the listeners up."""
    app.middlewares.insert(0, listeners.in_flight.middleware)
    if plan.ready_problems is not None:
        app[SHARED_PROBLEMS_KEY] = plan.ready_problems
    # The drain waits for in-flight requests itself (up to shutdown_timeout); aiohttp's own wait, after it
    # has closed the connections, is only a last short bound.
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0, access_log=None,
                           **runner_options(config))  # slow clients cannot hold connections
    listeners.runners.append(runner)
    await runner.setup()
    if not plan.listen:
        return
    metrics_socks = [s.sock for s in inherited if s.name == METRICS_FD_NAME]
    webhook_socks = [s.sock for s in inherited if s.name != METRICS_FD_NAME]
    planned: list[tuple[web.BaseSite, str, Listen | None]] = []  # site, config key, address (errors name them)
    if webhook_socks:
        planned += [(web.SockSite(runner, sock), "listen", None) for sock in webhook_socks]
    else:
        planned.append((web.TCPSite(runner, config.listen.host, config.listen.port, reuse_address=True,
                                    backlog=config.listen.backlog), "listen", config.listen))
    # A supervisor's child (sockets handed over) serves the operations listener only if it was handed its
    # socket (ingest.0): one process answers /metrics and /status.
    if metrics_socks or (config.metrics.listen is not None and plan.sockets is None):
        ops_app = create_ops_app(relay)
        if plan.ready_problems is not None:
            ops_app[SHARED_PROBLEMS_KEY] = plan.ready_problems
        ops = web.AppRunner(ops_app, handle_signals=False, shutdown_timeout=1.0, access_log=None)
        listeners.runners.append(ops)
        await ops.setup()
        if metrics_socks:
            planned += [(web.SockSite(ops, sock), "metrics.listen", None) for sock in metrics_socks]
        elif config.metrics.listen is not None:
            ops_at = config.metrics.listen
            planned.append((web.TCPSite(ops, ops_at.host, ops_at.port, reuse_address=True), "metrics.listen", ops_at))
    for site, key, address in planned:
        listeners.sites.append(site)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError([ConfigProblem(str(config.source), key, _bind_error(address, exc))]) from exc


def _bind_error(where: Listen | None, exc: OSError) -> str:
    address = f"{where.host}:{where.port}" if where else "the inherited socket"
    return f"cannot listen on {address}: {exc.strerror or exc}"


async def _reload(relay: Relay, load: ConfigLoader | None, release: bool) -> str | None:
    """:func:`try_reload`, and a rejected reload for anything it did not foresee (never a dead task)."""
    try:
        return await try_reload(relay, load, release=release)
    except Exception as exc:  # noqa: BLE001 - a failure it did not foresee: report it, never a dead task
        relay.metrics.reloads.labels("rejected").inc()
        why = f"{type(exc).__name__}: {exc}"
        event(logging.ERROR, "reload failed while applying; the configuration may be partly new", error=why)
        return why


async def _drain(relay: Relay, notifier: Notifier, listeners: _Listeners) -> None:
    timeout = relay.config.shutdown_timeout
    event(logging.INFO, "relay stopping: draining in-flight requests and sends", timeout=timeout)
    notifier.stopping(f"draining (up to {timeout:g}s for requests and sends)")
    relay.draining = True  # /readyz answers 503 from now on
    relay.stop_deadline = asyncio.get_running_loop().time() + timeout  # one budget for every phase below
    accepting = bool(listeners.sites)  # a delivery process has no listener: nothing can be arriving
    await listeners.stop_accepting()
    if accepting:
        await asyncio.sleep(ACCEPT_GRACE)
    if not await listeners.in_flight.wait(remaining(relay)):
        event(logging.WARNING, "requests still in flight after shutdown_timeout, closing them",
              requests=listeners.in_flight.count)
    # In-flight requests, then the dispatcher's in-flight sends (its cleanup context), then providers, store.
    await listeners.cleanup()
    event(logging.INFO, "relay stopped")
    notifier.status("stopped")


async def _status(relay: Relay) -> str:
    """The ``STATUS=`` text: queue depth, counts by end state, then each app's delivery state."""
    try:
        stats = await relay.store.summary()
        apps = await relay.app_health()
    except (StoreError, OSError) as exc:
        return f"store unavailable: {exc}"
    ended = ", ".join(f"{end.value} {stats.ended.get(end, 0)}" for end in EndState)
    text = f"queue {stats.pending + stats.inflight} ({stats.inflight} in flight); accepted {stats.accepted}; {ended}"
    line = summary_line(apps, time.time())
    return f"{text}; {line}" if line else text


async def _status_on_change(relay: Relay, notifier: Notifier) -> None:
    """A new ``STATUS=`` as soon as an app's circuit or alarm changes, not only at the next status interval:
    ``systemctl status`` names an app that stopped delivering within a probe interval."""
    if not notifier.enabled:
        return
    said = None
    while True:
        await asyncio.sleep(HEALTH_LOOK_EVERY)
        known = relay.peer_health() if relay.peer_health is not None else relay.own_health()
        states = {app: (h.circuit, h.alarm) for app, h in known.items()}
        if said is not None and states != said:
            notifier.status(await _status(relay))
        said = states
