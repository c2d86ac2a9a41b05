"""The main process of a multi-process relay: starts the role processes, and speaks for them to systemd.

``serve`` (unless ``processes: 1``) binds the listening sockets (or takes systemd's), imports what every role
runs, then forks (:mod:`relay.runtime.forking`: they share those pages) N webhook processes (``ingest``, sharing
those sockets) and M delivery processes, and supervises them:

* ``READY=1`` goes to systemd once every child said ``READY=1`` to the supervisor's own notify socket;
* children run the configuration the supervisor validated, never the file as it is on disk when they
  (re)start: the supervisor keeps the bytes it validated by generation (:mod:`relay.runtime.snapshot`);
* ``WATCHDOG=1`` goes to systemd only while every child pings and none is down: a hung child, or one that
  cannot be kept running, stops the service's pings (systemd then restarts the whole service);
* ``SIGHUP`` validates the files, keeps them as the next generation and reloads every child into it; when a
  child rejects it, the children that took it go back to the previous generation; the outcome (taken,
  rejected, or partial: which processes run which) goes to the log, systemd's ``STATUS=`` and the shared
  state that ``parley-relay reload`` waits for;
* ``SIGTERM``/``SIGINT`` drain every child (each as a single relay drains), then exit;
* a child that dies is started again, after 0.5 s doubling to 30 s; a new delivery process first makes
  what the dead one had claimed claimable again (``Store.recover``). After :data:`DOWN_AFTER` exits in a
  row, each within a minute of its start, the child counts as down: ``STATUS=`` names it and its last error,
  the shared state has it (``parley_relay_role_down`` in ``/metrics``), and the watchdog pings stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from relay import __version__
from relay.config import Config
from relay.errors import ConfigError
from relay.observability import MULTIPROC_ENV, event
from relay.runtime import snapshot
from relay.runtime.forking import RoleProcess, fork_role
from relay.runtime.listening import METRICS_FD_NAME
from relay.runtime.listening import listening as listening_sockets
from relay.runtime.notify import NotifyHub
from relay.runtime.role_args import RELEASE_SIGNAL, Counts, Role, RoleArgs
from relay.runtime.roles import serve_role  # imported before any fork: every child shares what it loads
from relay.runtime.shared import RUNTIME_ENV, ProcessDown, SharedState, state_dir
from relay.runtime.systemd import ListenSocket, Notifier, describe
from relay.store import prepare_store

RESTART_FIRST, RESTART_MAX, RESTART_RESET = 0.5, 30.0, 60.0  # backoff; a child that ran 60 s starts over
DOWN_AFTER = 3  # exits in a row, each within RESTART_RESET of its start, after which a child counts as down
START_GRACE = 60.0  # seconds a (re)starting child may take before the watchdog counts it as hung
RELOAD_TIMEOUT = 60.0
STATUS_EVERY = 10.0


@dataclass(eq=False)
class _Child:
    role: Role
    index: int
    proc: RoleProcess | None = None
    started: float = 0.0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    last_ping: float = 0.0
    status: str = ""
    code: int | None = None
    reload: asyncio.Future[str] | None = None
    generation: int = 1  # the validated configuration it runs (and restarts with)
    failures: int = 0  # exits in a row, each within RESTART_RESET of its start
    down: ProcessDown | None = None  # set after DOWN_AFTER failures, cleared when it is ready again

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
    try:  # the children run these bytes, validated here, whatever the file says when one (re)starts
        config = snapshot.take(shared.root, 1, config.source)
        snapshot.publish(shared.root, 1)
        sockets = listening_sockets(config)
    except ConfigError as exc:
        notifier.status(f"failed to start: {exc}")
        notifier.close()
        raise
    try:
        # In the loop's own thread: the children are forked from this process, which must have no other thread.
        problem = prepare_store(config.store)
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
        self.generation = 1  # the latest validated configuration the children run
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
            self._count_failure(child, proc.pid)
            if child.failures == 1:
                delay = RESTART_FIRST
            self.notifier.status(f"{child.name} exited ({child.code}), restarting in {delay:g}s; {self._summary()}")
            try:
                await asyncio.wait_for(self.stop.wait(), delay)
            except TimeoutError:
                delay = min(delay * 2, RESTART_MAX)

    async def _spawn_child(self, child: _Child) -> RoleProcess:
        # The operations listener (/metrics, /status) goes to ingest.0 alone: one process answers it, with
        # every process's metrics merged (prometheus_client's multiprocess files).
        fds = tuple((s.name, s.sock.fileno()) for s in self.sockets
                    if child.role == "ingest" and (s.name != METRICS_FD_NAME or child.index == 0))
        args = RoleArgs(child.role, child.index, self.shared.root, self.wake, self.counts.delivery, os.getpid(), fds,
                        child.generation)
        child.ready.clear()
        child.started = time.monotonic()
        child.status = ""
        proc = fork_role(partial(serve_role, self.config.source, args), self.env, [fd for _, fd in fds], child.name)
        child.proc = proc
        self.by_pid[proc.pid] = child
        return proc

    def _count_failure(self, child: _Child, pid: int) -> None:
        """One more exit of ``child`` in a row (a run of RESTART_RESET starts the count over); at DOWN_AFTER,
        it is down: the log, ``STATUS=``, the shared state, and the watchdog (see :meth:`_watchdog`) say so."""
        ran = time.monotonic() - child.started
        child.failures = child.failures + 1 if ran < RESTART_RESET else 1
        why = child.status if child.status.startswith("failed to start") else f"exited with {child.code}"
        event(logging.ERROR, "relay process exited, starting it again", process=child.name, pid=pid,
              code=child.code, failures=child.failures, error=why)
        if child.failures >= DOWN_AFTER:
            child.down = ProcessDown(child.name, child.role, time.time(), child.failures, why)
            event(logging.ERROR, "relay process down: it does not stay up; watchdog pings withheld",
                  process=child.name, failures=child.failures, error=why)
            self._publish_down()

    def _publish_down(self) -> None:
        self.shared.write_down([c.down for c in self.children if c.down is not None])

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
            if child.down is not None:
                child.down = None
                event(logging.INFO, "relay process up again", process=child.name)
                self._publish_down()
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
            ok, status = await self._reload_children()
            status = f"{status}; {self._summary()}"
            self.shared.write_reload(ok, status, "partial" if status.startswith("reload PARTIAL") else None)
            self.notifier.reloaded(status)

    async def _reload_children(self) -> tuple[bool, str]:
        """Validate the files and keep them as the next generation, ask every running child to take it, and
        put those that did back on the previous one when another refused: ``(taken by all, what happened)``."""
        old, new = self.generation, self.generation + 1
        try:
            config = snapshot.take(self.shared.root, new, self.config.source)
        except ConfigError as exc:
            event(logging.ERROR, "reload rejected, previous configuration stays in force", error=str(exc))
            return False, f"reload rejected ({exc}), previous configuration in force"
        asked = [c for c in self.children if c.alive and c.ready.is_set()]
        refused = await self._ask(asked, new)
        took = [c for c in asked if c.name not in refused]
        if not refused:
            self.config, self.generation = config, new
            for child in self.children:  # one not running now starts on it
                child.generation = new
                # Every process routes by the new files now. Only to a ready child: until its handler is in place
                # SIGUSR2 would end it (one starting now runs the new files; what waits leaves at its own time).
                if child.role == "delivery" and child.alive and child.ready.is_set() and child.proc is not None:
                    child.proc.send_signal(RELEASE_SIGNAL)
            event(logging.INFO, "configuration reloaded in every process", generation=new)
            return True, f"reloaded (configuration {new})"
        reasons = ", ".join(f"{name}: {why}" for name, why in refused.items())
        back = await self._ask(took, old) if took else {}
        if not back:
            event(logging.ERROR, "reload rejected, previous configuration stays in force", rejected=reasons,
                  reverted=", ".join(c.name for c in took) or "-")
            return False, f"reload rejected by {reasons}; previous configuration in force"
        # Some children run the new configuration and others the old: say exactly which, and fail the command.
        kept = [c.name for c in took if c.name in back]
        event(logging.ERROR, "reload partial: processes run different configurations", new=", ".join(kept),
              rejected=reasons, generation=new)
        return False, (f"reload PARTIAL: configuration {new} in {', '.join(kept)}; rejected by {reasons} "
                       f"(previous configuration there)")

    async def _ask(self, children: list[_Child], generation: int) -> dict[str, str]:
        """SIGHUP ``children`` to take ``generation``; those that did not, with why. Those that did run it."""
        snapshot.publish(self.shared.root, generation)
        for child in children:
            child.reload = self.loop.create_future()
            if child.proc is not None:
                child.proc.send_signal(signal.SIGHUP)
        waits = [c.reload for c in children if c.reload is not None]
        if waits:
            await asyncio.wait(waits, timeout=RELOAD_TIMEOUT)
        refused: dict[str, str] = {}
        for child in children:
            said = child.reload.result() if child.reload is not None and child.reload.done() else "no answer"
            child.reload = None
            if said.startswith("reload rejected") or said == "no answer":
                refused[child.name] = _reason(said)
            else:
                child.generation = generation
        return refused

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
            hung |= {c.name for c in self.children if c.down is not None}  # systemd restarts the service
            if not hung:
                self.notifier.notify("WATCHDOG=1")
            elif hung - silent:
                event(logging.ERROR, "relay process stopped answering or is down: watchdog pings withheld",
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
        """Processes down (with why), process counts, then what the first delivery process last said (queue,
        end states, and each app's delivery state as every delivery process sees it)."""
        down = [f"DOWN {c.name} ({c.down.failures} failed starts: {c.down.error})" for c in self.children
                if c.down is not None]
        starting = [c.name for c in self.children if c.down is None and not (c.alive and c.ready.is_set())]
        head = f"{self.counts.ingest} ingest + {self.counts.delivery} delivery processes"
        if starting:
            head += f" ({', '.join(starting)} starting)"
        said = next((c.status for c in self.children if c.role == "delivery" and c.status), "")
        return "; ".join([*down, head, *([said] if said else [])])


def _reason(status: str) -> str:
    """Why a child refused a reload, from its ``STATUS=`` line (``reload rejected (WHY), previous ...``)."""
    if status.startswith("reload rejected (") and "), previous configuration in force" in status:
        return status[len("reload rejected ("):status.index("), previous configuration in force")]
    return status.split(";", 1)[0]
