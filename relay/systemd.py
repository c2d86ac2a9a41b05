"""systemd integration: ``sd_notify`` (via ``sdnotify``), watchdog pings, socket activation.

All of it is a no-op outside systemd (no ``NOTIFY_SOCKET``/``LISTEN_FDS``), so the same binary runs in a
terminal, in tests and under systemd.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

import sdnotify

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends notify datagrams to ``$NOTIFY_SOCKET`` when systemd asked for them."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self.enabled else None

    def notify(self, *lines: str) -> None:
        if self._notifier is not None:
            self._notifier.notify("\n".join(lines))

    def watchdog_interval(self) -> float | None:
        """Half of ``WatchdogSec`` (systemd's advice), when the watchdog is on for this process."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        return int(usec) / 2_000_000

    async def watchdog_loop(self, status: Callable[[], Awaitable[str]], status_every: float = 10.0) -> None:
        """Ping from the event loop itself: a blocked loop stops the pings and systemd restarts us."""
        interval = self.watchdog_interval()
        if not self.enabled:
            return
        tick = min(interval or status_every, status_every)
        last_status = 0.0
        loop = asyncio.get_running_loop()
        while True:
            lines = ["WATCHDOG=1"] if interval else []
            if loop.time() - last_status >= status_every:
                lines.append(await status())
                last_status = loop.time()
            if lines:
                self.notify(*lines)
            await asyncio.sleep(tick)


def inherited_sockets() -> list[socket.socket]:
    """Listening sockets passed by systemd socket activation (``LISTEN_FDS``), else none."""
    if os.environ.get("LISTEN_PID") not in (None, str(os.getpid())):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0") or 0)
    sockets = [socket.socket(fileno=SD_LISTEN_FDS_START + i) for i in range(count)]
    for sock in sockets:
        sock.setblocking(False)
    # Not inherited again by anything we might spawn.
    for var in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return sockets
