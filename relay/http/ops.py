"""Operations endpoints: ``/healthz`` (alive), ``/readyz`` (able to accept), ``/metrics`` (Prometheus)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from relay.errors import StoreError
from relay.running import RELAY_KEY

# Problems known outside this process (a multi-process relay: the delivery processes' app alarms).
SharedProblems = Callable[[], list[str]]
SHARED_PROBLEMS_KEY: web.AppKey[SharedProblems] = web.AppKey("shared_problems")


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: store reachable, credentials loaded, no app alarmed."""
    relay = request.app[RELAY_KEY]
    problems = relay.ready_problems
    shared = request.app.get(SHARED_PROBLEMS_KEY)
    if shared is not None:
        problems += shared()
    try:
        await asyncio.wait_for(relay.store.ping(), 2)
    except (StoreError, TimeoutError) as exc:
        problems.append(f"store: {exc or 'timeout'}")
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text format."""
    relay = request.app[RELAY_KEY]
    try:
        stats = await relay.store.stats()
        relay.metrics.queue_depth.set(stats.pending + stats.inflight)
    except StoreError:
        pass
    commits = getattr(relay.store, "commits", None)
    if commits is not None:
        relay.metrics.store_commits.set(commits)
    body = relay.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
