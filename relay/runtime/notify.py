"""The supervisor's own ``NOTIFY_SOCKET``: the children of a multi-process relay speak ``sd_notify`` to it.

Each child runs the same :class:`~relay.runtime.systemd.Notifier` it would run alone (``READY=1``,
``STATUS=``, ``RELOADING=1``, ``WATCHDOG=1``), only its ``$NOTIFY_SOCKET`` names this socket; the
supervisor learns the sender of every datagram from the kernel (``SO_PASSCRED``) and speaks for the whole
service to systemd.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import uuid
from collections.abc import Callable, Mapping

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
_BATCH = 256  # datagrams read per loop turn at most

Handler = Callable[[int, Mapping[str, str]], None]


class NotifyHub:
    """An abstract-namespace datagram socket that hands ``(pid, {KEY: VALUE})`` to ``handler``."""

    def __init__(self, handler: Handler) -> None:
        self.name = f"parley-relay-notify-{uuid.uuid4().hex[:16]}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.name)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self._sock.setblocking(False)
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    @property
    def address(self) -> str:
        """The ``NOTIFY_SOCKET`` value for the children (``@`` = abstract namespace, as systemd writes it)."""
        return "@" + self.name

    def _readable(self) -> None:
        for _ in range(_BATCH):
            try:
                data, ancdata, _flags, _addr = self._sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
            except (BlockingIOError, InterruptedError):
                return
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = _UCRED.unpack(payload[: _UCRED.size])[0]
            fields = dict(line.partition("=")[::2] for line in data.decode(errors="replace").splitlines() if line)
            self._handler(pid, fields)

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
