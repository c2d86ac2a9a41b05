"""Wake-ups from the webhook processes to the delivery processes: one datagram per accepted webhook.

Each delivery process binds an ``AF_UNIX`` datagram socket in the abstract namespace, named after the
service's main pid; a webhook process sends one byte to every delivery process after it has stored a
notification. Sending never blocks: when a receiver's buffer is full the wake-up is dropped, which costs
nothing because that receiver already has wake-ups queued (and its dispatcher polls the store anyway).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

from relay.http.errors import Handler

_RECEIVE_BATCH = 4096  # wake-ups read per loop turn at most: one claim answers them all


def wake_address(base: str, index: int) -> str:
    """The abstract socket name of delivery process ``index``."""
    return f"\0{base}.wake.{index}"


class WakeSender:
    """Wakes every delivery process; never blocks, never fails."""

    def __init__(self, base: str, deliveries: int) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._addresses = [wake_address(base, i) for i in range(deliveries)]
        self._pending = False

    def wake(self) -> None:
        """Wake every delivery process at the end of this loop turn: the webhooks answered in one turn cost
        one datagram per delivery process, not one each."""
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._pending = False
        for address in self._addresses:
            try:
                self._sock.sendto(b"w", address)
            except OSError:  # buffer full (a wake-up is pending there anyway), or that process is restarting
                pass

    def middleware(self, path: str) -> Middleware:
        """Wakes the delivery processes once a webhook on ``path`` was answered 200 (its rows are stored)."""

        @web.middleware
        async def wake_on_accept(request: web.Request, handler: Handler) -> web.StreamResponse:
            response = await handler(request)
            if response.status == 200 and request.path == path:
                self.wake()
            return response

        return wake_on_accept

    def close(self) -> None:
        self._sock.close()


class WakeReceiver:
    """The delivery side: calls ``on_wake`` once per loop turn in which wake-ups arrived."""

    def __init__(self, base: str, index: int, on_wake: Callable[[], None]) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(wake_address(base, index))
        self._sock.setblocking(False)
        self._on_wake = on_wake
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def _readable(self) -> None:
        for _ in range(_RECEIVE_BATCH):
            try:
                self._sock.recv(16)
            except (BlockingIOError, InterruptedError):
                break
        self._on_wake()

    def close(self) -> None:
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
