"""A fake APNs provider API: HTTP/2 over TLS on 127.0.0.1, written with `h2`, run on its own thread.

It answers like Apple's `api.push.apple.com` ("Sending notification requests to APNs" and
"Handling notification responses from APNs" in Apple's developer documentation): JWT provider
tokens (or TLS client certificates), `/3/device/<token>`, the `apns-id` echo, JSON `{"reason": ...}`
error bodies, and strict HTTP/2 flow control. Tests, `parley-relay demo` and `bench/` drive the
real `aioapns` client against it; scripted answers (`respond`, `fail_all`, `hang`, ...) provoke
every outcome the relay must classify. Two instances play Apple's two hosts: `accept_only` makes one
answer `400 BadDeviceToken` for every token it was not given, as production does for a development
build's token and the sandbox for a production one.

The server owns a private event loop on a daemon thread because the client under test runs on the
test's loop; every public method is thread-safe. `RequestLog` and `ServerThread` are shared with
`fake_fcm`.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import jwt
import trustme
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from relay.registry.device import APNS_TOKEN_RE
from relay.testing._server import RequestLog, ServerThread
from relay.testing.keys import ApnsKey, TestCA, make_ca

__all__ = ["ApnsRequest", "FakeApns", "RequestLog", "ServerThread"]

T = TypeVar("T")

# Apple: "The maximum size of a notification payload is 4 KB (4096 bytes)" for regular pushes.
MAX_PAYLOAD_BYTES = 4096
# Apple rejects provider tokens older than one hour (ExpiredProviderToken).
TOKEN_MAX_AGE_SECONDS = 3600.0
_VALID_PUSH_TYPES = frozenset(
    {"alert", "background", "voip", "complication", "fileprovider", "mdm", "liveactivity",
     "location", "pushtotalk", "controls", "widgets"}
)
_VALID_PRIORITIES = frozenset({"1", "5", "10"})


@dataclass(frozen=True)
class ApnsRequest:
    """One notification request as the fake saw it, and the answer it chose.

    `status` 0 means the fake never answered (it was hung). Recorded when the answer is chosen,
    before any configured delay.
    """

    device_token: str
    headers: dict[str, str]
    payload: dict[str, Any]
    raw: bytes
    connection_id: int
    status: int
    reason: str | None
    received_at: float
    never_indexed: frozenset[str] = frozenset()  # header names sent as HPACK never-indexed literals


@dataclass
class _Answer:
    """A scripted answer: per token (`respond`) or for every request (`fail_all`)."""

    status: int
    reason: str | None
    retry_after: int | None = None
    remaining: int | None = None  # None: forever
    until: float | None = None  # monotonic deadline, for fail_all(seconds=...)
    late: bool = False  # held until the next request for the same token (answer_late)


@dataclass
class _Stream:
    headers: dict[str, str]
    never_indexed: frozenset[str] = frozenset()
    body: bytearray = field(default_factory=bytearray)


@dataclass(frozen=True)
class _Key:
    team_id: str
    public_key: EllipticCurvePublicKey


class FakeApns:
    """A local APNs provider API. Use as a context manager or call `start()`/`stop()`."""

    def __init__(
        self,
        keys: Iterable[ApnsKey] = (),
        *,
        ca: TestCA | None = None,
        client_ca: trustme.CA | None = None,
        max_concurrent_streams: int = 1000,
        max_payload: int = MAX_PAYLOAD_BYTES,
        token_max_age: float = TOKEN_MAX_AGE_SECONDS,
    ) -> None:
        """`keys`: accepted provider-token keys; `client_ca`: require a TLS client certificate
        signed by it (such connections may omit the JWT, as with Apple's certificate auth)."""
        self.ca = ca or make_ca()
        self._client_ca = client_ca
        self.max_concurrent_streams = max_concurrent_streams
        # Seconds a new connection's first frames (the server's SETTINGS) are held back, as a slow network would:
        # a client that opens streams before it knows the server's limit then exceeds it.
        self.settings_delay = 0.0
        self.max_payload = max_payload
        self.token_max_age = token_max_age
        self._lock = threading.Lock()
        self._keys: dict[str, _Key] = {}
        self._verified: dict[str, tuple[str, float]] = {}  # jwt -> (kid, iat): skip re-verifying
        self._rules: dict[str, _Answer] = {}
        self._valid_tokens: set[str] | None = None  # None: every token is valid here
        self._too_big = 0  # the next requests answered 413 whatever their size
        self._topic: str | None = None  # the one bundle its tokens belong to (None: any)
        self._fail: _Answer | None = None
        self._hang = False
        self._delay = 0.0
        self._late: dict[str, _Answer] = {}
        self._resets = 0
        self._jwts: set[str] = set()
        self._opened = 0
        self._log: RequestLog[ApnsRequest] = RequestLog()
        self._connections: set[_ApnsConnection] = set()
        self._server: asyncio.Server | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._thread = ServerThread("fake-apns", self._setup, self._teardown)
        self.port = 0
        self.ca_file = ""
        for key in keys:
            self.add_key(key)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeApns:
        """Start listening on 127.0.0.1 (a free port) and return once ready."""
        self._tmp = tempfile.TemporaryDirectory(prefix="fake-apns-")
        self.ca_file = str(self.ca.write_ca_pem(Path(self._tmp.name) / "ca.pem"))
        self._thread.start()
        return self

    def stop(self) -> None:
        """Close the listener, send GOAWAY to every client, drop them and stop the thread."""
        self._thread.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> FakeApns:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, e.g. `https://127.0.0.1:8443`."""
        return f"https://127.0.0.1:{self.port}"

    def client_ssl_context(self) -> ssl.SSLContext:
        """An `ssl.SSLContext` trusting the fake's CA (ALPN `h2`), for the client under test."""
        return self.ca.client_context()

    # -- configuration -------------------------------------------------------------------------

    def add_key(self, key: ApnsKey) -> None:
        """Accept provider tokens signed by `key` (its `key_id` is the JWT `kid`)."""
        public_key = load_pem_public_key(key.public_pem.encode())
        if not isinstance(public_key, EllipticCurvePublicKey):
            raise ValueError("APNs keys are EC P-256 keys")
        with self._lock:
            self._keys[key.key_id] = _Key(key.team_id, public_key)

    def remove_key(self, key_id: str) -> None:
        """Stop accepting tokens signed with `key_id` (a revoked or rotated-out key)."""
        with self._lock:
            self._keys.pop(key_id, None)

    def respond(
        self, device_token: str, status: int = 410, reason: str | None = "Unregistered",
        retry_after: int | None = None, times: int | None = None,
    ) -> None:
        """Answer requests for `device_token` with `status`/`reason` (forever, or `times` times)."""
        with self._lock:
            self._rules[device_token] = _Answer(status, reason, retry_after, times)

    def accept_only(self, device_tokens: Iterable[str]) -> None:
        """From now on, only `device_tokens` are valid here: any other token is answered 400 BadDeviceToken,
        as one of Apple's hosts answers a token of the other environment. `respond` rules still come first."""
        with self._lock:
            self._valid_tokens = set(device_tokens)

    def answer_late(self, device_token: str, status: int = 410, reason: str | None = "Unregistered") -> None:
        """Hold the next request for `device_token` unanswered until another request for the same token arrives
        on that connection; then answer the held one with `status`/`reason` first, unless the client reset its
        stream meanwhile (a given-up send), and the new one as usual. Recorded with `status`/`reason`."""
        with self._lock:
            self._late[device_token] = _Answer(status, reason, late=True)

    def fail_all(
        self, status: int = 503, reason: str = "ServiceUnavailable", seconds: float | None = None,
        retry_after: int | None = None,
    ) -> None:
        """Answer every request with `status`/`reason` until `recover()` or for `seconds`."""
        until = None if seconds is None else time.monotonic() + seconds
        with self._lock:
            self._fail = _Answer(status, reason, retry_after, until=until)

    def bind_topic(self, topic: str | None) -> None:
        """From now on every token here belongs to the app `topic`: a request naming another `apns-topic` is
        answered `400 DeviceTokenNotForTopic`, as Apple answers a relay configured with another app's topic."""
        with self._lock:
            self._topic = topic

    def too_big(self, times: int = 1) -> None:
        """Answer the next `times` requests that pass every other check `413 PayloadTooLarge`, whatever their
        size: a count the relay's budget did not foresee."""
        with self._lock:
            self._too_big = times

    def recover(self) -> None:
        """Undo `fail_all`, `hang` and `set_delay`; per-token answers stay."""
        with self._lock:
            self._fail, self._hang, self._delay = None, False, 0.0

    def hang(self, on: bool = True) -> None:
        """While on, accept requests but never answer them (those stay unanswered for good)."""
        with self._lock:
            self._hang = on

    def set_delay(self, seconds: float) -> None:
        """Wait `seconds` before sending each answer."""
        with self._lock:
            self._delay = seconds

    def drop_connections(self) -> None:
        """Abort every open TCP connection abruptly (no GOAWAY, no TLS close_notify)."""
        def abort_all() -> None:
            for conn in list(self._connections):
                conn.abort()
        self._thread.run(abort_all)

    # -- records -------------------------------------------------------------------------------

    @property
    def requests(self) -> list[ApnsRequest]:
        """Every request received since start or `clear()`, oldest first."""
        return self._log.snapshot()

    def requests_since(self, start: int) -> list[ApnsRequest]:
        """The records from position ``start`` of `requests` on, without copying the ones before."""
        return self._log.since(start)

    @property
    def jwts_seen(self) -> set[str]:
        """Every distinct provider token presented."""
        with self._lock:
            return set(self._jwts)

    @property
    def streams_reset(self) -> int:
        """RST_STREAM frames received from clients (streams they gave up) since start or `clear()`."""
        with self._lock:
            return self._resets

    @property
    def connections_opened(self) -> int:
        """TLS connections accepted since start or `clear()`."""
        with self._lock:
            return self._opened

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[ApnsRequest]:
        """Block until `n` requests are recorded (in async code use `wait_for`)."""
        return self._log.wait(n, timeout)

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[ApnsRequest]:
        """Wait, without blocking the caller's loop, until `n` requests are recorded."""
        return await self._log.wait_async(n, timeout)

    def clear(self) -> None:
        """Forget recorded requests, tokens and connection counts (not the configuration)."""
        self._log.clear()
        with self._lock:
            self._jwts.clear()
            self._opened = 0
            self._resets = 0

    # -- server side (runs on the fake's loop) -----------------------------------------------

    async def _setup(self) -> None:
        ctx = self.ca.server_context(alpn=["h2"])
        if self._client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self._client_ca.configure_trust(ctx)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_connection, "127.0.0.1", 0, ssl=ctx)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _teardown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.goaway()
        # A TLS close would wait for the client's close_notify, and the client's loop may be the
        # one blocked in stop(): give GOAWAY a moment to reach the socket, then cut.
        await asyncio.sleep(0.05)
        for conn in list(self._connections):
            conn.abort()
        await asyncio.sleep(0)  # let connection_lost callbacks run before the loop closes

    def _new_connection(self) -> _ApnsConnection:
        return _ApnsConnection(self)

    def _opened_connection(self, conn: _ApnsConnection) -> int:
        self._connections.add(conn)
        with self._lock:
            self._opened += 1
            return self._opened

    def _closed_connection(self, conn: _ApnsConnection) -> None:
        self._connections.discard(conn)

    def _stream_reset(self) -> None:
        with self._lock:
            self._resets += 1

    def _decide(
        self, stream: _Stream, connection_id: int, cert_auth: bool,
    ) -> tuple[_Answer | None, float]:
        """Choose the answer to one complete request and record it; None means hang."""
        headers = stream.headers
        path = headers.get(":path", "")
        token = path.removeprefix("/3/device/") if path.startswith("/3/device/") else ""
        raw = bytes(stream.body)
        payload = _parse_json_object(raw)
        with self._lock:
            answer = (
                None if self._hang
                else self._choose(headers, path, token, raw, payload, cert_auth)
            )
            delay = self._delay
        self._log.append(ApnsRequest(
            device_token=token, headers=dict(headers), payload=payload or {}, raw=raw,
            connection_id=connection_id, status=answer.status if answer else 0,
            reason=answer.reason if answer else None, received_at=time.time(), never_indexed=stream.never_indexed,
        ))
        return answer, delay

    def _choose(
        self, headers: dict[str, str], path: str, token: str, raw: bytes,
        payload: dict[str, Any] | None, cert_auth: bool,
    ) -> _Answer:
        # Order follows what a front end would check first: routing, outage, auth, headers, body.
        if headers.get(":method") != "POST":
            return _Answer(405, "MethodNotAllowed")
        if not path.startswith("/3/device/"):
            return _Answer(404, "BadPath")
        if self._fail is not None:
            if self._fail.until is None or time.monotonic() < self._fail.until:
                return self._fail
            self._fail = None
        auth_error = self._check_provider_token(headers.get("authorization"), cert_auth)
        if auth_error is not None:
            return _Answer(403, auth_error)
        header_error = _check_headers(headers, token, cert_auth)
        if header_error is not None:
            return _Answer(400, header_error)
        body_error = self._check_body(raw, payload)
        if body_error is not None:
            return body_error
        late = self._late.pop(token, None)
        if late is not None:
            return late
        if not APNS_TOKEN_RE.fullmatch(token):
            return _Answer(400, "BadDeviceToken")  # as Apple answers a token that is not 32 bytes of hex
        rule = self._rules.get(token)
        if rule is not None:
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    del self._rules[token]
            return rule
        if self._topic is not None and headers.get("apns-topic", self._topic) != self._topic:
            return _Answer(400, "DeviceTokenNotForTopic")
        if self._valid_tokens is not None and token not in self._valid_tokens:
            return _Answer(400, "BadDeviceToken")
        return _Answer(200, None)

    def _check_body(self, raw: bytes, payload: dict[str, Any] | None) -> _Answer | None:
        if len(raw) > self.max_payload:
            return _Answer(413, "PayloadTooLarge")
        if self._too_big > 0:
            self._too_big -= 1
            return _Answer(413, "PayloadTooLarge")
        if not raw:
            return _Answer(400, "PayloadEmpty")
        if payload is None:
            # Apple documents no reason for malformed JSON; the fake names it BadPayload.
            return _Answer(400, "BadPayload")
        return None

    def _check_provider_token(self, authorization: str | None, cert_auth: bool) -> str | None:
        """Return Apple's 403 reason for a bad provider token, or None when it is acceptable."""
        if authorization is None:
            return None if cert_auth else "MissingProviderToken"
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return "InvalidProviderToken"
        self._jwts.add(token)
        cached = self._verified.get(token)
        if cached is None:
            try:
                kid, iat = self._verify_jwt(token)
            except (jwt.InvalidTokenError, KeyError, TypeError, ValueError):
                return "InvalidProviderToken"
            cached = self._verified[token] = (kid, iat)
        kid, iat = cached
        if kid not in self._keys:  # the key was revoked since
            return "InvalidProviderToken"
        now = time.time()
        if iat < now - self.token_max_age:
            return "ExpiredProviderToken"
        if iat > now + 60:
            return "InvalidProviderToken"
        return None

    def _verify_jwt(self, token: str) -> tuple[str, float]:
        header = jwt.get_unverified_header(token)
        kid = header["kid"]
        key = self._keys[kid]
        claims = jwt.decode(
            token, key.public_key, algorithms=["ES256"],
            options={"require": ["iss", "iat"], "verify_iat": False},
        )
        if claims["iss"] != key.team_id:
            raise ValueError("iss is not the key's team")
        return str(kid), float(claims["iat"])


def _parse_json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _check_headers(headers: dict[str, str], token: str, cert_auth: bool) -> str | None:
    """Apple's 400 reasons for bad request headers, in the order Apple's table lists them."""
    if not token:
        return "MissingDeviceToken"
    if "apns-id" in headers:
        try:
            uuid.UUID(headers["apns-id"])
        except ValueError:
            return "BadMessageId"
    if "apns-priority" in headers and headers["apns-priority"] not in _VALID_PRIORITIES:
        return "BadPriority"
    if "apns-expiration" in headers and not headers["apns-expiration"].isdigit():
        return "BadExpirationDate"
    if "apns-push-type" in headers and headers["apns-push-type"] not in _VALID_PUSH_TYPES:
        return "InvalidPushType"
    if not headers.get("apns-topic") and not cert_auth:  # a certificate implies its topic
        return "MissingTopic"
    return None


class _ApnsConnection(asyncio.Protocol):
    """One client connection: h2 state machine, request assembly and flow-controlled answers."""

    def __init__(self, fake: FakeApns) -> None:
        self._fake = fake
        self._transport: asyncio.Transport | None = None
        self._conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self._streams: dict[int, _Stream] = {}
        self._outbox: dict[int, bytearray] = {}  # response bodies waiting for window
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._held: dict[str, tuple[int, str, _Answer]] = {}  # token -> a late answer's stream (answer_late)
        self._id = 0
        self._cert_auth = False
        self._holding = False  # writes held back (settings_delay)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # create_server hands a Transport
        self._cert_auth = transport.get_extra_info("peercert") is not None
        self._id = self._fake._opened_connection(self)
        # Set before initiate_connection so the first SETTINGS frame carries the limit.
        self._conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._fake.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 65536,
            },
        )
        self._conn.initiate_connection()
        if self._fake.settings_delay > 0:
            self._holding = True
            asyncio.get_running_loop().call_later(self._fake.settings_delay, self._release)
        self._flush()

    def _release(self) -> None:
        self._holding = False
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        for task in self._tasks.values():
            task.cancel()
        self._tasks.clear()
        self._fake._closed_connection(self)

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()  # h2 queued a GOAWAY naming the error
            if self._transport is not None:
                self._transport.close()
            return
        for event in events:
            self._handle(event)
        self._flush()

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
            headers = {str(k): str(v) for k, v in event.headers or []}
            never = frozenset(str(h[0]) for h in event.headers or [] if not getattr(h, "indexable", True))
            self._streams[event.stream_id] = _Stream(headers, never)
        elif isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
            stream = self._streams.get(event.stream_id)
            if stream is not None and event.data is not None:
                stream.body += event.data
            # Acknowledge what *we* consumed: this is the server's own receive window.
            self._conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded) and event.stream_id is not None:
            self._request_complete(event.stream_id)
        elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self._pump()
        elif isinstance(event, h2.events.StreamReset) and event.stream_id is not None:
            self._fake._stream_reset()
            self._forget(event.stream_id)
        elif isinstance(event, h2.events.ConnectionTerminated) and self._transport is not None:
            self._transport.close()

    def _request_complete(self, stream_id: int) -> None:
        stream = self._streams.pop(stream_id, None)
        if stream is None:
            return
        answer, delay = self._fake._decide(stream, self._id, self._cert_auth)
        apns_id = stream.headers.get("apns-id") or str(uuid.uuid4()).upper()
        token = stream.headers.get(":path", "").removeprefix("/3/device/")
        held = self._held.pop(token, None)
        if held is not None:  # answer_late: the held stream is answered now, before this one
            self._answer(*held)
        if answer is not None and answer.late:
            self._held[token] = (stream_id, apns_id, answer)
            return
        if answer is None:
            return  # hung: the stream stays open until the connection goes away
        if delay <= 0:
            self._answer(stream_id, apns_id, answer)
            return
        self._tasks[stream_id] = asyncio.get_running_loop().create_task(
            self._answer_later(stream_id, apns_id, answer, delay)
        )

    async def _answer_later(
        self, stream_id: int, apns_id: str, answer: _Answer, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        self._tasks.pop(stream_id, None)
        self._answer(stream_id, apns_id, answer)
        self._flush()

    def _answer(self, stream_id: int, apns_id: str, answer: _Answer) -> None:
        headers = [(":status", str(answer.status)), ("apns-id", apns_id)]
        if answer.retry_after is not None:
            headers.append(("retry-after", str(answer.retry_after)))
        body = b""
        if answer.reason is not None:
            error: dict[str, Any] = {"reason": answer.reason}
            if answer.status == 410:
                error["timestamp"] = int(time.time() * 1000)  # Apple: ms since the epoch
            body = json.dumps(error, separators=(",", ":")).encode()
            headers.append(("content-type", "application/json"))
            headers.append(("content-length", str(len(body))))
        try:
            self._conn.send_headers(stream_id, headers, end_stream=not body)
        except h2.exceptions.ProtocolError:
            return  # the client reset the stream or the connection is closing
        if body:
            self._outbox[stream_id] = bytearray(body)
            self._pump()

    def _pump(self) -> None:
        """Send buffered bodies as far as the client's windows allow; never beyond."""
        for stream_id in list(self._outbox):
            pending = self._outbox[stream_id]
            try:
                while pending:
                    window = self._conn.local_flow_control_window(stream_id)
                    size = min(window, len(pending), self._conn.max_outbound_frame_size)
                    if size <= 0:
                        break  # wait for the client's WINDOW_UPDATE
                    chunk = bytes(pending[:size])
                    del pending[:size]
                    # END_STREAM rides on the last DATA frame: a separate empty DATA frame would
                    # reach clients (aioapns) as an empty body they try to parse.
                    self._conn.send_data(stream_id, chunk, end_stream=not pending)
            except h2.exceptions.ProtocolError:
                pending.clear()
            if not pending:
                del self._outbox[stream_id]

    def _forget(self, stream_id: int) -> None:
        self._held = {token: held for token, held in self._held.items() if held[0] != stream_id}
        self._streams.pop(stream_id, None)
        self._outbox.pop(stream_id, None)
        task = self._tasks.pop(stream_id, None)
        if task is not None:
            task.cancel()

    def _flush(self) -> None:
        if self._holding:
            return  # h2 keeps what it has to send until _release
        data = self._conn.data_to_send()
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def goaway(self) -> None:
        """Tell the client no new streams will be accepted (HTTP/2 GOAWAY, NO_ERROR)."""
        try:
            self._conn.close_connection()
        except h2.exceptions.ProtocolError:
            return
        self._flush()

    def abort(self) -> None:
        """Drop the TCP connection without any goodbye."""
        if self._transport is not None:
            self._transport.abort()
