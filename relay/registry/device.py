"""The registry's values: a device entry and the route a delivery takes. Stores and handlers use these
without loading the registry file parser."""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.config import App

APNS_TOKEN_RE = re.compile(r"^[0-9a-fA-F]{64}$")


@dataclass(frozen=True, slots=True)
class Device:
    """One registry entry: the Parley push token, its app, and the provider's device token."""

    token: str
    app: str
    device_token: str


@dataclass(frozen=True, slots=True)
class Route:
    """Where one delivery goes: the app (with credentials and policy) and the provider token."""

    app: App
    device_token: str
