"""The benchmark's load generator: raw HTTP/1.1 keep-alive clients on asyncio (uvloop when installed).

Run as its own process by ``bench/run.py`` so that the load never shares an interpreter (or a GIL) with the
server under test. It speaks just enough HTTP/1.1 (one request in flight per connection, ``Content-Length``
answers) to cost a few microseconds per request, so that the bare-aiohttp ceiling it measures is the
server's, not the generator's.

    python bench/loadgen.py SPEC_JSON      # prints one JSON result line on stdout

SPEC keys: ``url``, ``mode`` (``closed`` | ``open``), ``connections``, ``duration``, ``warmup``, ``rate``
(open loop), ``tokens`` (list), ``kind`` (``message`` | ``event``), ``first_id``, ``headers`` (dict),
``record_sends`` (open loop: return ``[object id, send time]`` pairs for end-to-end latency).
Every request carries a Parley message with a fresh ``object.id``, so that none is a duplicate.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit


def _body_parts(kind: str) -> tuple[bytes, bytes, bytes]:
    """A Parley message body split around its ``id`` and its token, so each request is two joins."""
    doc = {
        "data": {
            "type": "message",
            "object": {
                "id": 999999999, "time": 1583243432, "image": None, "typeId": 2,
                "agent": {"id": 1, "name": "Webuildapps", "avatar": "https://example.com/avatar.png"},
                "message": "Hello! We received your photo 📷",
            },
        },
        "to": ["TOKEN"],
    }
    if kind == "event":
        doc["data"] = {"type": "event", "object": {"name": "startTyping", "body": {"agent": {"id": 999999999}}}}
    text = json.dumps(doc, ensure_ascii=False).encode()
    head, _, rest = text.partition(b"999999999")
    middle, _, tail = rest.partition(b"TOKEN")
    return head, middle, tail


class _Conn(asyncio.Protocol):
    """One keep-alive connection with at most one request outstanding."""

    def __init__(self, on_lost: Callable[[_Conn], None]) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[int] | None = None
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buffer[:end]).lower()
        start = head.find(b"content-length:")
        length = 0
        if start >= 0:
            stop = head.find(b"\r\n", start)
            length = int(head[start + 15:stop if stop >= 0 else None])
        if len(self.buffer) < end + 4 + length:
            return
        status = int(head[9:12])
        del self.buffer[:end + 4 + length]
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(0)
        self._on_lost(self)

    async def request(self, data: bytes) -> int:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.waiter


class Generator:
    """Builds requests and keeps the books (statuses, latencies, send times)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        parts = urlsplit(spec["url"])
        self.host, self.port, self.path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
        self.tokens: list[bytes] = [t.encode() for t in spec.get("tokens") or ["bench-token"]]
        self.head, self.middle, self.tail = _body_parts(spec.get("kind", "message"))
        extra = "".join(f"{k}: {v}\r\n" for k, v in (spec.get("headers") or {}).items())
        self.request_head = (f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                             f"Content-Type: application/json\r\n{extra}Content-Length: ").encode()
        self.next_id = int(spec.get("first_id", 1))
        self.statuses: Counter[int] = Counter()
        self.latencies: list[float] = []
        self.sends: list[tuple[int, float]] = []
        self.record_sends = bool(spec.get("record_sends"))
        self.counting = False

    def build(self) -> tuple[int, bytes]:
        object_id = self.next_id
        self.next_id += 1
        token = self.tokens[object_id % len(self.tokens)]
        body = b"".join((self.head, str(object_id).encode(), self.middle, token, self.tail))
        return object_id, b"".join((self.request_head, str(len(body)).encode(), b"\r\n\r\n", body))

    async def connect(self, on_lost: Callable[[_Conn], None]) -> _Conn:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(lambda: _Conn(on_lost), self.host, self.port)
        return conn

    def record(self, status: int, latency: float) -> None:
        if self.counting:
            self.statuses[status] += 1
            if status == 200:
                self.latencies.append(latency)


async def closed_loop(gen: Generator, connections: int, warmup: float, duration: float) -> float:
    """``connections`` clients, each sending its next request as soon as the last one is answered."""
    stop = False

    async def client() -> None:
        conn = await gen.connect(lambda c: None)
        while not stop:
            if conn.transport is None:
                conn = await gen.connect(lambda c: None)
            _, data = gen.build()
            sent = time.perf_counter()
            status = await conn.request(data)
            gen.record(status, time.perf_counter() - sent)
        if conn.transport is not None:
            conn.transport.close()

    tasks = [asyncio.create_task(client()) for _ in range(connections)]
    await asyncio.sleep(warmup)
    gen.counting = True
    started = time.perf_counter()
    await asyncio.sleep(duration)
    gen.counting = False
    elapsed = time.perf_counter() - started
    stop = True
    await asyncio.wait(tasks, timeout=10)
    return elapsed


async def open_loop(gen: Generator, connections: int, rate: float, warmup: float, duration: float) -> float:
    """Requests offered at ``rate``/s on a fixed schedule, whatever the answers do.

    Latency runs from the *scheduled* send time, so a stalled server cannot hide its queue (no coordinated
    omission). A request due while every connection is busy waits for one; it counts from its schedule.
    """
    idle: asyncio.Queue[_Conn] = asyncio.Queue()
    for _ in range(connections):
        idle.put_nowait(await gen.connect(lambda c: None))
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[None]] = set()

    async def one(scheduled: float) -> None:
        conn = await idle.get()
        if conn.transport is None:
            conn = await gen.connect(lambda c: None)
        object_id, data = gen.build()
        if gen.record_sends and gen.counting:
            gen.sends.append((object_id, time.time() - (time.perf_counter() - scheduled)))
        status = await conn.request(data)
        gen.record(status, time.perf_counter() - scheduled)
        idle.put_nowait(conn)

    interval = 1.0 / rate
    start = time.perf_counter()
    total = int((warmup + duration) * rate)
    counted_from = int(warmup * rate)
    for n in range(total):
        scheduled = start + n * interval
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if n == counted_from:
            gen.counting = True
        task = loop.create_task(one(scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(set(tasks), timeout=30)
    gen.counting = False
    return duration


def _percentile(ordered: list[float], p: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


async def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one load as ``spec`` says; the result is JSON-ready."""
    gen = Generator(spec)
    warmup, duration = float(spec.get("warmup", 1.0)), float(spec["duration"])
    if spec.get("mode", "closed") == "closed":
        elapsed = await closed_loop(gen, int(spec.get("connections", 64)), warmup, duration)
    else:
        elapsed = await open_loop(gen, int(spec.get("connections", 64)), float(spec["rate"]), warmup, duration)
    ordered = sorted(gen.latencies)
    return {
        "requests": sum(gen.statuses.values()),
        "ok": gen.statuses.get(200, 0),
        "statuses": {str(k): v for k, v in gen.statuses.items()},
        "elapsed": elapsed,
        "rps": gen.statuses.get(200, 0) / elapsed if elapsed else 0.0,
        "p50": _percentile(ordered, 50), "p99": _percentile(ordered, 99), "max": ordered[-1] if ordered else 0.0,
        "sends": gen.sends,
        "last_id": gen.next_id - 1,
    }


def main() -> None:
    spec = json.loads(sys.argv[1])
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(run(spec))
    else:
        result = uvloop.run(run(spec))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
