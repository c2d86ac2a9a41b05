"""The relay's HTTP surface: which handler answers which path on which listener.

The running parts are built elsewhere (:mod:`relay.runtime.relay`); this module only routes to the
handlers, which reach those parts through :data:`relay.running.RELAY_KEY`.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from relay.config import Config, OAuthSettings
from relay.http.devices import add_api_routes
from relay.http.errors import errors_middleware
from relay.http.ops import healthz, metrics, readyz, status
from relay.http.webhook import oauth_token, webhook
from relay.running import RELAY_KEY, Relay


def add_routes(app: web.Application, config: Config) -> None:
    """The webhook listener's routes: webhook, OAuth token, health (load balancers probe it here), and by
    config ``/v1`` and (``metrics.listen: null``) metrics and status."""
    app.router.add_post(config.webhook.path, webhook)
    # Always routed (404 JSON while OAuth is off), so a reload can enable OAuth; moving its path takes a restart.
    app.router.add_post(config.auth.oauth.path if config.auth.oauth else OAuthSettings.path, oauth_token)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if config.metrics.listen is None:  # else only the operations listener serves them (create_ops_app)
        app.router.add_get("/metrics", metrics)
        app.router.add_get("/status", status)
    if config.api.listener == "webhook":
        add_api_routes(app)  # even without keys: they are read per request, so a reload can enable or rotate them


def create_ops_app(relay: Relay) -> web.Application:
    """The operations listener (``metrics.listen``): ``/metrics``, ``/status``, ``/healthz`` and ``/readyz``;
    ``relay`` is owned by the main app."""
    app = web.Application(middlewares=[errors_middleware])
    app[RELAY_KEY] = relay
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    if relay.config.api.listener == "metrics":
        add_api_routes(app)
    return app


def runner_options(config: Config) -> dict[str, Any]:
    """``web.AppRunner`` keyword arguments that stop slow clients from holding connections.

    aiohttp closes a connection whose next request's headers are not complete ``keepalive_timeout`` after
    the connection opened or the last answer (trickled headers do not extend it); the body has
    ``webhook.read_timeout`` (408). ``lingering_time`` bounds how long an unread body is drained after that.
    """
    return {"keepalive_timeout": config.listen.idle_timeout, "lingering_time": 2.0}
