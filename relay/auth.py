"""Inbound authentication: every configured layer must pass (SPEC §3).

A layer is a :class:`Verifier`: it sees the request headers and the raw body and raises
:class:`AuthFailed` with a reason that is safe to log (never the secret or the presented value).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence
from typing import Protocol

from relay.config import AuthSettings


class AuthFailed(Exception):
    """Authentication failed; ``reason`` names the layer, never a secret."""

    def __init__(self, reason: str, *, www_authenticate: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.www_authenticate = www_authenticate


class Verifier(Protocol):
    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raise :class:`AuthFailed` unless the request passes this layer."""


class StaticHeaders:
    """Parley's "header(s)" option: each configured header must match exactly (constant time)."""

    def __init__(self, expected: Mapping[str, str]) -> None:
        self._expected = [(name, value.encode()) for name, value in expected.items()]

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        for name, value in self._expected:
            presented = headers.get(name)
            # compare_digest on bytes of any length: timing does not reveal the matching prefix.
            if presented is None or not hmac.compare_digest(presented.encode("utf-8", "surrogateescape"), value):
                raise AuthFailed(f"header {name} missing or wrong")


class Authenticator:
    """All configured layers, checked in order."""

    def __init__(self, layers: Sequence[Verifier]) -> None:
        self.layers = tuple(layers)

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        for layer in self.layers:
            layer.verify(headers, body)


def build_authenticator(settings: AuthSettings) -> Authenticator:
    """The layers the configuration asks for."""
    layers: list[Verifier] = []
    if settings.headers:
        layers.append(StaticHeaders(settings.headers))
    return Authenticator(layers)
