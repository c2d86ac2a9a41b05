"""Shared fixtures: a sandbox of fake providers with config files, and a relay under test on top of it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient

from relay.config import load_config
from relay.http.app import create_ops_app
from relay.running import RELAY_KEY, Relay
from relay.runtime.relay import create_app
from relay.testing.process import NotifySocket, listening_socket
from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE, Sandbox

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
# CI (and anyone who sets CI=true) runs on a machine kind that provides Redis and systemd-analyze: there a test
# that would skip for a missing part fails instead, so CI never passes by skipping. Only skips that depend on
# the kernel, not on the machine's packages, stay skips.
STRICT = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ALLOWED_SKIPS = ("this kernel has no",)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Under CI, turn a skip for a missing service or tool into a failure that names it."""
    report = yield
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[2]) if isinstance(report.longrepr, tuple) else str(report.longrepr)
        if not any(allowed in reason for allowed in ALLOWED_SKIPS):
            report.outcome = "failed"
            report.longrepr = f"skipped under CI=true, where every part must be present: {reason}"
    return report


@functools.cache
def redis_unavailable() -> str | None:
    """Why the Redis at ``REDIS_URL`` cannot be used (a skip reason), or None when it answers."""
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        return f"no Redis answers at REDIS_URL={REDIS_URL}: {exc}"
    return None


@contextlib.contextmanager
def redis_keyspace(name: str) -> Iterator[str]:
    """A fresh key prefix on the Redis at ``REDIS_URL`` (the test skips, or fails under CI, when none answers);
    every key under it is deleted afterwards."""
    if reason := redis_unavailable():
        pytest.skip(reason)
    prefix = f"test-{name}-{uuid.uuid4().hex[:12]}"
    try:
        yield prefix
    finally:
        delete_redis_keys(f"{prefix}:")


def delete_redis_keys(prefix: str) -> None:
    """Delete every key of the Redis at ``REDIS_URL`` that starts with ``prefix``."""
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


async def wait_until(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 20.0) -> None:
    """Wait for a condition (plain or async, checked every 10 ms), failing after ``timeout``."""
    async with asyncio.timeout(timeout):
        while True:
            met = condition()
            if await met if inspect.isawaitable(met) else met:
                return
            await asyncio.sleep(0.01)


@pytest.fixture
def notify() -> Iterator[NotifySocket]:
    """A ``$NOTIFY_SOCKET`` standing in for systemd: every datagram a relay process sends to it."""
    with NotifySocket() as sock:
        yield sock


@pytest.fixture
def webhook_socket() -> Iterator[socket.socket]:
    """The listening socket the harness holds, as systemd holds a .socket unit's."""
    with listening_socket() as sock:
        yield sock


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    """Fake APNs + fake FCM on their own threads, credentials and config files in ``tmp_path``."""
    box = Sandbox.start(tmp_path / "sandbox")
    try:
        yield box
    finally:
        box.stop()


@dataclass
class RelayUnderTest:
    """A running relay app (real store, real providers against the fakes) and its test client."""

    client: TestClient[web.Request, web.Application]
    app: web.Application
    ops: TestClient[web.Request, web.Application]  # the operations listener: /metrics, /status, health

    @property
    def relay(self) -> Relay:
        return self.app[RELAY_KEY]

    async def post(self, doc: Any = None, *, raw: bytes | None = None, headers: dict[str, str] | None = None,
                   auth: bool = True) -> tuple[int, Any]:
        """POST a webhook (JSON ``doc`` or ``raw`` bytes); returns status and decoded JSON answer."""
        all_headers = {AUTH_HEADER: AUTH_VALUE} if auth else {}
        all_headers.update(headers or {})
        path = self.relay.config.webhook.path
        if raw is not None:
            response = await self.client.post(path, data=raw, headers=all_headers)
        else:
            response = await self.client.post(path, json=doc, headers=all_headers)
        return response.status, await response.json()

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until nothing is pending or in flight in the store."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = await self.relay.store.stats()
            if stats.pending == 0 and stats.inflight == 0:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"relay did not settle: {await self.relay.store.stats()}")


MakeRelay = Callable[..., Awaitable[RelayUnderTest]]


@pytest.fixture
async def make_relay(sandbox: Sandbox, aiohttp_client: Any) -> AsyncIterator[MakeRelay]:
    """Factory: ``await make_relay(**config_overrides)`` starts a relay on a sandbox config."""

    async def make(devices: dict[str, dict[str, str]] | None = None, routing: list[dict[str, str]] | None = None,
                   name: str = "relay.yaml", **overrides: Any) -> RelayUnderTest:
        path = sandbox.write(name, devices=devices, routing=routing, **overrides)
        app = create_app(load_config(path))
        client = await aiohttp_client(app)
        ops = await aiohttp_client(create_ops_app(app[RELAY_KEY]))
        return RelayUnderTest(client, app, ops)

    yield make
