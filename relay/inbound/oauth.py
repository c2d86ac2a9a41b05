"""OAuth 2.0 client credentials (RFC 6749 §4.4, §5): the relay as Parley's ``OauthEndpoint`` (pushType 5).

``POST {auth.oauth.path}`` takes ``grant_type=client_credentials`` with the client authenticated by HTTP
Basic or by ``client_id``/``client_secret`` form fields, and answers a bearer token. Tokens are HS256 JWTs
signed with a configured secret (``kid`` names the key, so keys can rotate), carry their expiry, and are
checked by :meth:`TokenAuthority.verify` with no shared state: every relay instance with the same
configuration accepts every instance's tokens. Only ``HS256`` is accepted; ``alg: none`` and every other
algorithm are refused before any signature check.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web

from relay.config import OAuthClient, OAuthSettings
from relay.inbound.ratelimit import FailureLimiter
from relay.observability import event

ALGORITHM = "HS256"
AUDIENCE = "parley-relay:webhook"
LEEWAY = 30.0  # seconds of clock skew tolerated between the instance that minted a token and the one checking it
MAX_TOKEN_CHARS = 4096
MAX_FORM_BYTES = 8 * 1024
REALM = "parley-relay"
_NO_CACHE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1
_DUMMY_DIGEST = hashlib.sha256(b"no such client").digest()


class InvalidToken(Exception):
    """A bearer token that does not pass; ``reason`` is safe to log (never the token)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Grant:
    """An issued access token and what it grants."""

    access_token: str
    expires_in: int
    scope: tuple[str, ...]


class TokenAuthority:
    """Mints and verifies the relay's access tokens from ``auth.oauth``."""

    def __init__(self, settings: OAuthSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings, self.clock = settings, clock
        self._keys = dict(settings.signing_keys)
        self._signing_kid, self._signing_key = settings.signing_keys[0]

    def client(self, client_id: str, secret: str) -> OAuthClient | None:
        """The client if ``secret`` is its secret; the same work (one hash, one compare) for unknown ids."""
        known = self.settings.clients.get(client_id)
        presented = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        expected = known.secret_sha256 if known is not None else _DUMMY_DIGEST
        ok = hmac.compare_digest(presented, expected)
        return known if ok and known is not None else None

    def mint(self, client_id: str, scope: tuple[str, ...]) -> Grant:
        """A signed token for ``client_id`` that expires after ``token_ttl`` seconds."""
        now = int(self.clock())
        ttl = self.settings.token_ttl
        claims: dict[str, Any] = {
            "iss": self.settings.issuer, "aud": AUDIENCE, "sub": client_id, "iat": now, "nbf": now,
            "exp": now + ttl, "jti": secrets.token_urlsafe(12), "scope": " ".join(scope),
        }
        token = jwt.encode(claims, self._signing_key, algorithm=ALGORITHM,
                           headers={"kid": self._signing_kid, "typ": "at+jwt"})
        return Grant(token, ttl, scope)

    def verify(self, token: str) -> Mapping[str, Any]:
        """The token's claims; :class:`InvalidToken` unless signed by a configured key, unexpired and for us."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken("token empty or too long")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("token is not a JWT") from None
        if header.get("alg") != ALGORITHM:  # refuses alg "none" and any algorithm confusion up front
            raise InvalidToken("token algorithm not accepted")
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidToken("token signed with an unknown key id")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=self.settings.issuer,
                leeway=LEEWAY, options={"require": ["exp", "iat", "sub", "aud", "iss"]})
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token expired") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("token signature does not match") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"token claims invalid ({type(exc).__name__})") from None
        if claims.get("sub") not in self.settings.clients:
            raise InvalidToken("token client is no longer configured")
        required = self.settings.required_scope
        if required and required not in str(claims.get("scope", "")).split():
            raise InvalidToken(f"token lacks the scope {required}")
        return claims


class _OAuthError(Exception):
    def __init__(self, status: int, error: str, description: str, headers: Mapping[str, str] | None = None,
                 *, quiet: bool = False) -> None:
        super().__init__(description)
        self.status, self.error, self.description = status, error, description
        self.headers = dict(headers or {})
        self.quiet = quiet  # logged at DEBUG: one more refusal of an address already limited


def _answer(status: int, body: Mapping[str, Any], headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(dict(body), status=status, headers={**_NO_CACHE, **(headers or {})})


async def token_endpoint(request: web.Request, authority: TokenAuthority | None, limiter: FailureLimiter, *,
                         address: str, read_timeout: float, request_id: str) -> web.Response:
    """RFC 6749 §4.4 token request -> §5.1 token or §5.2 error answer (always ``no-store``)."""
    try:
        if authority is None:
            raise _OAuthError(404, "invalid_request", "OAuth is not configured on this relay")
        form = _parse_form(await _read_body(request, read_timeout), request.content_type)
        client_id, client = _authenticate_client(request.headers, form, authority, limiter, address)
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _OAuthError(400, "invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            raise _OAuthError(400, "unsupported_grant_type", "only client_credentials is supported")
        requested = tuple(dict.fromkeys((form.get("scope") or "").split()))
        if any(scope not in client.scopes for scope in requested):
            raise _OAuthError(400, "invalid_scope", "a requested scope is not granted to this client")
        grant = authority.mint(client_id, requested or client.scopes)
    except _OAuthError as exc:
        level = logging.DEBUG if exc.quiet else logging.WARNING
        event(level, "oauth token refused", request_id=request_id, status=exc.status, error=exc.error,
              reason=exc.description, peer=address)
        return _answer(exc.status, {"error": exc.error, "error_description": exc.description}, exc.headers)
    event(logging.INFO, "oauth token issued", request_id=request_id, client=client_id,
          scope=" ".join(grant.scope) or "-", expires_in=grant.expires_in)
    body: dict[str, Any] = {"access_token": grant.access_token, "token_type": "Bearer",
                            "expires_in": grant.expires_in}
    if grant.scope:
        body["scope"] = " ".join(grant.scope)
    return _answer(200, body)


async def _read_body(request: web.Request, read_timeout: float) -> bytes:
    if request.content_length is not None and request.content_length > MAX_FORM_BYTES:
        raise _OAuthError(413, "invalid_request", f"request body larger than {MAX_FORM_BYTES} bytes")
    try:
        async with asyncio.timeout(read_timeout):
            body = await request.read()
    except TimeoutError:
        raise _OAuthError(408, "invalid_request", "request body not received in time") from None
    except web.HTTPRequestEntityTooLarge:
        raise _OAuthError(413, "invalid_request", f"request body larger than {MAX_FORM_BYTES} bytes") from None
    if len(body) > MAX_FORM_BYTES:
        raise _OAuthError(413, "invalid_request", f"request body larger than {MAX_FORM_BYTES} bytes")
    return body


def _parse_form(body: bytes, content_type: str) -> dict[str, str]:
    """``application/x-www-form-urlencoded`` (RFC 6749 §4.4.2), or a flat JSON object from lenient clients."""
    try:
        text = body.decode("utf-8")
        if content_type == "application/json":
            doc = json.loads(text)
            if not isinstance(doc, dict) or not all(isinstance(v, str) for v in doc.values()):
                raise ValueError("JSON body must be an object of strings")
            pairs = list(doc.items())
        else:
            pairs = urllib.parse.parse_qsl(text, keep_blank_values=True, max_num_fields=32)
    except (ValueError, RecursionError):
        raise _OAuthError(400, "invalid_request", "request body is not a valid form") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:  # RFC 6749 §3.2: parameters must not be included more than once
            raise _OAuthError(400, "invalid_request", f"parameter {name[:40]!r} given more than once")
        if value:  # §3.2: a parameter sent without a value is treated as omitted
            form[name] = value
    return form


def _basic(header: str | None) -> tuple[str, str] | None:
    """HTTP Basic credentials (RFC 6749 §2.3.1: both parts form-urlencoded), or None without Basic."""
    scheme, _, encoded = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise _OAuthError(400, "invalid_request", "malformed Basic credentials") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise _OAuthError(400, "invalid_request", "malformed Basic credentials")
    return client_id, secret


def _authenticate_client(headers: Mapping[str, str], form: Mapping[str, str], authority: TokenAuthority,
                         limiter: FailureLimiter, address: str) -> tuple[str, OAuthClient]:
    basic = _basic(headers.get("Authorization"))
    if basic is not None and "client_secret" in form:
        raise _OAuthError(400, "invalid_request", "use one client authentication method, not two")
    candidates: list[tuple[str, str]] = []
    if basic is not None:
        client_id, secret = basic
        # Per §2.3.1 both are form-encoded; many clients skip that, so the literal form is tried too.
        candidates = list(dict.fromkeys([(urllib.parse.unquote_plus(client_id), urllib.parse.unquote_plus(secret)),
                                         (client_id, secret)]))
    elif "client_id" in form and "client_secret" in form:
        candidates = [(form["client_id"], form["client_secret"])]
    for client_id, secret in candidates:
        client = authority.client(client_id, secret)
        if client is not None:
            return client_id, client
    verdict = limiter.failed(address)
    if verdict.retry_after is not None:
        raise _OAuthError(429, "invalid_client", "too many failed client authentications; retry later",
                          {"Retry-After": str(int(verdict.retry_after))}, quiet=not verdict.first)
    reason = "client authentication failed" if candidates else "client authentication required"
    raise _OAuthError(401, "invalid_client", reason, {"WWW-Authenticate": f'Basic realm="{REALM}"'})
