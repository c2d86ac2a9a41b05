"""Building the running parts of a relay, and swapping them on reload.

:func:`create_app` assembles store, registry, providers, authenticator and dispatcher behind one aiohttp
application whose ``cleanup_ctx`` opens and closes them; :func:`reload` re-reads the configuration.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping

from aiohttp import web

from relay.config import App, Config, load_config
from relay.delivery.dispatcher import Dispatcher
from relay.delivery.fits import check_fits
from relay.delivery.policy import Clock, SystemClock
from relay.errors import ConfigError, StoreError
from relay.http.app import add_routes
from relay.http.errors import errors_middleware
from relay.inbound.auth import build_authenticator
from relay.observability import Metrics, configure_trace, event
from relay.outcome import WaitReason
from relay.providers import Bounded, create_provider
from relay.registry.file import load_registry
from relay.registry.routing import Registry
from relay.running import RELAY_KEY, Relay
from relay.runtime.credentials import credential_digests, report_unchanged
from relay.runtime.snapshot import check_runnable
from relay.store import Store, create_store

ConfigLoader = Callable[[], Config]
CLOSE_GRACE = 0.5  # past the drain's deadline, the most given to closing connections (never to sends)

# What a reload can fix: credentials or topics (config errors), an app parked by its circuit (new credentials,
# new endpoint), a token without a registry entry. Deliveries waiting out a transient failure keep their backoff.
RELOAD_RELEASES = frozenset({WaitReason.CONFIG_ERROR, WaitReason.CIRCUIT_OPEN, WaitReason.UNROUTABLE})


async def reload(relay: Relay, load: ConfigLoader | None = None) -> bool:
    """Re-read the config, registry and credentials; swap them in only once every part is built (True)."""
    return await try_reload(relay, load) is None


async def try_reload(relay: Relay, load: ConfigLoader | None = None, *, release: bool = True) -> str | None:
    """:func:`reload`: None when the new configuration is in force, else why the old one stays.

    Build first (config, registry file, providers, the store's overlay, the delivery settings' policy), swap
    in one step, then retire the old parts: any failure while building leaves the running relay exactly as it
    was. ``load`` reads the configuration (default: the file ``relay.config.source`` names; a multi-process
    relay's child takes what its supervisor validated, :mod:`relay.runtime.snapshot`).
    """
    fresh: dict[str, Bounded] = {}
    try:
        config = load() if load is not None else load_config(relay.config.source)
        fits(config)
        base = load_registry(config.registry, config.apps)
        check_runnable(config)  # what the dispatcher's configure() builds after the swap, checked before it
        # Every app gets a fresh provider: a rotated key file keeps its path but not its contents. A process
        # that only takes webhooks sends nothing and builds none (see create_app).
        if relay.dispatcher is not None:
            fresh = await create_providers(config.apps, config.delivery.send_timeout)
        devices = await relay.store.device_changes(None)  # a reload also re-reads every run-time device
        auth = build_authenticator(config.auth, previous=relay.auth)  # keeps the failure counts
    except Exception as exc:  # noqa: BLE001 - whatever failed, the running configuration stays in force
        for provider in fresh.values():
            await provider.close()
        relay.metrics.reloads.labels("rejected").inc()
        why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ConfigError, OSError)) else str(exc)
        event(logging.ERROR, "reload rejected, previous configuration stays in force", error=why)
        return why
    old, relay.providers = relay.providers, fresh
    relay.registry.replace(config.apps, base)
    relay.overlay.install(devices)
    relay.config = config
    configure_trace(config.logging.trace_lines_per_second)
    relay.credentials, before = credential_digests(config), relay.credentials
    report_unchanged(before, relay.credentials)
    relay.auth = auth
    for provider in old.values():  # in-flight sends finish on the old credentials, then it closes
        task = asyncio.get_running_loop().create_task(_retire(provider))
        relay.retiring.add(task)
        task.add_done_callback(relay.retiring.discard)
    if relay.dispatcher is not None:
        relay.dispatcher.configure(config.delivery)
        # Apps whose credentials, endpoint and settings are unchanged keep their circuit (an outage goes on).
        relay.dispatcher.clear_alarms({name for name in old.keys() | fresh.keys()
                                       if name not in old or name not in fresh
                                       or old[name].built_from != fresh[name].built_from})
    released = await release_waiting(relay) if release else 0
    relay.metrics.reloads.labels("ok").inc()
    event(logging.INFO, "configuration reloaded", apps=len(config.apps), devices=len(relay.registry),
          released=released)
    return None


async def release_waiting(relay: Relay) -> int:
    """Make what waited on the old configuration (credentials, parked apps, registry entries) due now.

    A multi-process relay's children skip this in their reload (``release=False``): the supervisor asks the
    delivery processes once every process runs the new configuration, so that no process still on the old
    registry claims a released delivery and parks it again.
    """
    try:
        released = await relay.store.wake(relay.clock.now(), reasons=RELOAD_RELEASES)
    except StoreError as exc:  # they still leave at their own time (config_error_retry, the grace period)
        event(logging.WARNING, "reload applied; releasing waiting deliveries failed", error=str(exc))
        released = 0
    if relay.dispatcher is not None:
        relay.dispatcher.wake()
    return released


def fits(config: Config) -> None:
    """SPEC §5: the smallest push of every app fits its provider's limit (operator settings), else ConfigError."""
    problems = check_fits(config.apps, config.source)
    if problems:
        raise ConfigError(problems)


async def _retire(provider: Bounded) -> None:
    try:
        await provider.retire()
    except asyncio.CancelledError:  # a drain's deadline came first: close it now, briefly
        try:
            await asyncio.wait_for(provider.close(), CLOSE_GRACE)
        except TimeoutError:
            pass
        raise


def _close_reserve(relay: Relay) -> float:
    """The part of a drain kept for closing providers after the sends (a hung provider may take it all)."""
    return min(2 * CLOSE_GRACE, relay.config.shutdown_timeout / 4)


def remaining(relay: Relay) -> float:
    """Seconds left of a drain: the first phase to ask starts one ``shutdown_timeout`` for all of them."""
    now = asyncio.get_running_loop().time()
    if relay.stop_deadline is None:
        relay.stop_deadline = now + relay.config.shutdown_timeout
    return max(0.0, relay.stop_deadline - now)


async def create_providers(apps: Mapping[str, App], timeout: float) -> dict[str, Bounded]:
    """One provider per app; if any fails to build, those already built are closed."""
    _without_httpx_cli()
    created: dict[str, Bounded] = {}
    try:
        for name, app in apps.items():
            created[name] = await create_provider(app, timeout)
    except BaseException:
        for provider in created.values():
            await provider.close()
        raise
    return created


def _without_httpx_cli() -> None:
    """firebase-admin imports httpx, whose package imports its command-line client (click, rich, pygments:
    some 4 MiB in every delivery process) whenever those happen to be installed; the relay never runs it.
    A ``None`` entry in ``sys.modules`` makes that one import fail, which httpx expects and handles."""
    if "httpx" not in sys.modules:
        sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]


def create_app(config: Config, *, metrics_registry: Metrics | None = None, clock: Clock | None = None,
               store: Store | None = None, run_dispatcher: bool = True,
               accepts_webhooks: bool = True) -> web.Application:
    """The relay's aiohttp application; resources open and close with it.

    ``accepts_webhooks=False`` (a delivery process): the store's own commits need not be fsynced.
    ``run_dispatcher=False`` (a webhook process): no providers either; their credentials are the delivery
    processes' to load (and to reject), and their clients cost each process some 15 MiB.
    """
    fits(config)
    app = web.Application(client_max_size=config.webhook.max_body_bytes, middlewares=[errors_middleware])
    configure_trace(config.logging.trace_lines_per_second, fresh=True)
    relay = Relay(
        config=config,
        store=store or create_store(config.store, acknowledges=accepts_webhooks),
        registry=Registry(config.apps, load_registry(config.registry, config.apps)),
        metrics=metrics_registry or Metrics(),
        clock=clock or SystemClock(),
        auth=build_authenticator(config.auth),
    )
    relay.credentials = credential_digests(config)
    app[RELAY_KEY] = relay
    add_routes(app, config)
    app.cleanup_ctx.append(_store_ctx)
    if run_dispatcher:  # a webhook process never sends: no provider client is imported, built or connected
        app.cleanup_ctx.append(_providers_ctx)
        app.cleanup_ctx.append(_dispatcher_ctx)
    app.on_startup.append(_mark_started)
    return app


async def _mark_started(app: web.Application) -> None:
    app[RELAY_KEY].started = True


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    relay = app[RELAY_KEY]
    await relay.store.open()
    await relay.overlay.load()
    yield
    await relay.store.close()


async def _providers_ctx(app: web.Application) -> AsyncIterator[None]:
    relay = app[RELAY_KEY]
    relay.providers = await create_providers(relay.config.apps, relay.config.delivery.send_timeout)
    yield
    # The dispatcher has stopped: no send is in flight. Old providers of a reload and the current ones close
    # within what is left of the drain's deadline (a hung provider's close is cut short: we are exiting).
    if relay.retiring:
        _done, pending = await asyncio.wait(set(relay.retiring), timeout=remaining(relay) / 2)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=CLOSE_GRACE)
    closing = asyncio.gather(*(provider.close() for provider in relay.providers.values()), return_exceptions=True)
    try:
        await asyncio.wait_for(closing, max(remaining(relay), 0.1))
    except TimeoutError:
        event(logging.WARNING, "providers did not close within shutdown_timeout; leaving them")


async def _dispatcher_ctx(app: web.Application) -> AsyncIterator[None]:
    relay = app[RELAY_KEY]
    # Dispatcher.run() recovers what a crashed process left in flight first (never a live process's claims).
    dispatcher = Dispatcher(relay.store, relay.registry, lambda: relay.providers, relay.config.delivery,
                            relay.metrics, relay.clock, sync=relay.overlay)
    relay.dispatcher = dispatcher
    task = asyncio.get_running_loop().create_task(dispatcher.run(), name="dispatcher")
    yield
    relay.draining = True
    await dispatcher.stop(max(0.0, remaining(relay) - _close_reserve(relay)))
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
