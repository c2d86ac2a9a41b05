"""systemd integration: ``sd_notify`` (via ``sdnotify``), watchdog pings, socket activation, journald.

All of it is a no-op outside systemd (no ``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``LISTEN_FDS`` or
``JOURNAL_STREAM``), so the same binary runs in a terminal, in tests and under systemd. The protocols are the
documented ones: ``sd_notify(3)``, ``sd_watchdog_enabled(3)``, ``sd_listen_fds(3)`` and ``systemd.exec(5)``
(``$JOURNAL_STREAM``).
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass

import sdnotify

from relay.errors import ConfigError, ConfigProblem

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3): passed descriptors start at 3
STATUS_EVERY = 10.0  # seconds between STATUS= lines while running


class Notifier:
    """Sends notify datagrams to ``$NOTIFY_SOCKET`` when systemd (or a test) asked for them."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.enabled = bool(env.get("NOTIFY_SOCKET"))
        # sdnotify reads the socket address (an "@" prefix means the abstract namespace) from os.environ.
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")

    def notify(self, *lines: str) -> None:
        """Send one datagram of ``KEY=VALUE`` lines (sdnotify ignores send errors, as sd_notify does)."""
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def close(self) -> None:
        """Release the notify socket (sdnotify keeps one connected datagram socket)."""
        sock = getattr(self._notifier, "socket", None)
        if isinstance(sock, socket.socket):
            sock.close()
        self._notifier = None

    def ready(self, status: str) -> None:
        """Startup done: store open, credentials loaded, listeners up."""
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """Start of a reload; systemd >= 253 wants the monotonic time with it (harmless before)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading configuration")

    def reloaded(self, status: str) -> None:
        """End of a reload, whether the new files were taken or rejected."""
        self.notify("READY=1", f"STATUS={status}")

    def stopping(self, status: str) -> None:
        """Start of the drain: systemd then waits up to ``TimeoutStopSec=`` for the exit."""
        self.notify("STOPPING=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """A free-form line for ``systemctl status``."""
        self.notify(f"STATUS={status}")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of ``WatchdogSec`` (systemd's advice), when it is on for this process."""
        if not self.enabled or not self._watchdog_usec.isdigit() or int(self._watchdog_usec) == 0:
            return None
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None  # the watchdog is meant for another process (sd_watchdog_enabled)
        return int(self._watchdog_usec) / 2_000_000

    async def watchdog_loop(self) -> None:
        """Ping from the event loop itself: a blocked loop stops the pings and systemd restarts us."""
        interval = self.watchdog_interval()
        if interval is None:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def status_loop(self, status: Callable[[], Awaitable[str]], every: float = STATUS_EVERY) -> None:
        """A ``STATUS=`` line every ``every`` seconds; kept apart from the pings so a slow store query never
        delays a ping."""
        if not self.enabled:
            return
        while True:
            await asyncio.sleep(every)
            self.status(await status())


@dataclass(frozen=True)
class ListenSocket:
    """One socket passed by systemd; ``name`` is its ``FileDescriptorName=`` (``unknown`` when unnamed)."""

    name: str
    sock: socket.socket


def inherited_sockets(environ: MutableMapping[str, str] | None = None) -> list[ListenSocket]:
    """Listening sockets passed by socket activation (``LISTEN_FDS`` for our pid), else none.

    The variables are removed afterwards, as ``sd_listen_fds(unset_environment=1)`` does, so that nothing
    we might start believes the sockets are its own. A descriptor that is not a listening stream socket is
    a configuration error of the ``.socket`` unit, reported as such.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID", ""), env.get("LISTEN_FDS", "")
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        env.pop(var, None)
    if not count or pid != str(os.getpid()):
        return []
    if not count.isdigit():
        raise _activation_error(f"LISTEN_FDS must be a number, not {count!r}")
    found: list[ListenSocket] = []
    for i in range(int(count)):
        fd = SD_LISTEN_FDS_START + i
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise _activation_error(f"descriptor {fd} is not open: {exc.strerror}") from exc
        if not stat.S_ISSOCK(mode):
            raise _activation_error(f"descriptor {fd} is not a socket")
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.detach()
            raise _activation_error(f"descriptor {fd} is not a listening stream socket (use ListenStream=)")
        sock.setblocking(False)
        name = names[i] if i < len(names) and names[i] else "unknown"
        found.append(ListenSocket(name, sock))
    return found


def _activation_error(message: str) -> ConfigError:
    return ConfigError([ConfigProblem("socket activation", "LISTEN_FDS", message)])


def describe(sock: socket.socket) -> str:
    """``host:port`` (or the unix path) a listening socket is bound to, for logs and ``STATUS=``."""
    address = sock.getsockname()
    if isinstance(address, tuple):
        host = f"[{address[0]}]" if ":" in str(address[0]) else str(address[0])
        return f"{host}:{address[1]}"
    return str(address) or "unix"
