"""The main process of a multi-process relay: starts the role processes, and speaks for them to systemd.

``serve`` (unless ``processes: 1``) binds the listening sockets (or takes systemd's), then starts, as
children of the same Python, N webhook processes (``ingest``, sharing those sockets) and M delivery
processes, and supervises them:

* ``READY=1`` goes to systemd once every child said ``READY=1`` to the supervisor's own notify socket;
* ``WATCHDOG=1`` goes to systemd only while every child pings: a hung child stops the service's pings;
* ``SIGHUP`` reloads every child; the outcome (rejected when any child kept its old configuration) goes to
  systemd's ``STATUS=`` and to the shared state that ``parley-relay reload`` waits for;
* ``SIGTERM``/``SIGINT`` drain every child (each as a single relay drains), then exit;
* a child that dies is started again, after 0.5 s doubling to 30 s; a new delivery process first makes
  what the dead one had claimed claimable again (``Store.recover``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from subprocess import DEVNULL
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from relay import __version__
from relay.config import Config
from relay.config.model import Processes
from relay.errors import ConfigError, ConfigProblem
from relay.observability import MULTIPROC_ENV, event
from relay.runtime.notify import NotifyHub
from relay.runtime.roles import Role, RoleArgs
from relay.runtime.shared import RUNTIME_ENV, SharedState, state_dir
from relay.runtime.systemd import ListenSocket, Notifier, describe, inherited_sockets
from relay.store.sqlite_schema import prepare as prepare_sqlite

METRICS_FD_NAME = "metrics"
RESTART_FIRST, RESTART_MAX, RESTART_RESET = 0.5, 30.0, 60.0  # backoff; a child that ran 60 s starts over
START_GRACE = 60.0  # seconds a (re)starting child may take before the watchdog counts it as hung
RELOAD_TIMEOUT = 60.0
STATUS_EVERY = 10.0
BIND_RETRY = 5.0  # EADDRINUSE: processes of a killed predecessor may still be closing the port


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


@dataclass(eq=False)
class _Child:
    role: Role
    index: int
    proc: asyncio.subprocess.Process | None = None
    started: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_ping: float = 0.0
    status: str = ""
    code: int | None = None
    reload: asyncio.Future[str] | None = None

    @property
    def name(self) -> str:
        return f"{self.role}.{self.index}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


async def supervise(config: Config, counts: Counts) -> int:
    """Run the service as ``counts`` processes until ``SIGTERM``; the exit status of the service."""
    notifier = Notifier()
    shared = SharedState(state_dir(os.getpid()))
    shared.reset()
    try:
        sockets = _listening(config)
    except ConfigError as exc:
        notifier.status(f"failed to start: {exc}")
        notifier.close()
        raise
    try:
        problem = await _prepare_store(config)
        if problem is not None:
            notifier.status(f"failed to start: {problem}")
            event(logging.ERROR, "relay failed to start", problem=problem)
            return 1
        return await _Supervisor(config, counts, notifier, sockets, shared).run()
    finally:
        notifier.close()
        for listening in sockets:
            listening.sock.close()
        if not os.environ.get(RUNTIME_ENV):
            shared.remove()


class _Supervisor:
    def __init__(self, config: Config, counts: Counts, notifier: Notifier, sockets: list[ListenSocket],
                 shared: SharedState) -> None:
        self.config, self.counts, self.notifier, self.sockets, self.shared = config, counts, notifier, sockets, shared
        self.loop = asyncio.get_running_loop()
        self.children = [_Child("ingest", i) for i in range(counts.ingest)]
        self.children += [_Child("delivery", i) for i in range(counts.delivery)]
        self.by_pid: dict[int, _Child] = {}
        self.stop = asyncio.Event()
        self.failed: asyncio.Future[str] = self.loop.create_future()
        self.serving = False  # READY=1 sent: from now on a dead child is restarted, not a failed start
        self.wake = f"parley-relay-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.hub = NotifyHub(self._on_datagram)
        self.reload_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[None]] = set()
        interval = notifier.watchdog_interval()
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("LISTEN_", "WATCHDOG_")) and k != "NOTIFY_SOCKET"}
        self.env.update({"NOTIFY_SOCKET": self.hub.address, MULTIPROC_ENV: str(shared.metrics_dir)})
        if interval is not None:
            self.env["WATCHDOG_USEC"] = str(int(interval * 2_000_000))

    async def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.stop.set)
        self.loop.add_signal_handler(signal.SIGHUP, self._on_reload)
        keepers: list[asyncio.Task[None]] = []
        self.shared.set_starting([c.name for c in self.children])
        try:
            # Every store opens without touching claims (a delivery process recovers only dead owners' work),
            # so all processes start at once.
            keepers = [self.loop.create_task(self._keep(c)) for c in self.children]
            problem = await self._started(self.children)
            if problem is not None and self.stop.is_set() and not self.failed.done():
                return await self._shutdown(keepers, failed=False)  # systemctl stop while starting: a stop
            if problem is not None:
                self.notifier.status(problem)
                event(logging.ERROR, "relay failed to start", problem=problem)
                return await self._shutdown(keepers, failed=True)
            self.serving = True
            self.shared.set_starting([])
            self._spawn(self._watchdog())
            self._spawn(self._status_loop())
            addresses = ", ".join(describe(s.sock) for s in self.sockets) or "-"
            event(logging.INFO, "relay ready", version=__version__, listen=addresses, ingest=self.counts.ingest,
                  delivery=self.counts.delivery, watchdog=self.notifier.watchdog_interval() is not None)
            self.notifier.ready(f"ready on {addresses}; {self._summary()}")
            await self.stop.wait()
            return await self._shutdown(keepers, failed=False)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                self.loop.remove_signal_handler(sig)
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
            self.hub.close()

    async def _started(self, group: list[_Child]) -> str | None:
        """None once every child of ``group`` is ready; else why the start failed."""

        async def all_ready() -> None:
            for child in group:
                await child.ready.wait()

        # Tasks, cancelled and then awaited: a cancelled gather() would hold a CancelledError nobody retrieves.
        ready = self.loop.create_task(all_ready())
        stopped = self.loop.create_task(self.stop.wait())
        waits: list[asyncio.Future[Any]] = [ready, stopped, self.failed]
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for task in (ready, stopped):
            task.cancel()
        await asyncio.gather(ready, stopped, return_exceptions=True)
        if self.failed.done():
            return self.failed.result()
        return None if ready in done else "stopped while starting"

    async def _shutdown(self, keepers: list[asyncio.Task[None]], *, failed: bool) -> int:
        self.stop.set()
        timeout = self.config.shutdown_timeout
        if not failed:
            self.notifier.stopping(f"draining (up to {timeout:g}s for requests, then {timeout:g}s for sends)")
            event(logging.INFO, "relay stopping: draining every process", timeout=timeout)
        async with self.reload_lock:  # a reload in progress finishes first
            for child in self.children:
                if child.alive and child.proc is not None:
                    child.proc.send_signal(signal.SIGTERM)
            await asyncio.gather(*keepers, return_exceptions=True)
        bad = [f"{c.name} exited {c.code}" for c in self.children if c.code not in (None, 0)]
        if not failed:
            event(logging.INFO if not bad else logging.WARNING, "relay stopped", problems=", ".join(bad) or "-")
            self.notifier.status("stopped")
        return 1 if failed or bad else 0

    async def _keep(self, child: _Child) -> None:
        """Run ``child`` until the service stops, starting it again when it dies."""
        delay = RESTART_FIRST
        while not self.stop.is_set():
            proc = await self._spawn_child(child)
            child.code = await proc.wait()
            self.by_pid.pop(proc.pid, None)
            mark_process_dead(proc.pid, str(self.shared.metrics_dir))  # type: ignore[no-untyped-call]
            if child.reload is not None and not child.reload.done():
                child.reload.set_result(f"reload rejected: {child.name} exited")
            if self.stop.is_set():
                return
            if not self.serving:
                if not self.failed.done():
                    why = child.status if child.status.startswith("failed to start") else ""
                    self.failed.set_result(why or f"failed to start: {child.name} exited with {child.code}")
                return
            if time.monotonic() - child.started > RESTART_RESET:
                delay = RESTART_FIRST
            event(logging.ERROR, "relay process exited, starting it again", process=child.name, pid=proc.pid,
                  code=child.code, restart_in=delay)
            self.notifier.status(f"{child.name} exited ({child.code}), restarting in {delay:g}s; {self._summary()}")
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
            except TimeoutError:
                delay = min(delay * 2, RESTART_MAX)

    async def _spawn_child(self, child: _Child) -> asyncio.subprocess.Process:
        # The operations listener (/metrics, /status) goes to ingest.0 alone: one process answers it, with
        # every process's metrics merged (prometheus_client's multiprocess files).
        fds = tuple((s.name, s.sock.fileno()) for s in self.sockets
                    if child.role == "ingest" and (s.name != METRICS_FD_NAME or child.index == 0))
        args = RoleArgs(child.role, child.index, self.shared.root, self.wake, self.counts.delivery, os.getpid(), fds)
        command = [sys.executable, "-m", "relay.cli", "serve", "--config", str(self.config.source), *args.argv()]
        child.ready.clear()
        child.started = time.monotonic()
        child.status = ""
        proc = await asyncio.create_subprocess_exec(*command, env=self.env, stdin=DEVNULL,
                                                    pass_fds=[fd for _, fd in fds])
        child.proc = proc
        self.by_pid[proc.pid] = child
        return proc

    def _on_datagram(self, pid: int, fields: Mapping[str, str]) -> None:
        child = self.by_pid.get(pid)
        if child is None:
            return
        status = fields.get("STATUS")
        if status is not None:
            said = status.split("; ", 1)[1] if status.startswith("ready on ") and "; " in status else status
            if said != child.status and child.role == "delivery" and self.serving and self.notifier.enabled:
                child.status = said  # an app's delivery state changed: systemd hears it now, not at the next loop
                self.notifier.status(self._summary())
            child.status = said
        if "WATCHDOG" in fields:
            child.last_ping = time.monotonic()
        if fields.get("READY") == "1":
            child.last_ping = time.monotonic()
            if child.reload is not None and not child.reload.done():
                child.reload.set_result(status or "")
            child.ready.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _on_reload(self) -> None:
        if self.stop.is_set() or not self.serving:
            event(logging.WARNING, "reload ignored: the relay is starting or stopping")
            if not self.stop.is_set():
                self.shared.write_reload(False, "reload ignored: the relay is still starting")
            return
        self._spawn(self._reload())

    async def _reload(self) -> None:
        async with self.reload_lock:
            self.notifier.reloading()
            asked = [c for c in self.children if c.alive and c.ready.is_set()]
            for child in asked:
                child.reload = self.loop.create_future()
                if child.proc is not None:
                    child.proc.send_signal(signal.SIGHUP)
            waits = [c.reload for c in asked if c.reload is not None]
            await asyncio.wait(waits, timeout=RELOAD_TIMEOUT)
            rejected = [c.name for c in asked if c.reload is None or not c.reload.done()
                        or c.reload.result().startswith("reload rejected")]
            for child in asked:
                child.reload = None
            if rejected:
                status = f"reload rejected by {', '.join(rejected)}, previous configuration in force; " \
                         f"{self._summary()}"
                if len(rejected) < len(asked):
                    event(logging.ERROR, "reload taken by some processes only", rejected=", ".join(rejected))
            else:
                status = f"reloaded; {self._summary()}"
            self.shared.write_reload(not rejected, status)
            self.notifier.reloaded(status)

    async def _watchdog(self) -> None:
        """``WATCHDOG=1`` to systemd while every child pinged within ``WatchdogSec`` (or is still starting)."""
        interval = self.notifier.watchdog_interval()
        if interval is None:
            return
        silent: set[str] = set()
        while True:
            now = time.monotonic()
            hung = {c.name for c in self.children if c.alive and now - max(c.last_ping, c.started) > (
                2 * interval if c.ready.is_set() else START_GRACE)}
            if not hung:
                self.notifier.notify("WATCHDOG=1")
            elif hung - silent:
                event(logging.ERROR, "relay process stopped answering: watchdog pings withheld",
                      processes=", ".join(sorted(hung)))
            silent = hung
            await asyncio.sleep(interval)

    async def _status_loop(self) -> None:
        if not self.notifier.enabled:
            return
        while True:
            await asyncio.sleep(STATUS_EVERY)
            self.notifier.status(self._summary())

    def _summary(self) -> str:
        """Process counts, then what the first delivery process last said (queue, end states, alarms)."""
        down = [c.name for c in self.children if not (c.alive and c.ready.is_set())]
        head = f"{self.counts.ingest} ingest + {self.counts.delivery} delivery processes"
        if down:
            head += f" ({', '.join(down)} starting)"
        said = next((c.status for c in self.children if c.role == "delivery" and c.status), "")
        return f"{head}; {said}" if said else head


async def _prepare_store(config: Config) -> str | None:
    """Create or migrate a SQLite file once, before the children that share it start (they would otherwise
    all switch its journal mode and migrate it at the same moment); why it cannot be opened, or None."""
    if config.store.backend != "sqlite":
        return None
    try:
        await asyncio.to_thread(prepare_sqlite, config.store.path)
    except (sqlite3.Error, OSError) as exc:
        return f"cannot open SQLite store {config.store.path}: {exc}"
    return None


def _listening(config: Config) -> list[ListenSocket]:
    """systemd's sockets (socket activation), else the sockets ``listen`` and ``metrics.listen`` name."""
    inherited = inherited_sockets()
    webhook = [s for s in inherited if s.name != METRICS_FD_NAME]
    metrics = [s for s in inherited if s.name == METRICS_FD_NAME]
    if not webhook:
        webhook = [ListenSocket("webhook", s) for s in _bind(config, "listen", config.listen.host,
                                                              config.listen.port, config.listen.backlog)]
    if not metrics and config.metrics.listen is not None:
        at = config.metrics.listen
        metrics = [ListenSocket(METRICS_FD_NAME, s) for s in _bind(config, "metrics.listen", at.host, at.port, 128)]
    return webhook + metrics


def _bind(config: Config, key: str, host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as aiohttp's TCPSite binds)."""
    deadline = time.monotonic() + BIND_RETRY
    while True:
        bound: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                sock = socket.socket(family, kind, proto)
                bound.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(backlog)
                sock.setblocking(False)
            return bound
        except OSError as exc:
            for sock in bound:
                sock.close()
            if isinstance(exc, OSError) and exc.errno == 98 and time.monotonic() < deadline:  # EADDRINUSE
                time.sleep(0.1)
                continue
            message = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            raise ConfigError([ConfigProblem(str(config.source), key, message)]) from exc
