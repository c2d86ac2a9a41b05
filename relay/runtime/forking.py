"""Role processes forked from the supervisor, so that they share the pages of what it imported once.

Started as fresh interpreters, the webhook and delivery processes
each imported and built the same modules again (aiohttp.web, the configuration model, asyncio, prometheus,
cryptography...): 145 MiB for the tree at defaults. Forked from a supervisor that imported them (and
:func:`gc.freeze` keeping the collector off their pages), they share them copy-on-write: 104 MiB
(``bench/memory.py``). The supervisor imports what both roles run before it forks; what only the delivery
processes use (the provider clients) they import themselves, since a module loaded before the fork would
also sit in every webhook process and in the supervisor.

A child resets what ``exec`` would have reset before it runs its role: the signal handlers and wakeup
descriptor of the supervisor's event loop, every descriptor it was not given (``close_fds``), standard input
(``/dev/null``), its environment, the log handlers, prometheus_client's value class (chosen from the
environment when it was imported), its context variables, and its process title (``parley-relay: delivery.0``
in ``ps`` and ``/proc/PID/cmdline``). Python itself forgets the running event loop in a forked child.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Collection, Mapping

from prometheus_client import values
from setproctitle import setproctitle

from relay.observability import MULTIPROC_ENV

TITLE_PREFIX = "parley-relay: "


_pid = os.getpid()


def _remember_pid() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_remember_pid)


def _own_pid() -> int:
    """This process's id, as of its last fork: prometheus_client asks for it on every metric change (to notice
    a fork), and ``os.getpid`` is a system call each time while the answer only changes at a fork."""
    return _pid


def title(name: str) -> str:
    """The process title of role process ``name`` (``ingest.0``)."""
    return TITLE_PREFIX + name


class RoleProcess:
    """A forked child as the supervisor watches it: its exit is read from a pidfd on the running loop."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[int] = self._loop.create_future()
        self._pidfd = os.pidfd_open(pid)
        self._loop.add_reader(self._pidfd, self._reap)

    def _reap(self) -> None:
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return
        self._loop.remove_reader(self._pidfd)
        os.close(self._pidfd)
        self.returncode = os.waitstatus_to_exitcode(status)
        self._exited.set_result(self.returncode)

    async def wait(self) -> int:
        """The exit status once it ended (negative: the signal that ended it), as ``asyncio.subprocess``."""
        return await asyncio.shield(self._exited)

    def send_signal(self, sig: int) -> None:
        """``sig`` to the child, unless it already ended (its pid may belong to another process by then)."""
        if self.returncode is None:
            signal.pidfd_send_signal(self._pidfd, sig)


def fork_role(run: Callable[[], int], env: Mapping[str, str], keep_fds: Collection[int], name: str) -> RoleProcess:
    """Fork a child that calls ``run`` with environment ``env`` and only ``keep_fds`` open (besides standard
    output and error), then exits with what it returned; the child as the running loop watches it."""
    sys.stdout.flush()
    sys.stderr.flush()
    # The signals the supervisor handles stay blocked until the child has reset their handlers: one that
    # reached the child in between would run the supervisor's handler and wake the supervisor's loop (the
    # wakeup pipe is shared).
    handled = {sig for sig in signal.valid_signals() if _handled(sig)}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, handled)
    gc.freeze()  # the inherited objects stay out of the child's collections: their pages stay shared
    try:
        pid = os.fork()
        if pid == 0:
            _child(run, env, keep_fds, name, handled, blocked)  # never returns
    finally:
        gc.unfreeze()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return RoleProcess(pid)


def _handled(sig: int) -> bool:
    handler = signal.getsignal(sig)
    return callable(handler) and handler is not signal.default_int_handler


def _child(run: Callable[[], int], env: Mapping[str, str], keep_fds: Collection[int], name: str,
           handled: Collection[int], mask: Collection[int]) -> None:
    code = 1
    try:
        _reset(env, keep_fds, name, handled)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        code = contextvars.Context().run(run)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - the child must reach os._exit whatever happened
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        # Never return into the supervisor's stack, nor run its atexit handlers and finalizers.
        os._exit(code)


def _reset(env: Mapping[str, str], keep_fds: Collection[int], name: str, handled: Collection[int]) -> None:
    signal.set_wakeup_fd(-1)
    for sig in handled:  # as a fresh interpreter has them
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    keep = {0, 1, 2, *keep_fds}
    for fd in [int(entry) for entry in os.listdir("/proc/self/fd")]:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:  # the directory listing's own descriptor, closed already
                pass
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    # Titled once its descriptors are closed (a process found by its title holds no more of the supervisor's),
    # before its environment changes (setproctitle finds argv's memory through environ's).
    setproctitle(title(name))
    os.environ.clear()
    os.environ.update(env)
    if MULTIPROC_ENV in env:
        values.ValueClass = values.MultiProcessValue(process_identifier=_own_pid)  # type: ignore[no-untyped-call]
    else:
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    logging.getLogger().handlers.clear()
