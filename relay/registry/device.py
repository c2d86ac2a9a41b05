"""The registry's values: a device entry and the route a delivery takes. Stores and handlers use these
without loading the registry file parser."""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.config import App
from relay.config.model import ApnsEnvironment

# An APNs device token is 32 bytes written as hex: the one definition (registry rules, API, check-config, fakes).
APNS_TOKEN_PATTERN = r"[0-9a-fA-F]{64}"  # noqa: S105 - a pattern, not a password
APNS_TOKEN_RE = re.compile(APNS_TOKEN_PATTERN)
# FCM registration tokens: no published grammar; observed ones are ~150-180 characters of this alphabet.
FCM_TOKEN_RE = re.compile(r"^[A-Za-z0-9_:.-]{32,4096}$")


def as_environment(value: object) -> ApnsEnvironment | None:
    """A stored or received environment name as its type; None for anything else (no environment)."""
    if value == "sandbox":
        return "sandbox"
    if value == "production":
        return "production"
    return None


def device_token_problem(app: App, device_token: str) -> str | None:
    """Why ``device_token`` cannot be a token of ``app``'s platform, or None when its shape fits.

    APNs device tokens are 32 bytes written as 64 hex characters; FCM tokens need a plausible length and
    alphabet. The one check behind the device API's ``PUT`` and ``parley-relay devices add``.
    """
    if app.platform == "apns":
        if not APNS_TOKEN_RE.fullmatch(device_token):
            return f"app {app.name!r} is APNs: the device token must be 64 hex characters"
    elif not FCM_TOKEN_RE.match(device_token):
        return (f"app {app.name!r} is FCM: the registration token must be 32 to 4096 characters "
                "of A-Z a-z 0-9 _ : . -")
    return None


@dataclass(frozen=True, slots=True)
class Device:
    """One registry entry: the Parley push token, its app, the provider's device token, and (APNs, optional)
    the environment the device token belongs to, as declared by the registry file or the device API."""

    token: str
    app: str
    device_token: str
    environment: ApnsEnvironment | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """Where one delivery goes: the app (with credentials and policy) and the provider token.

    ``environment`` is the APNs host the device token belongs to when known (declared, or learned from an
    earlier sandbox fallback); None means the app's ``environment``.
    """

    app: App
    device_token: str
    environment: ApnsEnvironment | None = None
