"""APNs provider: ``aioapns`` 4.0 with the fixes a long-running relay needs.

aioapns defects worked around here (each covered by a test):

* it never re-opens the HTTP/2 receive window, so after ~64 KiB of error bodies on one connection every
  later response stalls: :class:`_RelayProtocol` acknowledges every DATA frame;
* it writes request bodies without waiting for the server's window and raises FlowControlError once
  thousands of requests are in flight: :meth:`_RelayProtocol.send_notification` waits for WINDOW_UPDATE;
* it resolves a non-200 answer only when a body with a ``reason`` arrives, and drops ``retry-after``:
  the protocol resolves on END_STREAM with status, reason and ``retry-after``;
* it mints a provider JWT per connection (Apple allows one refresh per 20 min): one :class:`SharedJwt` per key;
* ``send_notification`` has no timeout (added by :class:`relay.providers.Bounded`), its pool retries with a
  blocking 1 s sleep (we call a connection directly and classify), the pool must be built inside the running
  loop, and ``proxy_host`` is broken (not used). The host comes from the protocol class's
  ``APNS_SERVER``/``APNS_PORT``, which is how ``endpoint`` redirects it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import jwt
from aioapns.common import NotificationRequest, NotificationResult, PushType
from aioapns.connection import (
    APNsBaseClientProtocol,
    APNsCertConnectionPool,
    APNsDevelopmentClientProtocol,
    APNsKeyConnectionPool,
    APNsProductionClientProtocol,
    AuthorizationHeaderProvider,
)
from aioapns.exceptions import ConnectionClosed
from aioapns.exceptions import ConnectionError as ApnsConnectionError
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import FlowControlError, H2Error, NoAvailableStreamIDError
from hpack import Encoder, NeverIndexedHeaderTuple

from relay.config import ApnsApp
from relay.errors import ConfigError, ConfigProblem
from relay.outcome import Outcome, SendResult
from relay.push import ApnsPush, Push

# Apple, "Handling notification responses from APNs" (developer.apple.com/documentation/usernotifications/
# handling-notification-responses-from-apns): status and reason -> what the relay does.
APNS_REASONS: Mapping[tuple[int, str], Outcome] = {
    (400, "BadDeviceToken"): Outcome.TOKEN_DEAD,
    (400, "DeviceTokenNotForTopic"): Outcome.TOKEN_DEAD,
    (400, "TopicDisallowed"): Outcome.CONFIG_ERROR,
    (400, "BadTopic"): Outcome.CONFIG_ERROR,
    (400, "MissingTopic"): Outcome.CONFIG_ERROR,
    (400, "IdleTimeout"): Outcome.RETRY,
    (403, "BadCertificate"): Outcome.CONFIG_ERROR,
    (403, "BadCertificateEnvironment"): Outcome.CONFIG_ERROR,
    (403, "ExpiredProviderToken"): Outcome.CONFIG_ERROR,
    (403, "InvalidProviderToken"): Outcome.CONFIG_ERROR,
    (403, "MissingProviderToken"): Outcome.CONFIG_ERROR,
    (403, "Forbidden"): Outcome.CONFIG_ERROR,
    (410, "Unregistered"): Outcome.TOKEN_DEAD,
    (410, "ExpiredToken"): Outcome.TOKEN_DEAD,
    (429, "TooManyProviderTokenUpdates"): Outcome.RETRY,
    (429, "TooManyRequests"): Outcome.RETRY,
    (500, "InternalServerError"): Outcome.RETRY,
    (503, "ServiceUnavailable"): Outcome.RETRY,
    (503, "Shutdown"): Outcome.RETRY,
}
# Reasons Apple may add later fall back on the status class.
APNS_STATUS: Mapping[int, Outcome] = {200: Outcome.SENT, 403: Outcome.CONFIG_ERROR, 410: Outcome.TOKEN_DEAD,
                                      429: Outcome.RETRY}

JWT_LIFETIME = 50 * 60  # Apple rejects tokens older than 1 h and throttles refreshes under 20 min


def classify_apns(status: int, reason: str | None, retry_after: float | None = None) -> SendResult:
    """Classify one APNs answer (pure)."""
    outcome = APNS_REASONS.get((status, reason or ""))
    if outcome is None:
        outcome = APNS_STATUS.get(status) or (Outcome.RETRY if status >= 500 else Outcome.PERMANENT)
    if outcome is Outcome.SENT:
        return SendResult.sent(status)
    return SendResult(outcome, f"{status} {reason or ''}".strip(), status, retry_after)


class SharedJwt(AuthorizationHeaderProvider):
    """One provider token per signing key, shared by every connection and reused until near expiry."""

    def __init__(self, key_pem: str, key_id: str, team_id: str, clock: Any = time.time) -> None:
        self._key, self._key_id, self._team_id, self._clock = key_pem, key_id, team_id, clock
        self._header: str | None = None
        self._issued_at = 0.0
        self.minted = 0

    def get_header(self) -> str:
        now = self._clock()
        if self._header is None or now - self._issued_at >= JWT_LIFETIME:
            self._issued_at = int(now)
            token = jwt.encode({"iss": self._team_id, "iat": int(now)}, self._key, algorithm="ES256",
                               headers={"kid": self._key_id})
            self._header = f"bearer {token}"
            self.minted += 1
        return self._header


class _Result(NotificationResult):
    __slots__ = ("retry_after",)

    def __init__(self, notification_id: str, status: str, reason: str | None, timestamp: int | None,
                 retry_after: float | None) -> None:
        super().__init__(notification_id, status, reason, timestamp)
        self.retry_after = retry_after


class _PlainEncoder(Encoder):
    """HPACK without Huffman coding: pure-Python Huffman was a tenth of a push's CPU for a few bytes saved."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class _RelayProtocol(APNsBaseClientProtocol):
    """aioapns' protocol with stream-level response handling and flow control in both directions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._responses: dict[int, dict[str, Any]] = {}
        self._window_waiters: list[asyncio.Future[None]] = []
        # The request headers are built here from validated values; h2 re-checking each one on every push
        # was ~10 % of the dispatcher's CPU in the drain profile (bench/README.md).
        self.conn.config.validate_outbound_headers = False
        self.conn.encoder = _PlainEncoder()  # before any header block, so both tables start empty alike

    async def send_notification(self, request: NotificationRequest) -> NotificationResult:
        """aioapns' request, but waiting for the server's flow-control window instead of raising.

        aioapns writes the body at once and raises FlowControlError when thousands of requests in flight
        exceed the window the server granted, leaving the stream half-open.
        """
        stream_id = await self.free_channels.acquire()
        # Values unique to each push are not added to HPACK's dynamic table: they would only evict the
        # ones that repeat (topic, authorization) and cost an insertion per request.
        headers: list[Any] = [
            (":method", "POST"), (":scheme", "https"),
            NeverIndexedHeaderTuple(":path", f"/3/device/{request.device_token}"),
            ("host", self.APNS_SERVER), NeverIndexedHeaderTuple("apns-id", request.notification_id),
            ("apns-topic", request.apns_topic or self.apns_topic),
        ]
        if request.time_to_live is not None:
            headers.append(NeverIndexedHeaderTuple("apns-expiration", str(int(time.time()) + request.time_to_live)))
        if request.priority is not None:
            headers.append(("apns-priority", str(request.priority)))
        if request.collapse_key is not None:
            headers.append(("apns-collapse-id", request.collapse_key))
        if request.push_type is not None:
            headers.append(("apns-push-type", request.push_type.value))
        if self.auth_provider is not None:
            headers.append(("authorization", self.auth_provider.get_header()))
        message: Any = request.message  # the pre-encoded body (bytes) from translate, or a dict
        body = message if isinstance(message, bytes) else json.dumps(message, ensure_ascii=False).encode()
        future: asyncio.Future[NotificationResult] = self.loop.create_future()
        self.requests[request.notification_id] = future
        self.request_streams[stream_id] = request.notification_id
        self.conn.send_headers(stream_id=stream_id, headers=headers)
        try:
            while self.conn.local_flow_control_window(stream_id) < len(body):
                self.flush()
                waiter: asyncio.Future[None] = self.loop.create_future()
                self._window_waiters.append(waiter)
                await waiter
        except asyncio.CancelledError:
            # Given up (send timeout) before the body left: close the half-open stream on both sides.
            self.requests.pop(request.notification_id, None)
            if self.request_streams.pop(stream_id, None) is not None:
                self.free_channels.release()
                with contextlib.suppress(H2Error):
                    self.conn.reset_stream(stream_id)
                    self.flush()
            raise
        self.conn.send_data(stream_id=stream_id, data=body, end_stream=True)
        self.flush()
        return await future

    def _window_changed(self, exc: Exception | None = None) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except H2Error:
            self.close()
            return
        for event in events:
            if isinstance(event, ResponseReceived):
                headers = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                           for k, v in event.headers or ()}
                self._responses[event.stream_id] = {"headers": headers, "body": bytearray()}
            elif isinstance(event, DataReceived):
                # The fix: give the window back, or ~64 KiB of error bodies stall the connection for good.
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_id in self._responses and event.data:
                    self._responses[event.stream_id]["body"] += event.data
            elif isinstance(event, StreamEnded):
                self._complete(event.stream_id)
            elif isinstance(event, StreamReset):
                self._fail(event.stream_id, ConnectionClosed(f"stream reset: {event.error_code}"))
            elif isinstance(event, WindowUpdated):
                self._window_changed()
            elif isinstance(event, RemoteSettingsChanged):
                self.on_remote_settings_changed(event.changed_settings)  # type: ignore[arg-type]
                self._window_changed()
            elif isinstance(event, ConnectionTerminated):
                self.on_connection_terminated(event)
        if self.transport is not None and not self.transport.is_closing():
            self.flush()

    def _complete(self, stream_id: int) -> None:
        response = self._responses.pop(stream_id, None)
        notification_id = self.request_streams.pop(stream_id, None)
        self.free_channels.release()
        future = self.requests.pop(notification_id, None) if notification_id else None
        if future is None or future.done() or response is None:
            return
        headers = response["headers"]
        reason = timestamp = None
        if response["body"]:
            try:
                doc = json.loads(bytes(response["body"]))
                reason, timestamp = doc.get("reason"), doc.get("timestamp")
            except (ValueError, AttributeError):
                reason = "UnparsableResponse"
        retry_after = _retry_after(headers.get("retry-after"))
        future.set_result(_Result(notification_id or "", headers.get(":status", "0"), reason, timestamp, retry_after))

    def _fail(self, stream_id: int, exc: Exception) -> None:
        self._responses.pop(stream_id, None)
        notification_id = self.request_streams.pop(stream_id, None)
        self.free_channels.release()
        future = self.requests.pop(notification_id, None) if notification_id else None
        if future is not None and not future.done():
            future.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        # aioapns sets exceptions on futures a timeout already cancelled (InvalidStateError): skip those.
        for stream_id in list(self.request_streams):
            self._fail(stream_id, ConnectionClosed(str(exc)))
        self._window_changed(ConnectionClosed(str(exc)))
        self.requests = {nid: f for nid, f in self.requests.items() if not f.done()}
        super().connection_lost(exc)

    def close(self) -> None:
        if self.inactivity_timer:
            self.inactivity_timer.cancel()
        if self.transport is not None:
            self.transport.close()


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def _protocol_class(app: ApnsApp) -> type[APNsBaseClientProtocol]:
    base = APNsDevelopmentClientProtocol if app.environment == "sandbox" else APNsProductionClientProtocol
    server, port = base.APNS_SERVER, base.APNS_PORT
    if app.endpoint:
        parts = urlsplit(app.endpoint)
        server, port = parts.hostname or server, parts.port or 443
    # Both names are read by aioapns when it connects and when it writes the :authority/host header.
    return type("RelayApnsProtocol", (_RelayProtocol, base), {"APNS_SERVER": server, "APNS_PORT": port})


def _ssl_context(app: ApnsApp) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(app.ca_file) if app.ca_file else None)
    context.set_alpn_protocols(["h2"])
    return context


class _KeyPool(APNsKeyConnectionPool):
    """Token-auth pool whose connections all share one :class:`SharedJwt`."""

    def __init__(self, jwt_provider: SharedJwt, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.jwt = jwt_provider

    async def create_connection(self) -> APNsBaseClientProtocol:
        def factory() -> APNsBaseClientProtocol:
            return self.protocol_class(self.apns_topic, self.loop, self.discard_connection, self.jwt)  # type: ignore[arg-type]

        return await self._create_connection(factory)


class _CertPool(APNsCertConnectionPool):
    """Certificate-auth pool (no proxy route)."""

    async def create_connection(self) -> APNsBaseClientProtocol:
        def factory() -> APNsBaseClientProtocol:
            return self.protocol_class(self.apns_topic, self.loop, self.discard_connection)  # type: ignore[arg-type]

        return await self._create_connection(factory)


def read_key(app: ApnsApp) -> str:
    """The ``.p8`` key text; errors name the file and the key."""
    assert app.key_file is not None
    try:
        text = app.key_file.read_text()
        jwt.encode({"iss": "check"}, text, algorithm="ES256")
    except (OSError, ValueError, TypeError, jwt.PyJWTError) as exc:
        raise ConfigError([ConfigProblem(str(app.key_file), f"apps.{app.name}.key_file",
                                         f"not a usable APNs .p8 (EC P-256) key: {exc}")]) from exc
    return text


class ApnsProvider:
    """Sends :class:`ApnsPush` for one app over a pool of HTTP/2 connections."""

    def __init__(self, app: ApnsApp) -> None:
        self.app = app
        common: dict[str, Any] = {
            "topic": app.topic,
            "max_connections": app.max_connections,
            "max_connection_attempts": 1,
            "use_sandbox": app.environment == "sandbox",
            "ssl_context": _ssl_context(app),
        }
        self.jwt: SharedJwt | None = None
        if app.key_file is not None:
            self.jwt = SharedJwt(read_key(app), app.key_id or "", app.team_id or "")
            self._pool: APNsKeyConnectionPool | APNsCertConnectionPool = _KeyPool(
                self.jwt, key="", key_id=app.key_id, team_id=app.team_id, **common)
        else:
            try:
                self._pool = _CertPool(cert_file=str(app.cert_file), **common)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError([ConfigProblem(str(app.cert_file), f"apps.{app.name}.cert_file",
                                                 f"not a usable client certificate: {exc}")]) from exc
        self._pool.protocol_class = _protocol_class(app)  # type: ignore[assignment]

    @property
    def connections(self) -> int:
        return len(self._pool.connections)

    async def send(self, push: Push) -> SendResult:
        assert isinstance(push, ApnsPush)
        ttl = None if push.expiration is None else max(0, int(push.expiration - time.time()))
        request = NotificationRequest(
            device_token=push.device_token,
            message=push.body or dict(push.payload),  # type: ignore[arg-type] # our protocol sends bytes as is
            notification_id=push.apns_id,
            time_to_live=ttl,
            priority=push.priority,
            collapse_key=push.collapse_id,
            push_type=PushType.ALERT if push.push_type == "alert" else PushType.BACKGROUND,
        )
        try:
            connection = await self._pool.acquire()
            result = await connection.send_notification(request)
        except ApnsConnectionError:
            return SendResult(Outcome.RETRY, "cannot connect to APNs")
        except (ConnectionClosed, NoAvailableStreamIDError, FlowControlError, OSError, H2Error) as exc:
            return SendResult(Outcome.RETRY, f"connection lost: {type(exc).__name__}")
        try:
            status = int(result.status)
        except ValueError:
            status = 0
        return classify_apns(status, result.description, getattr(result, "retry_after", None))

    async def close(self) -> None:
        connections = list(self._pool.connections)
        for connection in connections:
            if connection.inactivity_timer:
                connection.inactivity_timer.cancel()
            if connection.transport is not None:
                connection.transport.abort()  # shutting down: in-flight sends were given up by the caller
        while any(c.transport is not None and not c.transport.is_closing() for c in connections):  # noqa: ASYNC110
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # let connection_lost run before the loop may close
