"""A small HTTP CONNECT proxy on 127.0.0.1, on its own thread: the egress proxy of tests and the demo.

It answers ``CONNECT host:port`` (RFC 9110 §9.3.6) by opening a TCP connection to the target, replying
``200 Connection established`` and copying bytes both ways until either side closes; every other method gets
``405``. With ``credentials`` it requires ``Proxy-Authorization: Basic`` and answers ``407`` without it. Each
tunnel it opened is recorded (``tunnels``: the ``host:port`` targets, in order), so a test can prove that a
provider's traffic went through it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import threading
from types import TracebackType

from relay.testing._server import ServerThread

__all__ = ["ConnectProxy"]

MAX_HEAD = 16 * 1024


class ConnectProxy:
    """A local CONNECT proxy. Use as a context manager or call `start()`/`stop()`."""

    def __init__(self, *, credentials: tuple[str, str] | None = None) -> None:
        """`credentials`: (user, password) the proxy requires, as Basic proxy authentication."""
        self.credentials = credentials
        self.port = 0
        self._lock = threading.Lock()
        self._tunnels: list[str] = []
        self._refused: list[int] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()  # both ends of every tunnel, aborted at stop
        self._thread = ServerThread("connect-proxy", self._setup, self._teardown)

    def start(self) -> ConnectProxy:
        """Start listening on 127.0.0.1 (a free port) and return once ready."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener and every tunnel, and stop the thread."""
        self._thread.stop()

    def __enter__(self) -> ConnectProxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://[user:password@]127.0.0.1:PORT``, credentials included when the proxy requires them."""
        auth = f"{self.credentials[0]}:{self.credentials[1]}@" if self.credentials else ""
        return f"http://{auth}127.0.0.1:{self.port}"

    @property
    def tunnels(self) -> list[str]:
        """The ``host:port`` of every tunnel opened, oldest first."""
        with self._lock:
            return list(self._tunnels)

    @property
    def refused(self) -> list[int]:
        """The status of every refused request (405, 407, 502), oldest first."""
        with self._lock:
            return list(self._refused)

    async def _setup(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _teardown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:  # close() waits for unsent data a gone peer never takes: abort
            writer.transport.abort()
        await asyncio.sleep(0)  # the aborted transports' connection_lost callbacks run before the loop ends

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self._tunnel(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n"))[:MAX_HEAD].decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        method, target, _version = [*request_line.split(" "), "", "", ""][:3]
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (line.partition(":") for line in header_lines if line)}
        if method != "CONNECT":
            await self._refuse(writer, 405, "Method Not Allowed")
            return
        if self.credentials is not None:
            expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
            if headers.get("proxy-authorization") != expected:
                await self._refuse(writer, 407, "Proxy Authentication Required",
                                   'Proxy-Authenticate: Basic realm="test"\r\n')
                return
        host, _, port = target.rpartition(":")
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(host.strip("[]"), int(port))
        except (OSError, ValueError):
            await self._refuse(writer, 502, "Bad Gateway")
            return
        self._writers.add(upstream_writer)
        try:  # from here on the upstream connection is ours to close, whatever ends the tunnel
            with self._lock:
                self._tunnels.append(target)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await writer.drain()
            await asyncio.gather(_copy(reader, upstream_writer), _copy(upstream_reader, writer))
        finally:
            upstream_writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter, status: int, text: str, extra: str = "") -> None:
        with self._lock:
            self._refused.append(status)
        writer.write(f"HTTP/1.1 {status} {text}\r\n{extra}Content-Length: 0\r\n\r\n".encode())
        await writer.drain()


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until end of file, then half-close the other side (TLS close_notify and FIN pass through)."""
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            if sink.can_write_eof():
                sink.write_eof()
            else:
                sink.close()
