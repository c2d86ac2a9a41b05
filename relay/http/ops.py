"""Operations endpoints: ``/healthz`` (alive), ``/readyz`` (able to accept), ``/metrics`` (Prometheus) and
``/status`` (each app's delivery state, for monitoring: :mod:`relay.delivery.health`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from relay import __version__
from relay.delivery.health import AppHealth, problems
from relay.errors import StoreError
from relay.running import RELAY_KEY

# Problems known outside this process (a multi-process relay: the service still starting).
SharedProblems = Callable[[], list[str]]
SHARED_PROBLEMS_KEY: web.AppKey[SharedProblems] = web.AppKey("shared_problems")


async def healthz(request: web.Request) -> web.Response:
    """Alive: the event loop answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready: webhooks can be accepted and stored (this process started and not draining, the store
    reachable). Never an app's alarm or a delivery process's state: those are in /metrics, the log and the
    status (SPEC §8)."""
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
        stats = await relay.store.summary()
        relay.metrics.queue_depth.set(stats.pending + stats.inflight)
        oldest = await relay.store.oldest_waiting(list(relay.config.apps))
        now = time.time()
        for app in relay.config.apps:
            relay.metrics.oldest_waiting.labels(app).set(round(max(0.0, now - oldest[app]), 3) if app in oldest else 0)
    except StoreError:
        pass
    commits = getattr(relay.store, "commits", None)
    if commits is not None:
        relay.metrics.store_commits.set(commits)
    body = relay.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    """Each app's delivery state: circuit, alarm and reason, last success, oldest waiting delivery.

    Always 200 while the relay answers (a monitor reads ``problems``, or each app's ``delivering``); the store
    being unreachable is itself reported, with the circuits the delivery processes know.
    """
    relay = request.app[RELAY_KEY]
    now = time.time()
    store = "ok"
    try:
        apps = await asyncio.wait_for(relay.app_health(), 2)
    except (StoreError, TimeoutError) as exc:
        store = f"unavailable: {exc or 'timeout'}"
        known = relay.peer_health() if relay.peer_health is not None else relay.own_health()
        apps = {app: known.get(app) or AppHealth(app) for app in sorted(relay.config.apps)}
    found = problems(apps) + ([] if store == "ok" else [f"store {store}"])
    return web.json_response({
        "version": __version__,
        "status": "degraded" if found else "ok",
        "problems": found,
        "store": store,
        "apps": {app: health.as_dict(now) for app, health in apps.items()},
    })
