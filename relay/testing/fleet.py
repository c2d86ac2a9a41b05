"""Several real ``parley-relay serve`` processes on one Redis, a Parley-like load, and the books on what arrived.

Used by the multi-instance tests and ``bench/bench_redis.py`` so that both exercise the same real path:
separate processes, the Redis store, the real clients against the sandbox's fake APNs and FCM.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis

from relay.testing.process import RelayProcess, free_port
from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE, Sandbox, sample


class RedisServer:
    """A private redis-server on a free port, persisting to ``root`` with AOF ``appendfsync always``."""

    def __init__(self, root: Path, appendfsync: str = "always") -> None:
        self.root = root
        self.port = free_port()
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.root.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
             "--appendonly", "yes", "--appendfsync", self.appendfsync, "--save", "",
             "--logfile", str(self.root / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
        try:
            while True:
                try:
                    client.ping()
                    return self
                except redis.RedisError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown (nothing is flushed on the way out)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None


@dataclass
class FleetRelay:
    """One relay instance of the fleet (a main process and, multi-process, its role processes)."""

    index: int
    port: int
    launched: RelayProcess
    pids: tuple[int, ...] = ()  # the main pid and its role processes', once ready

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.launched.proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/parley/webhook"

    @property
    def consumer_prefix(self) -> tuple[str, ...]:
        """How this instance's processes name themselves in the Redis consumer group (``str.startswith``)."""
        return tuple(f"{socket.gethostname()}-{pid}-" for pid in self.pids)


class Fleet:
    """``n`` relay processes sharing one Redis store (one key prefix), all routed to the sandbox's fakes.

    ``store`` replaces the store section (e.g. a single SQLite instance as a baseline)."""

    def __init__(self, box: Sandbox, redis_url: str, prefix: str, *, claim_idle: float = 2.0,
                 delivery: dict[str, Any] | None = None, store: dict[str, Any] | None = None) -> None:
        self.box, self.redis_url, self.prefix, self.claim_idle = box, redis_url, prefix, claim_idle
        self.store = store or {"backend": "redis", "url": redis_url, "prefix": prefix, "claim_idle": claim_idle}
        self.delivery = {"backoff_initial": 0.05, "backoff_max": 0.5, **(delivery or {})}
        self.relays: list[FleetRelay] = []

    async def start(self, n: int, timeout: float = 30.0) -> Fleet:
        for index in range(n):
            port = free_port()
            config = self.box.write(
                name=f"relay-{index}.yaml",
                listen={"host": "127.0.0.1", "port": port},
                store=self.store,
                delivery=self.delivery,
                logging={"level": "WARNING"},
            )
            launched = RelayProcess(config, log=self.box.root / f"relay-{index}.log", new_session=True)
            self.relays.append(FleetRelay(index, port, launched))
        try:
            await asyncio.gather(*(self._ready(r, timeout) for r in self.relays))
        except BaseException:
            self.stop()  # the others are running: a failed start leaves no process behind
            raise
        return self

    async def _ready(self, relay: FleetRelay, timeout: float) -> None:
        await self._readyz(relay, timeout)
        relay.pids = (relay.launched.pid, *relay.launched.children().values())

    async def _readyz(self, relay: FleetRelay, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{relay.port}/readyz"
        async with aiohttp.ClientSession() as session:
            while True:
                if relay.process.poll() is not None:
                    raise RuntimeError(f"relay {relay.index} exited: {self.log_text(relay.index)[-2000:]}")
                try:
                    async with session.get(url) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"relay {relay.index} not ready: {self.log_text(relay.index)[-2000:]}")
                await asyncio.sleep(0.05)

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.relays]

    def kill(self, index: int) -> None:
        """SIGKILL one relay instance, every process of it (a crash): what it had in flight stays pending."""
        self.relays[index].launched.kill_all()

    def alive(self, index: int) -> bool:
        return self.relays[index].process.poll() is None

    def log_text(self, index: int) -> str:
        return self.relays[index].launched.log()

    def stop(self) -> list[int | None]:
        """SIGTERM every live relay (they drain) and collect the exit codes."""
        for relay in self.relays:
            if relay.process.poll() is None:
                relay.process.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for relay in self.relays:
            try:
                codes.append(relay.launched.wait(timeout=20))
            except subprocess.TimeoutExpired:
                codes.append(relay.process.returncode)
        return codes


def device_tokens(ios: int, android: int) -> dict[str, dict[str, str]]:
    """Registry entries for ``ios`` APNs devices (hex tokens) and ``android`` FCM devices."""
    devices = {hashlib.sha256(f"ios-{n}".encode()).hexdigest(): {"app": "ios"} for n in range(ios)}
    devices.update({f"fcm-{n}:APA91bH_fleet_device_{n:04d}": {"app": "android"} for n in range(android)})
    return devices


@dataclass
class Load:
    """What the webhook senders saw: acknowledged notifications (token, object id) and answer times."""

    acked: set[tuple[str, int]] = field(default_factory=set)
    statuses: Counter[int] = field(default_factory=Counter)  # 0 = no answer (connection refused, timeout)
    latencies: list[float] = field(default_factory=list)
    elapsed: float = 0.0


async def send_load(urls: Callable[[], Sequence[str]], tokens: Sequence[str], per_token: int, *,
                    give_up_after: float = 60.0, on_ack: Callable[[int], None] | None = None) -> Load:
    """Post ``per_token`` messages to each token, one at a time per token (so arrival order is defined),
    spreading them over ``urls()``; like Parley, anything but 200 is retried (on the next instance)."""
    load = Load()
    started = time.monotonic()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one_token(t: int, token: str) -> None:
            for n in range(per_token):
                object_id = t * 1_000_000 + n + 1
                body = json.dumps(sample("message", to=[token], id=object_id)).encode()
                for attempt in range(10_000):
                    targets = urls()
                    url = targets[(t + n + attempt) % len(targets)]
                    sent = time.perf_counter()
                    try:
                        async with session.post(url, data=body, headers={AUTH_HEADER: AUTH_VALUE}) as response:
                            status = response.status
                            await response.read()
                    except (aiohttp.ClientError, TimeoutError):
                        status = 0
                    load.statuses[status] += 1
                    if status == 200:
                        load.latencies.append(time.perf_counter() - sent)
                        load.acked.add((token, object_id))
                        if on_ack is not None:
                            on_ack(len(load.acked))
                        break
                    if time.monotonic() - started > give_up_after:
                        raise TimeoutError(f"no 200 for {object_id} after {attempt + 1} attempts: last {status}")
                    await asyncio.sleep(min(0.02 * (attempt + 1), 0.5))

        await asyncio.gather(*(one_token(t, token) for t, token in enumerate(tokens)))
    load.elapsed = time.monotonic() - started
    return load


def received(box: Sandbox) -> dict[str, list[int]]:
    """Per token, the object ids the fakes accepted (200), in the order they arrived."""
    seen: dict[str, list[int]] = {}
    for apns in box.apns.requests:
        if apns.status == 200 and "parley" in apns.payload:
            seen.setdefault(apns.device_token, []).append(json.loads(apns.payload["parley"])["object"]["id"])
    for fcm in box.fcm.requests:
        data = fcm.message.get("data") or {}
        if fcm.status == 200 and "parley" in data:
            seen.setdefault(fcm.message["token"], []).append(json.loads(data["parley"])["object"]["id"])
    return seen


@dataclass(frozen=True)
class Figures:
    """The books: every acknowledged notification must be delivered; duplicates are counted, not hidden."""

    accepted: int
    delivered: int
    duplicated: int
    lost: int
    out_of_order: int  # tokens whose pushes left out of webhook order (a repeat of the previous one is fine)

    def __str__(self) -> str:
        return (f"accepted={self.accepted} delivered={self.delivered} duplicated={self.duplicated} "
                f"lost={self.lost} out_of_order_tokens={self.out_of_order}")


def tally(load: Load, box: Sandbox) -> Figures:
    seen = received(box)
    delivered = {(token, oid) for token, ids in seen.items() for oid in ids}
    total = sum(len(ids) for ids in seen.values())
    out_of_order = sum(1 for ids in seen.values() if any(b < a for a, b in itertools.pairwise(ids)))
    return Figures(len(load.acked), len(load.acked & delivered), total - len(delivered),
                   len(load.acked - delivered), out_of_order)


async def wait_delivered(load: Load, box: Sandbox, timeout: float) -> Figures:
    """Poll the fakes until every acknowledged notification arrived (or ``timeout``); the final books."""
    deadline = time.monotonic() + timeout
    while True:
        figures = tally(load, box)
        if figures.lost == 0 or time.monotonic() > deadline:
            return figures
        await asyncio.sleep(0.1)


def percentiles(values: Sequence[float], points: Sequence[int] = (50, 90, 99)) -> dict[int, float]:
    """Nearest-rank percentiles (seconds)."""
    ordered = sorted(values)
    if not ordered:
        return {p: 0.0 for p in points}
    return {p: ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] for p in points}


def environment_note() -> str:
    return f"{os.cpu_count()} cpu(s), python {sys.version.split()[0]}"
