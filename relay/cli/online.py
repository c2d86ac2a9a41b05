"""``check-config --online``: prove the path to Apple and Google before Parley is given the URL.

For each app the relay builds its real provider (the same credentials, endpoint, CA and proxy ``serve``
uses) and sends one push to a token no device can have. FCM's provider first fetches an OAuth access token
from the service account's ``token_uri``; APNs' opens a TLS + HTTP/2 connection and signs a JWT. Any answer
about the token itself (``BadDeviceToken``, ``UNREGISTERED``, ``INVALID_ARGUMENT``, or a fake that accepts
it) proves that the host is reachable and the credentials are accepted; a refused credential, a DNS or
connection failure, or a timeout is reported with the provider's reason.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass

from relay.config import App, Config
from relay.config.model import ApnsApp
from relay.delivery.translate import translate
from relay.errors import ConfigError
from relay.inbound.parse import Agent, Message
from relay.outcome import Outcome
from relay.providers import create_provider
from relay.registry.device import Route

# Tokens no device can have: 32 zero bytes (APNs), a string outside FCM's token alphabet use.
PROBE_TOKENS = {"apns": "0" * 64, "fcm": "parley-relay-online-check-not-a-device-token"}
APPLE, GOOGLE = "api.push.apple.com", "fcm.googleapis.com"


@dataclass(frozen=True)
class OnlineResult:
    """One app's check: ``ok`` with what answered, or the reason it failed."""

    app: str
    ok: bool
    detail: str


async def check_online(config: Config) -> list[OnlineResult]:
    """Every app checked at once, each within ``delivery.send_timeout`` (plus a second to build and close)."""
    timeout = config.delivery.send_timeout
    return list(await asyncio.gather(*(check_app(app, timeout) for app in config.apps.values())))


async def check_app(app: App, timeout: float) -> OnlineResult:
    """One push to a test token through the app's real provider; see the module docstring."""
    host = app.endpoint or (APPLE if isinstance(app, ApnsApp) else GOOGLE)
    try:
        provider = await create_provider(app, timeout)
    except ConfigError as exc:
        return OnlineResult(app.name, False, "; ".join(str(p) for p in exc.problems))
    now = time.time()
    message = Message(id=int(now), type_id=2, text="parley-relay check-config --online", image=None,
                      agent=Agent(None, "parley-relay", None), time=int(now))
    push = translate(message, Route(app, PROBE_TOKENS[app.platform]), str(uuid.uuid4()), now, now + 60)
    try:
        result = await asyncio.wait_for(provider.send(push), timeout + 1)
    except TimeoutError:
        return OnlineResult(app.name, False, f"no answer from {host} within {timeout:g}s")
    finally:
        await provider.close()
    answered = f"{result.status or ''} {result.reason or 'accepted'}".strip()
    if result.outcome in (Outcome.SENT, Outcome.TOKEN_DEAD) or (
            result.outcome is Outcome.PERMANENT and "token" in result.reason.lower()):
        return OnlineResult(app.name, True, f"{host} reached, credentials accepted ({answered} for a test token)")
    return OnlineResult(app.name, False, f"{host}: {result.reason or result.outcome.value}")
