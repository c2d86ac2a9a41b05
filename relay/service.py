"""Running the relay as a long-lived service: listener, signals, systemd notifications, drain.

``SIGHUP`` reloads, ``SIGTERM``/``SIGINT`` drain: stop accepting, finish in-flight requests and sends, leave
the rest stored, exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from aiohttp import web

from relay.config import Config
from relay.observability import event
from relay.outcome import EndState
from relay.server import RELAY_KEY, Relay, create_app
from relay.systemd import Notifier, inherited_sockets

SHUTDOWN_TIMEOUT = 10.0


async def serve(config: Config, *, ready: asyncio.Event | None = None, stop: asyncio.Event | None = None) -> None:
    """Serve until ``SIGTERM``/``SIGINT`` (or ``stop`` is set)."""
    notifier = Notifier()
    app = create_app(config)
    relay = app[RELAY_KEY]
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT, access_log=None)
    await runner.setup()
    sockets = inherited_sockets()
    sites: list[web.BaseSite] = []
    if sockets:
        sites = [web.SockSite(runner, sock) for sock in sockets]
    else:
        sites = [web.TCPSite(runner, config.listen.host, config.listen.port, reuse_address=True)]
    for site in sites:
        await site.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()

    async def reload() -> None:
        notifier.notify("RELOADING=1")
        await relay.reload()
        notifier.notify("READY=1")

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload()))
    watchdog = loop.create_task(notifier.watchdog_loop(lambda: _status(relay)))
    addresses = ", ".join(_describe(s) for s in sites)
    event(logging.INFO, "relay ready", listen=addresses, apps=len(config.apps), devices=len(relay.registry),
          store=config.store.backend)
    notifier.notify("READY=1", f"STATUS=listening on {addresses}")
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        event(logging.INFO, "relay stopping: draining in-flight requests and sends")
        notifier.notify("STOPPING=1", "STATUS=draining")
        relay.draining = True
        watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
        event(logging.INFO, "relay stopped")


def _describe(site: web.BaseSite) -> str:
    server = getattr(site, "_server", None)
    sockets: list[socket.socket] = list(getattr(server, "sockets", []) or [])
    return ",".join(f"{s.getsockname()[0]}:{s.getsockname()[1]}" for s in sockets) or site.name


async def _status(relay: Relay) -> str:
    try:
        stats = await relay.store.stats()
    except Exception:  # noqa: BLE001 - a status line must never fail the watchdog
        return "STATUS=store unavailable"
    sent = stats.ended.get(EndState.SENT, 0)
    return f"STATUS=queue {stats.pending + stats.inflight}, sent {sent}, accepted {stats.accepted}"
