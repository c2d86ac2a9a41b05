"""FCM provider: firebase-admin's credentials and message model, sent over one aiohttp session.

firebase-admin's own send path (``send_each_async`` -> httpx -> httpcore) cost 1-3 ms of CPU per message on
the event loop that also acknowledges webhooks (bench/README.md). What the relay keeps from firebase-admin:

* the service account credential (``credentials.Certificate`` -> google-auth), refreshed ahead of expiry by
  :class:`~relay.providers.fcm_token.TokenKeeper` on the credential's own thread, one shared refresh at a time
  with a short timeout, so the loop never waits on Google's token endpoint;
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
import json
import platform
import ssl
import urllib.parse
from typing import Any

import aiohttp
import firebase_admin
from firebase_admin import credentials, messaging

from relay.config import FcmApp
from relay.errors import ConfigError, ConfigProblem
from relay.outcome import Outcome, SendResult
from relay.providers.fcm_errors import classify_fcm, classify_transport, token_rejected
from relay.providers.fcm_token import TOKEN_REQUEST_TIMEOUT, TokenKeeper
from relay.providers.proxy import proxy_for
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
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"  # noqa: S105 - a URL, not a secret
# What firebase-admin sends with every FCM request (messaging._MessagingService, _http_client).
STATIC_HEADERS = {
    "Content-Type": "application/json; charset=UTF-8",
    "X-GOOG-API-FORMAT-VERSION": "2",
    "X-FIREBASE-CLIENT": f"fire-admin-python/{firebase_admin.__version__}",
    "X-GOOG-API-CLIENT": f"gl-python/{platform.python_version()} fire-admin/{firebase_admin.__version__}",
}


def _load_service_account(app: FcmApp) -> tuple[str, Any, str]:
    """The project id, the google-auth credential and the token endpoint of the app's service account file."""
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
    return str(certificate.project_id), certificate.get_credential(), str(info.get("token_uri") or GOOGLE_TOKEN_URI)


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

    def __init__(self, app: FcmApp, project_id: str, credential: Any, timeout: float, token_uri: str = GOOGLE_TOKEN_URI,
                 token_timeout: float = TOKEN_REQUEST_TIMEOUT) -> None:
        self.app = app
        self.url = f"{(app.endpoint or GOOGLE_FCM).rstrip('/')}/v1/projects/{project_id}/messages:send"
        # The environment's proxy (HTTPS_PROXY, NO_PROXY) is read once here: aiohttp's trust_env would look it (and
        # ~/.netrc) up in a worker thread on every request. The token request goes through requests, which reads
        # the environment itself; an app's own ``proxy`` is given to both.
        self.proxy = proxy_for(self.url, app.proxy)
        self.tokens = TokenKeeper(credential, app.name, token_uri, timeout=token_timeout, proxy=app.proxy)
        target = urllib.parse.urlsplit(self.url)
        self._target = (target.hostname or "FCM", target.port or (443 if target.scheme == "https" else 80))
        proxy = urllib.parse.urlsplit(self.proxy) if self.proxy else None
        self._proxy_target = (proxy.hostname or "proxy", proxy.port or 80) if proxy else None
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(app.ca_file)) if app.ca_file else True
        # HTTP/1.1 carries one request per connection at a time: the pool is as large as the sends the app may
        # have in flight (Bounded's concurrency), so that no send waits behind another's round trip to Google.
        connector = aiohttp.TCPConnector(limit=app.concurrency, ssl=verify)
        self._session = aiohttp.ClientSession(connector=connector, headers=STATIC_HEADERS,
                                              timeout=aiohttp.ClientTimeout(total=timeout))
        self._keeper = asyncio.get_running_loop().create_task(self.tokens.run())

    @classmethod
    async def create(cls, app: FcmApp, timeout: float, token_timeout: float = TOKEN_REQUEST_TIMEOUT) -> FcmProvider:
        """Build the provider; the token keeper fetches the first token off the loop."""
        project_id, credential, token_uri = _load_service_account(app)
        return cls(app, project_id, credential, timeout, token_uri, token_timeout)

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
            host, port = self._target
            if isinstance(exc, aiohttp.ClientHttpProxyError) and self._proxy_target is not None:
                host, port = self._proxy_target  # the proxy refused the tunnel
            return classify_transport(exc, host, port), False

    async def close(self) -> None:
        self._keeper.cancel()
        self.tokens.close()
        await self._session.close()
