"""The push types translation builds and providers send: the one vocabulary both stages speak."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

from relay.config.model import ApnsEnvironment


@dataclass(frozen=True, slots=True)
class ApnsPush:
    """One APNs request: headers as fields, ``payload`` the JSON body."""

    app: str
    device_token: str
    apns_id: str
    push_type: Literal["alert", "background"]
    priority: int
    expiration: int | None  # absolute UNIX time; None = Apple's default storage
    collapse_id: str | None
    payload: Mapping[str, Any]
    body: bytes = b""  # ``payload`` encoded, when the builder already did (it measures the size)
    # The device token's host when known (declared or learned); None: the app's environment (with fallback).
    environment: ApnsEnvironment | None = None

    @property
    def silent(self) -> bool:
        return self.push_type == "background"

    def to_environment(self, environment: ApnsEnvironment | None) -> ApnsPush:
        """This push for a device token of ``environment`` (itself when that changes nothing)."""
        return self if environment == self.environment else replace(self, environment=environment)


@dataclass(frozen=True, slots=True)
class FcmPush:
    """One FCM HTTP v1 message; ``title``/``body`` are None for a data-only (silent) message."""

    app: str
    token: str
    message_id: str
    title: str | None
    body: str | None
    image: str | None
    data: Mapping[str, str]
    priority: Literal["normal", "high"]
    ttl: int | None
    collapse_key: str | None
    channel_id: str | None

    @property
    def silent(self) -> bool:
        return self.title is None


Push = ApnsPush | FcmPush
