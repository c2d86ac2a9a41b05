"""FCM provider: firebase-admin's credentials and message model, sent over one aiohttp session.

firebase-admin's own send path (``send_each_async`` -> httpx -> httpcore) cost 1-3 ms of CPU per message on
the event loop that also acknowledges webhooks (bench/README.md). What the relay keeps from firebase-admin:

* the service account credential (``credentials.Certificate`` -> google-auth), refreshed by
  :class:`_TokenKeeper` in a worker thread ahead of expiry (google-auth refreshes with a blocking ``requests``
  call), one refresh at a time, so the loop never waits on Google's token endpoint;
* the message model (``messaging.Message``, ``AndroidConfig``...) and its validation and JSON encoding by
  firebase-admin's own encoder (:data:`ENCODER`, a private module: the seam is guarded by a test and the
  firebase-admin major version is pinned in pyproject.toml).

The send itself is one ``POST {endpoint}/v1/projects/{project}/messages:send`` per push on one aiohttp
session per app (a connection pool as large as the app's ``concurrency``), with the cached bearer token. A 401
about the access token refreshes it once and resends; every answer is classified from its JSON error body by
:func:`relay.providers.fcm_errors.classify_fcm`.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import platform
import ssl
import time
import urllib.parse
import urllib.request
from typing import Any

import aiohttp
import firebase_admin
import google.auth.exceptions
import google.auth.transport.requests
from firebase_admin import credentials, messaging

from relay.config import FcmApp
from relay.errors import ConfigError, ConfigProblem
from relay.outcome import Outcome, SendResult
from relay.providers.fcm_errors import classify_fcm, classify_refresh, classify_transport, token_rejected
from relay.push import FcmPush, Push

try:
    # The one private firebase-admin name the relay uses: the encoder messaging._MessagingService sends with.
    from firebase_admin._messaging_encoder import MessageEncoder
except ImportError as exc:  # pragma: no cover - only with an unsupported firebase-admin
    raise ImportError(
        f"firebase-admin {firebase_admin.__version__} no longer has firebase_admin._messaging_encoder."
        "MessageEncoder, which relay/providers/fcm.py uses to encode FCM messages: install the firebase-admin "
        "version pinned in pyproject.toml"
    ) from exc

__all__ = ["ENCODER", "FcmProvider", "build_message", "encode_request"]

ENCODER = MessageEncoder()
GOOGLE_FCM = "https://fcm.googleapis.com"
REFRESH_AHEAD = 300.0  # seconds before expiry; google-auth itself would refresh (blocking) at 225 s
# What firebase-admin sends with every FCM request (messaging._MessagingService, _http_client).
STATIC_HEADERS = {
    "Content-Type": "application/json; charset=UTF-8",
    "X-GOOG-API-FORMAT-VERSION": "2",
    "X-FIREBASE-CLIENT": f"fire-admin-python/{firebase_admin.__version__}",
    "X-GOOG-API-CLIENT": f"gl-python/{platform.python_version()} fire-admin/{firebase_admin.__version__}",
}


class _TokenKeeper:
    """Keeps the service account's OAuth token fresh from a worker thread, one refresh at a time."""

    def __init__(self, credential: Any) -> None:
        self._credential = credential
        self._lock = asyncio.Lock()
        self._fresh_until = 0.0  # monotonic: until then the token needs no look
        self.header = ""  # "Bearer <token>", rebuilt after each refresh
        self.refreshes = 0
        self.last_error: SendResult | None = None

    def _expires_in(self) -> float:
        expiry = self._credential.expiry  # naive UTC datetime, per google-auth
        if not self._credential.token or expiry is None:
            return 0.0
        return float((expiry - datetime.datetime.now(datetime.UTC).replace(tzinfo=None)).total_seconds())

    async def ensure(self) -> SendResult | None:
        """Refresh when the token is missing or near expiry; returns the failure, if any."""
        if time.monotonic() < self._fresh_until:
            return None
        async with self._lock:
            if self.header and self._expires_in() > REFRESH_AHEAD:
                return None
            return await self._refresh()

    async def refresh_rejected(self, rejected: str) -> SendResult | None:
        """FCM refused the bearer header ``rejected`` (401): refresh, unless another send already did."""
        async with self._lock:
            if self.header != rejected:
                return None
            return await self._refresh()

    async def _refresh(self) -> SendResult | None:
        request = google.auth.transport.requests.Request()
        try:
            await asyncio.to_thread(self._credential.refresh, request)
        except (google.auth.exceptions.GoogleAuthError, OSError, ValueError) as exc:
            self.last_error = classify_refresh(exc)
            return self.last_error
        self.refreshes += 1
        self.last_error = None
        self.header = f"Bearer {self._credential.token}"
        self._fresh_until = time.monotonic() + self._expires_in() - REFRESH_AHEAD
        return None

    async def run(self) -> None:
        """Background loop: refresh ahead of expiry, back off on failure."""
        while True:
            failure = await self.ensure()
            wait = 30.0 if failure else max(5.0, self._expires_in() - REFRESH_AHEAD)
            await asyncio.sleep(wait)


def _load_service_account(app: FcmApp) -> tuple[str, Any]:
    """The project id and the google-auth credential of the app's service account file."""
    key = f"apps.{app.name}.service_account_file"
    try:
        info = json.loads(app.service_account_file.read_text())
        certificate = credentials.Certificate(info)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError([ConfigProblem(str(app.service_account_file), key,
                                         f"not a usable service account JSON: {exc}")]) from exc
    if not certificate.project_id:
        raise ConfigError([ConfigProblem(str(app.service_account_file), key,
                                         "the service account JSON has no project_id")])
    return str(certificate.project_id), certificate.get_credential()


def _env_proxy(url: str) -> str | None:
    """The proxy ``HTTPS_PROXY``/``HTTP_PROXY`` name for ``url`` unless ``NO_PROXY`` exempts it, read once.

    firebase-admin's httpx client honoured these variables; aiohttp's ``trust_env`` would look them (and
    ``~/.netrc``) up in a worker thread on every request, so the provider resolves them at start instead.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def build_message(push: FcmPush) -> messaging.Message:
    """The firebase-admin ``Message`` for one push."""
    notification = None
    android_notification = None
    if not push.silent:
        notification = messaging.Notification(title=push.title, body=push.body, image=push.image)
        if push.channel_id:
            android_notification = messaging.AndroidNotification(channel_id=push.channel_id)
    android = messaging.AndroidConfig(
        priority=push.priority,
        ttl=push.ttl,
        collapse_key=push.collapse_key,
        notification=android_notification,
    )
    message = messaging.Message(data=dict(push.data), notification=notification, android=android)
    message.token = push.token  # set after construction: the constructor argument warns as deprecated
    return message


def encode_request(push: FcmPush) -> bytes:
    """The ``messages:send`` request body, encoded and validated by firebase-admin (``ValueError`` if invalid)."""
    message = ENCODER.default(build_message(push))
    return json.dumps({"message": message}, ensure_ascii=False, separators=(",", ":")).encode()


class FcmProvider:
    """Sends :class:`FcmPush` for one app: one POST per push on the app's aiohttp session."""

    def __init__(self, app: FcmApp, project_id: str, credential: Any, timeout: float) -> None:
        self.app = app
        self.url = f"{(app.endpoint or GOOGLE_FCM).rstrip('/')}/v1/projects/{project_id}/messages:send"
        self.tokens = _TokenKeeper(credential)
        self.proxy = _env_proxy(self.url)
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(app.ca_file)) if app.ca_file else True
        # HTTP/1.1 carries one request per connection at a time: the pool is as large as the sends the app may
        # have in flight (Bounded's concurrency), so that no send waits behind another's round trip to Google.
        connector = aiohttp.TCPConnector(limit=app.concurrency, ssl=verify)
        self._session = aiohttp.ClientSession(connector=connector, headers=STATIC_HEADERS,
                                              timeout=aiohttp.ClientTimeout(total=timeout))
        self._keeper = asyncio.get_running_loop().create_task(self.tokens.run())

    @classmethod
    async def create(cls, app: FcmApp, timeout: float) -> FcmProvider:
        """Build the provider; the token keeper fetches the first token off the loop."""
        project_id, credential = _load_service_account(app)
        return cls(app, project_id, credential, timeout)

    async def send(self, push: Push) -> SendResult:
        assert isinstance(push, FcmPush)
        failure = await self.tokens.ensure()
        if failure is not None:
            return failure
        try:
            body = encode_request(push)
        except ValueError as exc:  # firebase-admin's validation: resending the same push cannot help
            return SendResult(Outcome.PERMANENT, f"invalid FCM message: {exc}"[:300])
        header = self.tokens.header
        result, rejected = await self._post(body, header)
        if rejected:  # the access token was refused (revoked, or the clock is off): refresh once, resend
            failure = await self.tokens.refresh_rejected(header)
            if failure is not None:
                return failure
            result, _ = await self._post(body, self.tokens.header)
        return result

    async def _post(self, body: bytes, header: str) -> tuple[SendResult, bool]:
        """One POST; the classified answer, and whether it was a 401 about the access token."""
        try:
            async with self._session.post(self.url, data=body, headers={"Authorization": header},
                                          proxy=self.proxy) as response:
                answer = await response.read()
                status = response.status
                return classify_fcm(status, answer, response.headers), token_rejected(status, answer)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return classify_transport(exc), False

    async def close(self) -> None:
        self._keeper.cancel()
        await self._session.close()
