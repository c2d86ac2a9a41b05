"""APNs provider: ``aioapns`` 4.0 with the fixes a long-running relay needs.

aioapns defects worked around here (each covered by a test):

* it never re-opens the HTTP/2 receive window, so after ~64 KiB of error bodies on one connection every
  later response stalls: :class:`~relay.providers._apns_protocol.RelayProtocol` acknowledges every DATA frame;
* it writes request bodies without waiting for the server's window and raises FlowControlError once
  thousands of requests are in flight: its ``send_notification`` waits for WINDOW_UPDATE;
* it resolves a non-200 answer only when a body with a ``reason`` arrives, and drops ``retry-after``:
  the protocol resolves on END_STREAM with status, reason and ``retry-after``;
* it mints a provider JWT per connection (Apple allows one refresh per 20 min): one :class:`SharedJwt` per key;
* ``send_notification`` has no timeout (added by :class:`relay.providers.Bounded`), its pool retries with a
  blocking 1 s sleep (we call a connection directly and classify), the pool must be built inside the running
  loop, and ``proxy_host`` is broken: our pools open their own connections (:meth:`_Connecting.open`), directly
  or through an HTTP CONNECT tunnel (:mod:`relay.providers.proxy`). The host comes from the protocol class's
  ``APNS_SERVER``/``APNS_PORT``, which is how ``endpoint`` (and ``sandbox_endpoint``) redirect it;
* once every connection is busy at ``max_connections``, its pool's ``acquire`` polls the connections it has
  and never opens another, also after they are all lost: :meth:`_Connecting.acquire` opens one whenever the
  pool has room (its waiting sends polled an empty pool until their timeout);
* it opens streams on a new connection before the server's SETTINGS frame says how many it allows, and its
  stream count (an ``asyncio.Semaphore``) let every stream through once a server lowered its limit below the
  streams open (Apple lowers it to 1 after a refused push): our pools use a connection once its SETTINGS are
  read (:meth:`_Connecting.open`), and the protocol counts streams with its own
  :class:`~relay.providers._apns_protocol.StreamSlots`;
* a failed connect surfaces as a bare ``ConnectionError()`` after an ERROR log line without app or host: our
  pools raise :class:`ApnsUnreachable` with the cause and host (:mod:`relay.providers.network_errors`), which
  becomes the push's reason (aioapns' own lines are demoted to DEBUG by :func:`relay.observability.setup_logging`).

Environments: one pool per (app, environment), both signed by the app's one JWT. A development build's token
is valid only on the sandbox host; production answers it ``400 BadDeviceToken`` (see :class:`ApnsProvider`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import jwt
from aioapns.common import NotificationRequest, PushType
from aioapns.connection import (
    APNsBaseClientProtocol,
    APNsCertConnectionPool,
    APNsDevelopmentClientProtocol,
    APNsKeyConnectionPool,
    APNsProductionClientProtocol,
    APNsTLSClientProtocol,
    AuthorizationHeaderProvider,
)
from aioapns.exceptions import ConnectionClosed
from aioapns.exceptions import ConnectionError as ApnsConnectionError
from h2.exceptions import FlowControlError, H2Error, NoAvailableStreamIDError

from relay.config import ApnsApp
from relay.config.model import APNS_ENVIRONMENTS, ApnsEnvironment
from relay.errors import ConfigError, ConfigProblem
from relay.outcome import Outcome, SendResult
from relay.providers._apns_protocol import RelayProtocol
from relay.providers.network_errors import describe_failure
from relay.providers.proxy import Proxy, open_tunnel, proxy_for
from relay.push import ApnsPush, Push

# Apple, "Handling notification responses from APNs" (developer.apple.com/documentation/usernotifications/
# handling-notification-responses-from-apns): status and reason -> what the relay does.
APNS_REASONS: Mapping[tuple[int, str], Outcome] = {
    (400, "BadDeviceToken"): Outcome.TOKEN_DEAD,
    # Another app's token, or our topic/key belongs to another bundle: judged in context (SPEC §4).
    (400, "DeviceTokenNotForTopic"): Outcome.MISMATCH,
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
    (413, "PayloadTooLarge"): Outcome.TOO_BIG,  # counted otherwise than we did: fitted again, smaller (SPEC §5)
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

# Production's answer to a development build's token (Apple: "the device token is not valid for the host";
# tokens of the sandbox host are valid only there): the one answer that may try the sandbox instead.
SANDBOX_FALLBACK_ON = (400, "400 BadDeviceToken")

# A new connection is used once the server's SETTINGS arrive (they follow the TLS handshake at once).
SETTINGS_TIMEOUT = 10.0
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


def _protocol_class(app: ApnsApp, environment: ApnsEnvironment) -> type[APNsTLSClientProtocol]:
    """Our protocol aimed at ``environment``'s host: Apple's, or ``endpoint``/``sandbox_endpoint`` if set."""
    base = APNsDevelopmentClientProtocol if environment == "sandbox" else APNsProductionClientProtocol
    server, port = base.APNS_SERVER, base.APNS_PORT
    endpoint = (app.sandbox_endpoint if environment == "sandbox" else None) or app.endpoint
    if endpoint:
        parts = urlsplit(endpoint)
        server, port = parts.hostname or server, parts.port or 443
    # Both names are read by aioapns when it connects and when it writes the :authority/host header.
    return type("RelayApnsProtocol", (RelayProtocol, base), {"APNS_SERVER": server, "APNS_PORT": port})


def _proxy(app: ApnsApp, protocol_class: type[APNsTLSClientProtocol]) -> Proxy | None:
    """The app's ``proxy``, or the environment's for this host (``HTTPS_PROXY`` unless ``NO_PROXY`` names it)."""
    target = f"https://{protocol_class.APNS_SERVER}:{protocol_class.APNS_PORT}"
    url = proxy_for(target, app.proxy)
    if url is None:
        return None
    try:
        return Proxy.parse(url)
    except ValueError as exc:  # app.proxy is checked by the parser: this one came from the environment
        raise ConfigError([ConfigProblem("environment", "HTTPS_PROXY", str(exc))]) from exc


def _ssl_context(app: ApnsApp) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(app.ca_file) if app.ca_file else None)
    context.set_alpn_protocols(["h2"])
    return context


class ApnsUnreachable(Exception):
    """No connection to an APNs host could be opened; ``str()`` names the cause and the host."""


class _Connecting:
    """How our pools connect: directly, or through an HTTP CONNECT proxy; a failure names its cause and host.

    ``acquire`` raises aioapns' bare ``ConnectionError`` from what :meth:`open` raised, as aioapns' own did, so
    the :class:`ApnsUnreachable` is its ``__context__`` (read in ``ApnsProvider._send_to``).
    """

    protocol_class: type[APNsTLSClientProtocol]
    ssl_context: ssl.SSLContext | None
    proxy: Proxy | None = None

    connections: list[APNsBaseClientProtocol]
    max_connections: int
    _lock: asyncio.Lock

    async def acquire(self) -> APNsBaseClientProtocol:
        """A connection with a free stream, opening one whenever the pool has room, also after a wait.

        aioapns' own ``acquire``, once every connection was busy at ``max_connections``, polled the connections
        it had every 10 ms and never opened another: after they were lost, its waiting sends polled an empty
        pool until their send timeout. A failure to connect is raised as aioapns raises it (see the class doc).
        """
        while True:
            for connection in self.connections:
                if not connection.is_busy:
                    return connection
            if len(self.connections) < self.max_connections:
                async with self._lock:
                    for connection in self.connections:
                        if not connection.is_busy:
                            return connection
                    if len(self.connections) < self.max_connections:
                        try:
                            opened: APNsBaseClientProtocol = await self.create_connection()  # type: ignore[attr-defined]
                        except Exception as exc:  # what failed stays its __context__, as in aioapns
                            raise ApnsConnectionError() from exc
                        self.connections.append(opened)
                        return opened
            await asyncio.sleep(0.01)  # every stream of every connection is taken: one is given back soon

    async def open(self, factory: Any) -> APNsBaseClientProtocol:
        server, port = self.protocol_class.APNS_SERVER, self.protocol_class.APNS_PORT
        context = self.ssl_context or ssl.create_default_context()
        try:
            if self.proxy is not None:
                protocol = await open_tunnel(self.proxy, server, port, factory, context)
            else:
                _, protocol = await asyncio.get_running_loop().create_connection(factory, server, port, ssl=context)
        except OSError as exc:  # ssl.SSLError and socket.gaierror are OSErrors too
            raise ApnsUnreachable(describe_failure(exc, server, port)) from exc
        # No stream before the server's SETTINGS: its stream limit may already be lower than what we would open.
        try:
            async with asyncio.timeout(SETTINGS_TIMEOUT):
                await protocol.settings_known()
        except BaseException as exc:
            protocol.on_connection_lost = None  # never in the pool: nothing to discard
            if protocol.transport is not None:
                protocol.transport.abort()  # no TLS goodbye to wait for from a server that has said nothing
            if isinstance(exc, TimeoutError):
                raise ApnsUnreachable(f"{server}:{port} sent no HTTP/2 SETTINGS within {SETTINGS_TIMEOUT:g} s") from exc
            if isinstance(exc, ConnectionClosed):
                raise ApnsUnreachable(f"{server}:{port} closed the connection before its HTTP/2 SETTINGS") from exc
            raise
        return protocol  # type: ignore[no-any-return]


class _KeyPool(_Connecting, APNsKeyConnectionPool):
    """Token-auth pool whose connections all share one :class:`SharedJwt`."""

    def __init__(self, jwt_provider: SharedJwt, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.jwt = jwt_provider

    async def create_connection(self) -> APNsBaseClientProtocol:
        def factory() -> APNsBaseClientProtocol:
            return self.protocol_class(self.apns_topic, self.loop, self.discard_connection, self.jwt)  # type: ignore[arg-type]

        return await self.open(factory)


class _CertPool(_Connecting, APNsCertConnectionPool):
    """Certificate-auth pool."""

    async def create_connection(self) -> APNsBaseClientProtocol:
        def factory() -> APNsBaseClientProtocol:
            return self.protocol_class(self.apns_topic, self.loop, self.discard_connection)  # type: ignore[arg-type]

        return await self.open(factory)


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


Pool = APNsKeyConnectionPool | APNsCertConnectionPool


class ApnsProvider:
    """Sends :class:`ApnsPush` for one app over HTTP/2 connection pools, one per APNs environment.

    A push goes to its device token's environment when known (``push.environment``), else to the app's. With
    ``sandbox_fallback``, a push of unknown environment that production refuses as ``BadDeviceToken`` (a
    development build's token) is sent once to the sandbox: accepted there, it counts as sent and the result
    carries ``learned_environment`` for the dispatcher to keep; refused there too, production's verdict stands.
    """

    def __init__(self, app: ApnsApp) -> None:
        self.app = app
        self.jwt: SharedJwt | None = None  # one provider token for every pool: Apple's keys serve both hosts
        if app.key_file is not None:
            self.jwt = SharedJwt(read_key(app), app.key_id or "", app.team_id or "")
        # Production's BadDeviceToken may try the sandbox only where the two are different hosts (``endpoint``
        # alone sends both environments to one host: asking it twice would tell nothing new).
        self._fallback = (app.sandbox_fallback and app.environment == "production"
                          and (app.endpoint is None or app.sandbox_endpoint is not None))
        context = _ssl_context(app)
        # Pools open no connection until a push needs one: an app that never meets a sandbox token costs nothing.
        self._pools: dict[ApnsEnvironment, Pool] = {env: self._pool_for(env, context) for env in APNS_ENVIRONMENTS}

    def _pool_for(self, environment: ApnsEnvironment, context: ssl.SSLContext) -> Pool:
        app = self.app
        common: dict[str, Any] = {
            "topic": app.topic,
            "max_connections": app.max_connections,
            "max_connection_attempts": 1,
            "use_sandbox": environment == "sandbox",
            "ssl_context": context,
        }
        pool: Pool
        if self.jwt is not None:
            pool = _KeyPool(self.jwt, key="", key_id=app.key_id, team_id=app.team_id, **common)
        else:
            try:
                pool = _CertPool(cert_file=str(app.cert_file), **common)
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise ConfigError([ConfigProblem(str(app.cert_file), f"apps.{app.name}.cert_file",
                                                 f"not a usable client certificate: {exc}")]) from exc
        protocol_class = _protocol_class(app, environment)
        pool.protocol_class = protocol_class
        pool.proxy = _proxy(app, protocol_class)
        return pool

    @property
    def connections(self) -> int:
        return sum(len(pool.connections) for pool in self._pools.values())

    async def send(self, push: Push) -> SendResult:
        assert isinstance(push, ApnsPush)
        environment = push.environment or self.app.environment
        result = await self._send_to(environment, push)
        if push.environment is None and self._fallback and (result.status, result.reason) == SANDBOX_FALLBACK_ON:
            return await self._sandbox_fallback(push, result)
        return result

    async def _sandbox_fallback(self, push: ApnsPush, refused: SendResult) -> SendResult:
        """Production refused the token: try the sandbox once; sent there, the token's environment is learned."""
        answer = await self._send_to("sandbox", push)
        if answer.outcome is Outcome.SENT:
            return replace(answer, learned_environment="sandbox")
        # Whatever the sandbox said (refused, or unreachable), the one extra try is spent: production's verdict
        # stands, so a bad token still ends dead and a sandbox outage never holds production deliveries back.
        return replace(refused, reason=f"{refused.reason} (sandbox: {answer.reason or answer.outcome.value})")

    async def _send_to(self, environment: ApnsEnvironment, push: ApnsPush) -> SendResult:
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
        pool = self._pools[environment]
        try:
            connection = await pool.acquire()
            result = await connection.send_notification(request)
        except ApnsConnectionError as exc:
            cause = exc.__context__
            return SendResult(Outcome.RETRY, str(cause) if isinstance(cause, ApnsUnreachable) else
                              f"cannot connect to {pool.protocol_class.APNS_SERVER}")
        except (ConnectionClosed, NoAvailableStreamIDError, FlowControlError, OSError, H2Error) as exc:
            return SendResult(Outcome.RETRY, f"connection to {pool.protocol_class.APNS_SERVER} lost: "
                                             f"{type(exc).__name__}")
        try:
            status = int(result.status)
        except ValueError:
            status = 0
        return classify_apns(status, result.description, getattr(result, "retry_after", None))

    async def close(self) -> None:
        connections = [c for pool in self._pools.values() for c in pool.connections]
        for connection in connections:
            if connection.inactivity_timer:
                connection.inactivity_timer.cancel()
            if connection.transport is not None:
                connection.transport.abort()  # shutting down: in-flight sends were given up by the caller
        while any(c.transport is not None and not c.transport.is_closing() for c in connections):  # noqa: ASYNC110
            await asyncio.sleep(0)
        await asyncio.sleep(0)  # let connection_lost run before the loop may close
