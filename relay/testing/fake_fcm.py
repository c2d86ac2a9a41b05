"""A fake FCM HTTP v1 API and Google OAuth 2.0 token endpoint, on plain HTTP, on its own thread.

`POST /token` implements the JWT-bearer grant that google-auth performs for service accounts
(RFC 7523 §2.1; Google's "Using OAuth 2.0 for Server to Server Applications"), and
`POST /v1/projects/{project}/messages:send` answers like `fcm.googleapis.com`, error bodies in
google.rpc.Status shape with an `FcmError` detail ("FCM v1 ErrorCode" reference). Tests,
`parley-relay demo` and `bench/` drive the real `firebase-admin` client against it.

It runs on a private loop and thread: firebase-admin refreshes its token with a blocking
`requests` call made from inside the caller's event loop, so a token endpoint served by that same
loop could never answer.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from relay.testing._server import RequestLog, ServerThread
from relay.testing.keys import ServiceAccount, TestCA, make_service_account

__all__ = ["FCM_ERRORS", "FakeFcm", "FcmRequest", "payload_size"]

JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
# google-auth always signs `aud` = Google's endpoint, whatever the account's `token_uri` says
# (google/oauth2/service_account.py), so the fake accepts that audience besides its own URI.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
_FCM_ERROR_TYPE = "type.googleapis.com/google.firebase.fcm.v1.FcmError"
_BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest"

# FCM v1 ErrorCode -> (HTTP status, google.rpc code name, the message FCM sends).
FCM_ERRORS: Mapping[str, tuple[int, str, str]] = {
    "UNREGISTERED": (404, "NOT_FOUND", "Requested entity was not found."),
    "INVALID_ARGUMENT": (
        400, "INVALID_ARGUMENT", "The registration token is not a valid FCM registration token"
    ),
    "SENDER_ID_MISMATCH": (403, "PERMISSION_DENIED", "SenderId mismatch"),
    "QUOTA_EXCEEDED": (429, "RESOURCE_EXHAUSTED", "Quota exceeded for the device."),
    "UNAVAILABLE": (503, "UNAVAILABLE", "The service is currently unavailable."),
    "INTERNAL": (500, "INTERNAL", "Internal error encountered."),
    "THIRD_PARTY_AUTH_ERROR": (401, "UNAUTHENTICATED", "Auth error from APNS or Web Push Service"),
}
_RPC_STATUS = {
    400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE",
}
_UNAUTHENTICATED = (
    "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
    "cookie or other valid authentication credential."
)
# FCM: "Maximum payload for both message types is 4096 bytes" ("Firebase Cloud Messaging message types"): a
# notification message's payload is its notification fields plus its data. Counted as SPEC §5 states it: the
# UTF-8 bytes of the data keys and values plus the notification's keys and values.
MAX_DATA_BYTES = 4096


@dataclass(frozen=True)
class FcmRequest:
    """One `messages:send` call as the fake saw it and the answer it chose (status 0: hung)."""

    project: str
    message: dict[str, Any]
    headers: dict[str, str]
    status: int
    error_code: str | None
    received_at: float
    validate_only: bool = False
    peer: str = ""  # the client's "host:port": which connection carried the request


@dataclass
class _Answer:
    status: int
    error_code: str | None = None
    message: str | None = None
    retry_after: int | None = None
    remaining: int | None = None  # None: forever
    until: float | None = None  # monotonic deadline, for fail_all(seconds=...)
    field: str | None = None  # BadRequest field violation, for INVALID_ARGUMENT


class FakeFcm:
    """A local FCM v1 + OAuth token server. Use as a context manager or `start()`/`stop()`."""

    def __init__(
        self, *, token_lifetime: int = 3600, token_delay: float = 0.0,
        max_data_bytes: int = MAX_DATA_BYTES, tls: TestCA | None = None, count_json: bool = False,
    ) -> None:
        """`token_lifetime`: `expires_in` of issued tokens; `token_delay`: `/token` latency;
        `tls`: serve HTTPS with this CA's `127.0.0.1` certificate (Google's endpoints are HTTPS);
        `count_json`: count the limit over the notification and data in JSON form (braces, quotes and escapes
        included), one way Google might count it, instead of keys and values."""
        self.tls = tls
        self.count_json = count_json
        self._too_big = 0
        self._project: str | None = None  # the project its tokens belong to (None: any)
        self.token_lifetime = token_lifetime
        self.token_delay = token_delay
        self.max_data_bytes = max_data_bytes
        self.port = 0
        self._lock = threading.Lock()
        self._accounts: dict[str, list[RSAPublicKey]] = {}
        self._tokens: dict[str, float] = {}  # access token -> expiry (epoch seconds)
        self._token_requests = 0
        self._tokens_in_flight = 0
        self._tokens_in_flight_peak = 0
        self._rules: dict[str, _Answer] = {}
        self._fail: _Answer | None = None
        self._hang = False
        self._delay = 0.0
        self._log: RequestLog[FcmRequest] = RequestLog()
        self._runner: web.AppRunner | None = None
        self._thread = ServerThread("fake-fcm", self._setup, self._teardown)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FakeFcm:
        """Start listening on 127.0.0.1 (a free port) and return once ready."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (hung requests are cancelled) and join the thread."""
        self._thread.stop()

    def __enter__(self) -> FakeFcm:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, e.g. `http://127.0.0.1:9000` (`https://` with `tls`)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def token_uri(self) -> str:
        """The OAuth token endpoint, to put in a service account's `token_uri`."""
        return f"{self.url}/token"

    def send_url(self, project: str) -> str:
        """The `messages:send` URL for `project` (firebase-admin's `_fcm_url`)."""
        return f"{self.url}/v1/projects/{project}/messages:send"

    # -- configuration -------------------------------------------------------------------------

    def register_service_account(self, public_pem: str, client_email: str) -> None:
        """Accept token-grant assertions from `client_email` signed by this key (keys add up)."""
        key = load_pem_public_key(public_pem.encode())
        if not isinstance(key, RSAPublicKey):
            raise ValueError("service-account keys are RSA keys")
        with self._lock:
            self._accounts.setdefault(client_email, []).append(key)

    def unregister_service_account(self, client_email: str) -> None:
        """Forget an account: its next token grant fails with `invalid_grant`."""
        with self._lock:
            self._accounts.pop(client_email, None)

    def make_service_account(self, project_id: str = "demo-project") -> ServiceAccount:
        """Create a service account that mints tokens here, already registered."""
        account = make_service_account(self.token_uri, project_id)
        self.register_service_account(account.public_pem, account.client_email)
        return account

    def revoke_tokens(self) -> None:
        """Invalidate every issued access token (sends then get 401 until a new grant)."""
        with self._lock:
            self._tokens.clear()

    def respond(
        self, token: str, status: int | None = None, error_code: str = "UNREGISTERED",
        message: str | None = None, times: int | None = None, retry_after: int | None = None,
    ) -> None:
        """Answer sends to `token` with FCM's `error_code` (forever, or `times` times).

        `status` defaults to the code's status in `FCM_ERRORS`; `status=200` scripts success.
        """
        answer = _Answer(
            status or FCM_ERRORS.get(error_code, (500,))[0], error_code, message, retry_after,
            times, field="message.token" if error_code == "INVALID_ARGUMENT" else None,
        )
        with self._lock:
            self._rules[token] = answer

    def fail_all(
        self, status: int | None = None, error_code: str | None = "UNAVAILABLE",
        seconds: float | None = None, retry_after: int | None = None, message: str | None = None,
    ) -> None:
        """Answer every send with `error_code` until `recover()` or for `seconds`.

        `error_code=None` answers a plain google.rpc.Status (no FcmError detail), e.g. `status=401`.
        """
        until = None if seconds is None else time.monotonic() + seconds
        status = status or FCM_ERRORS.get(error_code or "", (503,))[0]
        with self._lock:
            self._fail = _Answer(status, error_code, message, retry_after, until=until)

    def bind_project(self, project: str | None) -> None:
        """From now on every token here belongs to the Firebase project `project`: a send through another
        project is answered `403 SENDER_ID_MISMATCH`, as FCM answers a service account of another project."""
        with self._lock:
            self._project = project

    def too_big(self, times: int = 1) -> None:
        """Answer the next `times` sends that pass every other check `400 INVALID_ARGUMENT "Message is too big"`,
        whatever their size: a count of Google's that the relay's budget did not foresee."""
        with self._lock:
            self._too_big = times

    def recover(self) -> None:
        """Undo `fail_all`, `hang` and `set_delay`; per-token answers stay."""
        with self._lock:
            self._fail, self._hang, self._delay = None, False, 0.0

    def hang(self, on: bool = True) -> None:
        """While on, accept sends but never answer them."""
        with self._lock:
            self._hang = on

    def set_delay(self, seconds: float) -> None:
        """Wait `seconds` before answering each send."""
        with self._lock:
            self._delay = seconds

    # -- records -------------------------------------------------------------------------------

    @property
    def requests(self) -> list[FcmRequest]:
        """Every `messages:send` call since start or `clear()`, oldest first."""
        return self._log.snapshot()

    def requests_since(self, start: int) -> list[FcmRequest]:
        """The records from position ``start`` of `requests` on, without copying the ones before."""
        return self._log.since(start)

    @property
    def token_requests(self) -> int:
        """Calls of the token endpoint since start or `clear()`, failed ones included."""
        with self._lock:
            return self._token_requests

    @property
    def token_requests_in_flight(self) -> int:
        """Token-endpoint calls being answered right now (e.g. held by `token_delay`)."""
        with self._lock:
            return self._tokens_in_flight

    @property
    def token_requests_peak(self) -> int:
        """The most token-endpoint calls ever in flight at once since start or `clear()`."""
        with self._lock:
            return self._tokens_in_flight_peak

    def wait_for_requests(self, n: int, timeout: float = 5.0) -> list[FcmRequest]:
        """Block until `n` sends are recorded (in async code use `wait_for`)."""
        return self._log.wait(n, timeout)

    async def wait_for(self, n: int, timeout: float = 5.0) -> list[FcmRequest]:
        """Wait, without blocking the caller's loop, until `n` sends are recorded."""
        return await self._log.wait_async(n, timeout)

    def clear(self) -> None:
        """Forget recorded sends and the token-request count (not configuration or tokens)."""
        self._log.clear()
        with self._lock:
            self._token_requests = 0
            self._tokens_in_flight_peak = self._tokens_in_flight

    # -- server side (runs on the fake's loop) -----------------------------------------------

    async def _setup(self) -> None:
        app = web.Application()
        app.router.add_post("/token", self._token)
        app.router.add_post("/v1/projects/{project}/messages:send", self._send)
        # handler_cancellation: a hung answer is cancelled when the client gives up.
        self._runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=0.2, handler_cancellation=True
        )
        await self._runner.setup()
        context = self.tls.server_context() if self.tls else None
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _teardown(self) -> None:
        if self._runner is None:
            return
        server = self._runner.server
        transports = [handler.transport for handler in (server.connections if server else []) if handler.transport]
        await self._runner.cleanup()
        # The runner closes each connection, and over TLS a close is a shutdown handshake that waits (up to 30 s)
        # for the client's close_notify, which a client that aborted (aiohttp does) never sends: this loop ends
        # now, and such a socket would outlive the fake, open, until the garbage collector finds it. Cut them.
        for transport in transports:
            transport.abort()
        await asyncio.sleep(0)  # the aborted transports' connection_lost callbacks run before the loop ends

    async def _token(self, request: web.Request) -> web.Response:
        with self._lock:
            self._token_requests += 1
            self._tokens_in_flight += 1
            self._tokens_in_flight_peak = max(self._tokens_in_flight_peak, self._tokens_in_flight)
            delay = self.token_delay
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            return await self._issue_token(request)
        finally:
            with self._lock:
                self._tokens_in_flight -= 1

    async def _issue_token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type, assertion = form.get("grant_type"), form.get("assertion")
        if grant_type != JWT_BEARER_GRANT:
            return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {grant_type!s}")
        if not isinstance(assertion, str) or not assertion:
            return _oauth_error("invalid_request", "Missing required parameter: assertion")
        problem = self._check_assertion(assertion)
        if problem is not None:
            return _oauth_error(*problem)
        token = "ya29.fake-" + secrets.token_urlsafe(32)
        with self._lock:
            lifetime = self.token_lifetime
            self._tokens[token] = time.time() + lifetime
        return web.json_response(
            {"access_token": token, "expires_in": lifetime, "token_type": "Bearer"}
        )

    def _check_assertion(self, assertion: str) -> tuple[str, str] | None:
        """Return Google's `(error, error_description)` for a bad assertion, else None."""
        try:
            issuer = jwt.decode(assertion, options={"verify_signature": False}).get("iss")
        except jwt.InvalidTokenError:
            return "invalid_grant", "Invalid JWT: malformed."
        with self._lock:
            keys = list(self._accounts.get(str(issuer), ()))
        if not keys:
            return "invalid_grant", "Invalid grant: account not found"
        for key in keys:
            try:
                claims = jwt.decode(
                    assertion, key, algorithms=["RS256"],
                    audience=[self.token_uri, GOOGLE_TOKEN_AUDIENCE],
                    options={"require": ["iss", "aud", "iat", "exp"]},
                )
            except jwt.InvalidSignatureError:
                continue  # maybe signed by another registered key of the account
            except jwt.InvalidAudienceError:
                return "invalid_grant", f"Invalid JWT: Failed audience check: {self.token_uri}"
            except jwt.InvalidTokenError:
                return "invalid_grant", (
                    "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                    "reasonable timeframe. Check your iat and exp values in the JWT claim."
                )
            if float(claims["exp"]) - float(claims["iat"]) > 3600:
                return "invalid_grant", "Invalid JWT: Token must be a short-lived token"
            if not claims.get("scope"):
                return "invalid_scope", "Invalid OAuth scope or ID token audience provided."
            return None
        return "invalid_grant", "Invalid JWT Signature."

    async def _send(self, request: web.Request) -> web.Response:
        project = request.match_info["project"]
        headers = {k.lower(): v for k, v in request.headers.items()}
        raw = await request.read()
        body = _parse_json_object(raw)
        message = body.get("message") if body is not None else None
        validate_only = bool(body.get("validate_only")) if body is not None else False
        with self._lock:
            answer = None if self._hang else self._choose(headers, body, message, project)
            delay = self._delay
        self._log.append(FcmRequest(
            project=project, message=message if isinstance(message, dict) else {},
            headers=headers, status=answer.status if answer else 0,
            error_code=answer.error_code if answer else None, received_at=time.time(),
            validate_only=validate_only, peer=_peer(request),
        ))
        if answer is None:
            await asyncio.Event().wait()  # hung until the client leaves or the fake stops
            raise web.HTTPServiceUnavailable()  # unreachable: only cancellation ends the wait
        if delay > 0:
            await asyncio.sleep(delay)
        if answer.status != 200:
            return _rpc_error(answer)
        message_id = "fake_message_id" if validate_only else f"0:{secrets.randbelow(10**16)}"
        return web.json_response({"name": f"projects/{project}/messages/{message_id}"})

    def _choose(
        self, headers: dict[str, str], body: dict[str, Any] | None, message: Any, project: str = "",
    ) -> _Answer:
        # Order: outage, authentication, request shape, scripted per-token answers.
        if self._fail is not None:
            if self._fail.until is None or time.monotonic() < self._fail.until:
                return self._fail
            self._fail = None
        scheme, _, token = headers.get("authorization", "").partition(" ")
        expiry = self._tokens.get(token)
        if scheme.lower() != "bearer" or expiry is None or expiry < time.time():
            return _Answer(401, None, _UNAUTHENTICATED)
        if body is None:
            return _Answer(400, None, "Invalid JSON payload received.")
        problem = _check_message(message, self.max_data_bytes, self.count_json)
        if problem is not None:
            return problem
        if self._too_big > 0:
            self._too_big -= 1
            return _Answer(400, "INVALID_ARGUMENT", "Message is too big")
        rule = self._rules.get(str(message.get("token")))
        if rule is not None:
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    del self._rules[str(message.get("token"))]
            return rule
        if self._project is not None and project != self._project:
            return _Answer(403, "SENDER_ID_MISMATCH")
        return _Answer(200)


def _check_message(message: Any, max_data_bytes: int, count_json: bool = False) -> _Answer | None:
    """FCM's 400 INVALID_ARGUMENT checks on the message shape, or None when acceptable."""
    def invalid(text: str, field: str | None = None) -> _Answer:
        return _Answer(400, "INVALID_ARGUMENT", text, field=field)

    if not isinstance(message, dict):
        return invalid("Request contains an invalid argument.", "message")
    targets = [k for k in ("token", "topic", "condition") if message.get(k)]
    if len(targets) != 1:
        return invalid("Exactly one of token, topic or condition is required.", "message")
    data = message.get("data", {})
    if not isinstance(data, dict):
        return invalid("Invalid value at 'message.data'", "message.data")
    for key, value in data.items():
        if not isinstance(value, str):
            return invalid(f"Invalid value at 'message.data[{key}]' (TYPE_STRING)",
                           f"message.data[{key}]")
    if payload_size(message, count_json=count_json) > max_data_bytes:
        return invalid("Message is too big")
    return None


def payload_size(message: dict[str, Any], *, count_json: bool = False) -> int:
    """The bytes FCM counts against its limit: data keys and values plus notification keys and values; or
    (``count_json``) ``{"notification": ..., "data": ...}`` as compact UTF-8 JSON."""
    if count_json:
        parts = {part: message[part] for part in ("notification", "data") if isinstance(message.get(part), dict)}
        return len(json.dumps(parts, ensure_ascii=False, separators=(",", ":")).encode())
    size = 0
    for part in ("data", "notification"):
        members = message.get(part)
        if isinstance(members, dict):
            size += sum(len(str(k).encode()) + len(str(v).encode()) for k, v in members.items() if v is not None)
    return size


def _peer(request: web.Request) -> str:
    address = request.transport.get_extra_info("peername") if request.transport else None
    return f"{address[0]}:{address[1]}" if address else ""


def _parse_json_object(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _oauth_error(error: str, description: str) -> web.Response:
    # Google's token endpoint answers every grant failure 400 (RFC 6749 §5.2).
    return web.json_response({"error": error, "error_description": description}, status=400)


def _rpc_error(answer: _Answer) -> web.Response:
    """A google.rpc.Status error body, with FcmError / BadRequest details as FCM sends them."""
    status_name = _RPC_STATUS.get(answer.status, "UNKNOWN")
    default_text = FCM_ERRORS.get(answer.error_code or "", (0, "", "Unknown error."))[2]
    error: dict[str, Any] = {
        "code": answer.status, "message": answer.message or default_text, "status": status_name,
    }
    details: list[dict[str, Any]] = []
    if answer.error_code is not None:
        details.append({"@type": _FCM_ERROR_TYPE, "errorCode": answer.error_code})
    if answer.field is not None:
        description = (
            "Invalid registration token" if answer.field == "message.token"
            else answer.message or "Invalid value"
        )
        details.append({
            "@type": _BAD_REQUEST_TYPE,
            "fieldViolations": [{"field": answer.field, "description": description}],
        })
    if details:
        error["details"] = details
    headers = {"Retry-After": str(answer.retry_after)} if answer.retry_after is not None else None
    return web.json_response({"error": error}, status=answer.status, headers=headers)
