"""Inbound authentication: every configured layer must pass (SPEC §3).

A layer is a :class:`Verifier`: it sees the request headers and the raw body and raises
:class:`AuthFailed` with a reason that is safe to log (never the secret or the presented value).
Layers: :class:`StaticHeaders` (``auth.headers``), :class:`Signature` (``auth.signature``) and
:class:`BearerToken` (``auth.oauth``, tokens from :mod:`relay.inbound.oauth`). :class:`Authenticator` checks them
all and counts failures per client address (:mod:`relay.inbound.ratelimit`): past the limit a failure is a 429.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from aiohttp import web

from relay.config import AuthSettings, SignatureSettings
from relay.inbound import signing
from relay.inbound.oauth import REALM, InvalidToken, TokenAuthority, token_endpoint
from relay.inbound.ratelimit import FailureLimiter, client_address
from relay.observability import event

_TIMESTAMP_RE = re.compile(r"^[0-9]{1,16}$")
_MILLISECONDS = 10**11  # a timestamp past this (year 5138 in seconds) is in milliseconds


class AuthFailed(Exception):
    """Authentication failed; ``reason`` names the layer, never a secret. ``status`` is 401, or 429 when limited."""

    def __init__(self, reason: str, *, www_authenticate: str | None = None, status: int = 401,
                 retry_after: float | None = None, quiet: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.www_authenticate = www_authenticate
        self.status = status
        self.retry_after = retry_after
        self.quiet = quiet  # an address already limited: log at DEBUG, not once per attempt


class Verifier(Protocol):
    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raise :class:`AuthFailed` unless the request passes this layer."""


class StaticHeaders:
    """Parley's "header(s)" option: each configured header must match one of its values (constant time).

    Several values per header serve a rotation: the old and the new secret both pass until the old is removed,
    so Parley never gets a non-200 (three of which delete users' push tokens) while its setting changes.
    """

    def __init__(self, expected: Mapping[str, tuple[str, ...]]) -> None:
        self._expected = [(name, tuple(v.encode() for v in values)) for name, values in expected.items()]

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        for name, values in self._expected:
            presented = headers.get(name)
            if presented is None:
                raise AuthFailed(f"header {name} missing or wrong")
            given = presented.encode("utf-8", "surrogateescape")
            # compare_digest on bytes of any length: timing reveals no matching prefix; every value is compared,
            # so it does not reveal which one matched either.
            if not any([hmac.compare_digest(given, value) for value in values]):
                raise AuthFailed(f"header {name} missing or wrong")


class Signature:
    """``auth.signature``: the header carries a signature of the raw body by any configured key (rotation).

    With ``timestamp_header`` the signed bytes are ``timestamp + "." + body`` and the timestamp must lie
    within ``tolerance`` seconds of now, so a captured request cannot be replayed later.
    """

    def __init__(self, settings: SignatureSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings, self.clock = settings, clock
        self._keys: list[signing.Key] = [
            key if settings.algorithm == "hmac-sha256" else signing.load_public_key(key, settings.algorithm)
            for key in settings.keys]

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        s = self.settings
        presented = headers.get(s.header)
        if presented is None:
            raise AuthFailed(f"signature header {s.header} missing")
        if s.prefix:
            if not presented.startswith(s.prefix):
                raise AuthFailed(f"signature header {s.header} lacks the prefix {s.prefix}")
            presented = presented[len(s.prefix):]
        try:
            signature = signing.decode(presented, s.encoding)
        except ValueError:
            raise AuthFailed(f"signature header {s.header} is not valid {s.encoding}") from None
        timestamp = self._timestamp(headers) if s.timestamp_header else None
        message = signing.signed_bytes(body, timestamp)
        if not any(signing.verify(s.algorithm, key, message, signature) for key in self._keys):
            raise AuthFailed(f"signature in {s.header} does not match the body")

    def _timestamp(self, headers: Mapping[str, str]) -> str:
        name = self.settings.timestamp_header or ""
        value = headers.get(name)
        if value is None:
            raise AuthFailed(f"timestamp header {name} missing")
        if not _TIMESTAMP_RE.match(value):
            raise AuthFailed(f"timestamp header {name} is not a Unix time")
        seconds = int(value) / 1000 if int(value) > _MILLISECONDS else int(value)
        if abs(self.clock() - seconds) > self.settings.tolerance:
            raise AuthFailed(f"timestamp in {name} outside the {self.settings.tolerance:g} s window (replay?)")
        return value


def sign_headers(settings: SignatureSettings, body: bytes, *, timestamp: int | None = None,
                 private_key: bytes | None = None) -> list[tuple[str, str]]:
    """The headers a sender puts on ``body`` (``parley-relay sign``): with HMAC the first configured secret
    (the newest, by convention), otherwise ``private_key`` (PEM). ``ValueError`` says what is missing."""
    if settings.algorithm == "hmac-sha256":
        key: bytes | signing.PrivateKey = settings.keys[0]
    elif private_key is None:
        raise ValueError(f"{settings.algorithm}: the relay only has the public key; give the private key (PEM)")
    else:
        key = signing.load_private_key(private_key, settings.algorithm)
    headers: list[tuple[str, str]] = []
    stamp: str | None = None
    if settings.timestamp_header:
        stamp = str(int(time.time()) if timestamp is None else timestamp)
        headers.append((settings.timestamp_header, stamp))
    signature = signing.sign(settings.algorithm, key, signing.signed_bytes(body, stamp))
    headers.append((settings.header, settings.prefix + signing.encode(signature, settings.encoding)))
    return headers


class BearerToken:
    """``auth.oauth``: ``Authorization: Bearer <token>`` minted by this relay (or any with the same keys)."""

    def __init__(self, authority: TokenAuthority) -> None:
        self.authority = authority

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        scheme, _, token = (headers.get("Authorization") or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthFailed("bearer token missing", www_authenticate=f'Bearer realm="{REALM}"')
        try:
            self.authority.verify(token.strip())
        except InvalidToken as exc:  # RFC 6750 §3.1: invalid_token for expired, revoked or malformed tokens
            raise AuthFailed(f"bearer token refused: {exc.reason}",
                             www_authenticate=f'Bearer realm="{REALM}", error="invalid_token"') from None


class Authenticator:
    """All configured layers, checked in order, with failures counted per client address."""

    def __init__(self, layers: Sequence[Verifier], *, oauth: TokenAuthority | None = None,
                 limiter: FailureLimiter | None = None, trusted_proxies: tuple[str, ...] = ()) -> None:
        self.layers = tuple(layers)
        self.oauth = oauth
        self.limiter = limiter or FailureLimiter(0, 60.0)
        self.trusted_proxies = trusted_proxies

    def verify(self, headers: Mapping[str, str], body: bytes) -> None:
        """Raise :class:`AuthFailed` unless every layer passes (no rate limiting)."""
        for layer in self.layers:
            layer.verify(headers, body)

    def client_address(self, remote: str | None, headers: Mapping[str, str]) -> str:
        """The address failures are counted against (see :func:`relay.ratelimit.client_address`)."""
        return client_address(remote, headers, self.trusted_proxies)

    def authenticate(self, headers: Mapping[str, str], body: bytes, remote: str | None) -> None:
        """:meth:`verify`, counting failures: past the limit they raise ``AuthFailed`` with status 429.

        Credentials are checked first, so a request that authenticates is never limited.
        """
        try:
            self.verify(headers, body)
        except AuthFailed as exc:
            verdict = self.limiter.failed(self.client_address(remote, headers))
            if verdict.retry_after is None:
                raise
            raise AuthFailed(f"{exc.reason}; too many failures from this address", status=429,
                             retry_after=verdict.retry_after, quiet=not verdict.first) from None

    async def token_endpoint(self, request: web.Request, *, read_timeout: float, request_id: str) -> web.Response:
        """Answer a token request (``auth.oauth.path``); see :func:`relay.oauth.token_endpoint`."""
        return await token_endpoint(request, self.oauth, self.limiter,
                                    address=self.client_address(request.remote, request.headers),
                                    read_timeout=read_timeout, request_id=request_id)


def build_authenticator(settings: AuthSettings, previous: Authenticator | None = None) -> Authenticator:
    """The layers the configuration asks for; ``previous`` (on reload) hands over the failure counts."""
    layers: list[Verifier] = []
    if settings.headers:
        layers.append(StaticHeaders(settings.headers))
    if settings.signature is not None:
        layers.append(Signature(settings.signature))
    authority = TokenAuthority(settings.oauth) if settings.oauth is not None else None
    if authority is not None:
        layers.append(BearerToken(authority))
    limits = settings.rate_limit
    limiter = previous.limiter if previous is not None else FailureLimiter(limits.max_failures, limits.window)
    limiter.configure(limits.max_failures, limits.window)
    if not layers:
        event(logging.WARNING, "webhook has no authentication configured: anyone can make the relay push",
              hint="configure auth.headers, auth.signature or auth.oauth")
    return Authenticator(layers, oauth=authority, limiter=limiter, trusted_proxies=limits.trusted_proxies)
