"""FCM provider: ``firebase-admin`` HTTP v1 (``send_each_async``) with the fixes a relay needs.

* firebase-admin refreshes its OAuth token with a blocking ``requests`` call on the event-loop thread.
  :class:`_TokenKeeper` refreshes it in a worker thread ahead of expiry, and a send never starts while the
  token is invalid, so the loop never blocks on Google's token endpoint.
* The FCM URL has no public override, and firebase-admin's own retries would hide 5xx answers from our
  retry policy: :func:`_point_messaging_at` is the one place that touches the private service object.
* ``Message(token=...)`` warns as deprecated in 7.7: the token is set as an attribute after construction.
* Concurrent sends are gathered into one ``send_each_async`` batch (up to 500) per loop iteration.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import uuid
from typing import Any

import firebase_admin
import google.auth.exceptions
import google.auth.transport.requests
import httpx
from firebase_admin import credentials, exceptions, messaging
from firebase_admin._http_client import GoogleAuthCredentialFlow

from relay.config import FcmApp
from relay.errors import ConfigError, ConfigProblem
from relay.outcome import Outcome, SendResult
from relay.push import FcmPush, Push

# send_each_async starts every request of a batch in the same event-loop turn (about 0.3 ms of CPU each in
# httpx before the first await): batches go out in slices, one per loop turn, so that webhooks waiting to be
# acknowledged are never held behind a hundred request builds.
SLICE = 16
# httpcore matches every queued request against every pooled connection (and polls each socket) on each
# request, so per-push CPU grows with the pool: 100 HTTP/1.1 connections halved throughput against 8
# (bench/README.md). Google's endpoint speaks HTTP/2, where one connection multiplexes the whole batch.
POOL_CONNECTIONS = 8
REFRESH_AHEAD = 300.0  # seconds before expiry; google-auth itself would refresh (blocking) at 225 s

# firebase-admin exception types -> what the relay does (FCM HTTP v1 "ErrorCode" reference:
# firebase.google.com/docs/reference/fcm/rest/v1/ErrorCode). Order matters: subclasses first.
FCM_ERRORS: tuple[tuple[type[Exception], Outcome], ...] = (
    (messaging.UnregisteredError, Outcome.TOKEN_DEAD),
    (messaging.SenderIdMismatchError, Outcome.TOKEN_DEAD),
    (messaging.ThirdPartyAuthError, Outcome.CONFIG_ERROR),
    (messaging.QuotaExceededError, Outcome.RETRY),
    (exceptions.UnauthenticatedError, Outcome.CONFIG_ERROR),
    (exceptions.PermissionDeniedError, Outcome.CONFIG_ERROR),
    (exceptions.NotFoundError, Outcome.CONFIG_ERROR),  # 404 without UNREGISTERED: wrong project id
    (exceptions.ResourceExhaustedError, Outcome.RETRY),
    (exceptions.UnavailableError, Outcome.RETRY),
    (exceptions.InternalError, Outcome.RETRY),
    (exceptions.DeadlineExceededError, Outcome.RETRY),
    (exceptions.UnknownError, Outcome.RETRY),
    (exceptions.AbortedError, Outcome.RETRY),
    (exceptions.CancelledError, Outcome.RETRY),
    (exceptions.InvalidArgumentError, Outcome.PERMANENT),  # unless about the token, see below
)


def _error_body(exc: exceptions.FirebaseError) -> dict[str, Any]:
    response = exc.http_response
    if response is None:
        return {}
    try:
        doc = response.json()
    except ValueError:
        return {}
    return doc.get("error", {}) if isinstance(doc, dict) else {}


def _about_token(exc: exceptions.FirebaseError) -> bool:
    for detail in _error_body(exc).get("details", []):
        for violation in detail.get("fieldViolations", []) if isinstance(detail, dict) else []:
            if "token" in str(violation.get("field", "")):
                return True
    return "registration token" in str(exc).lower()


def classify_fcm(exc: Exception | None) -> SendResult:
    """Classify one FCM send result (pure): ``None`` means sent."""
    if exc is None:
        return SendResult.sent()
    status = None
    retry_after = None
    if isinstance(exc, exceptions.FirebaseError) and exc.http_response is not None:
        status = exc.http_response.status_code
        header = exc.http_response.headers.get("retry-after")
        try:
            retry_after = float(header) if header else None
        except ValueError:
            retry_after = None
    code = getattr(exc, "code", type(exc).__name__)
    reason = f"{code}: {exc}"[:300]
    if isinstance(exc, exceptions.InvalidArgumentError) and _about_token(exc):
        return SendResult(Outcome.TOKEN_DEAD, reason, status)
    for kind, outcome in FCM_ERRORS:
        if isinstance(exc, kind):
            return SendResult(outcome, reason, status, retry_after)
    if isinstance(exc, exceptions.FirebaseError):
        return SendResult(Outcome.PERMANENT, reason, status)
    return SendResult(Outcome.RETRY, reason, status)


def classify_refresh(exc: Exception) -> SendResult:
    """An OAuth token refresh failure: bad credentials are a config error, anything else transient."""
    text = str(exc)
    if isinstance(exc, google.auth.exceptions.RefreshError) and any(
        word in text for word in ("invalid_grant", "invalid_client", "unauthorized_client", "account not found")
    ):
        return SendResult(Outcome.CONFIG_ERROR, f"OAuth token refresh refused: {text[:200]}")
    return SendResult(Outcome.RETRY, f"OAuth token refresh failed: {text[:200]}")


def _point_messaging_at(service: Any, fcm_url: str, credential: Any, verify: ssl.SSLContext | bool,
                        timeout: float) -> None:
    """The single hook into firebase-admin's private messaging service: URL and HTTP client.

    Replaces the client to (a) trust ``ca_file``, (b) drop firebase-admin's built-in retries (the
    dispatcher owns retries and must see every 5xx), keeping its Google auth flow and headers.
    """
    old = service._async_client._async_client
    service._fcm_url = fcm_url
    service._async_client._async_client = httpx.AsyncClient(
        http2=True,
        timeout=timeout,
        headers=old.headers,
        auth=GoogleAuthCredentialFlow(credential),
        transport=httpx.AsyncHTTPTransport(http2=True, verify=verify, retries=0,
                                           limits=httpx.Limits(max_connections=POOL_CONNECTIONS,
                                                               max_keepalive_connections=POOL_CONNECTIONS)),
    )


class _TokenKeeper:
    """Keeps the service account's OAuth token fresh from a worker thread."""

    def __init__(self, credential: Any) -> None:
        self._credential = credential
        self._lock = asyncio.Lock()
        self.refreshes = 0
        self.last_error: SendResult | None = None

    def _expires_in(self) -> float:
        expiry = self._credential.expiry  # naive UTC datetime, per google-auth
        if not self._credential.token or expiry is None:
            return 0.0
        return float((expiry - datetime.datetime.now(datetime.UTC).replace(tzinfo=None)).total_seconds())

    async def ensure(self) -> SendResult | None:
        """Refresh when the token is missing or near expiry; returns the failure, if any."""
        if self._expires_in() > REFRESH_AHEAD:
            return None
        async with self._lock:
            if self._expires_in() > REFRESH_AHEAD:
                return None
            request = google.auth.transport.requests.Request()
            try:
                await asyncio.to_thread(self._credential.refresh, request)
            except (google.auth.exceptions.GoogleAuthError, OSError, ValueError) as exc:
                self.last_error = classify_refresh(exc)
                return self.last_error
            self.refreshes += 1
            self.last_error = None
            return None

    async def run(self) -> None:
        """Background loop: refresh ahead of expiry, back off on failure."""
        while True:
            failure = await self.ensure()
            wait = 30.0 if failure else max(5.0, self._expires_in() - REFRESH_AHEAD)
            await asyncio.sleep(wait)


def _load_service_account(app: FcmApp) -> tuple[dict[str, Any], credentials.Certificate]:
    key = f"apps.{app.name}.service_account_file"
    try:
        info = json.loads(app.service_account_file.read_text())
        return info, credentials.Certificate(info)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError([ConfigProblem(str(app.service_account_file), key,
                                         f"not a usable service account JSON: {exc}")]) from exc


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


class FcmProvider:
    """Sends :class:`FcmPush` for one app, batching concurrent sends."""

    def __init__(self, app: FcmApp, firebase_app: firebase_admin.App, credential: Any) -> None:
        self.app = app
        self._firebase_app = firebase_app
        self.tokens = _TokenKeeper(credential)
        self._pending: list[tuple[messaging.Message, asyncio.Future[SendResult]]] = []
        self._flush_scheduled = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keeper = asyncio.get_running_loop().create_task(self.tokens.run())
        self.batches = 0

    @classmethod
    async def create(cls, app: FcmApp, timeout: float) -> FcmProvider:
        """Build the provider: firebase app, endpoint hook, first token fetched off the loop."""
        info, certificate = _load_service_account(app)
        name = f"parley-relay:{app.name}:{uuid.uuid4().hex[:8]}"
        firebase_app = firebase_admin.initialize_app(certificate, name=name)
        service = messaging._get_messaging_service(firebase_app)
        credential = firebase_app.credential.get_credential()
        base = app.endpoint or "https://fcm.googleapis.com"
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(app.ca_file)) if app.ca_file else True
        _point_messaging_at(service, f"{base}/v1/projects/{info['project_id']}/messages:send", credential, verify,
                            timeout)
        return cls(app, firebase_app, credential)

    async def send(self, push: Push) -> SendResult:
        assert isinstance(push, FcmPush)
        failure = await self.tokens.ensure()
        if failure is not None:
            return failure
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SendResult] = loop.create_future()
        self._pending.append((build_message(push), future))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending[:SLICE], self._pending[SLICE:]
        loop = asyncio.get_running_loop()
        task = loop.create_task(self._send_batch(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        if self._pending:
            loop.call_soon(self._flush)  # the next slice in the next loop turn
        else:
            self._flush_scheduled = False

    async def _send_batch(self, batch: list[tuple[messaging.Message, asyncio.Future[SendResult]]]) -> None:
        self.batches += 1
        try:
            response = await messaging.send_each_async([m for m, _ in batch], app=self._firebase_app)
            results = [classify_fcm(r.exception) for r in response.responses]
        except (exceptions.FirebaseError, httpx.HTTPError, google.auth.exceptions.GoogleAuthError, ValueError) as exc:
            cause = exc.cause if isinstance(exc, exceptions.FirebaseError) and exc.cause else exc
            result = classify_refresh(cause) if isinstance(cause, google.auth.exceptions.GoogleAuthError) else \
                classify_fcm(exc)
            results = [result] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)

    async def close(self) -> None:
        self._keeper.cancel()
        for task in list(self._tasks):
            await asyncio.wait([task], timeout=5)
        service = messaging._get_messaging_service(self._firebase_app)
        await service._async_client.aclose()
        # delete_app() calls asyncio.run() to close its client: it must not run on this loop's thread.
        await asyncio.to_thread(firebase_admin.delete_app, self._firebase_app)

