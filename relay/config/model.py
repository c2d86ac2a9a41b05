"""Configuration model: the frozen, validated settings every stage reads.

Only values live here; :mod:`relay.config.parse` builds them from YAML and names every problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Platform = Literal["apns", "fcm"]
Delivery = Literal["alert", "silent"]
# Apple's two hosts: a development build's device token is valid only on the sandbox one (api.sandbox.push.apple.com).
ApnsEnvironment = Literal["production", "sandbox"]
APNS_ENVIRONMENTS: tuple[ApnsEnvironment, ...] = ("production", "sandbox")
# What a device API key may do: ``register`` a token as itself only (safe to ship inside an app), or ``manage``
# (map a token to another device token, overwrite any device of its apps, delete, list: for backends).
ApiScope = Literal["register", "manage"]



OPS_PORT = 9464  # metrics.listen's default port: /metrics and /status, on localhost


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080
    idle_timeout: float = 75.0  # seconds a connection may wait for (or dribble) its next request's headers
    # Accept queue: connections the kernel holds until a process accepts them (capped by net.core.somaxconn).
    # A burst of new connections beyond it is dropped by the kernel, so the default is sized for bursts.
    backlog: int = 4096


@dataclass(frozen=True)
class Processes:
    """``processes``: how many webhook (ingest) and delivery processes ``serve`` runs; ``single`` = one
    process doing both (``processes: 1``, or ``serve --processes 1``)."""

    ingest: int | None = None
    delivery: int | None = None
    single: bool = False


@dataclass(frozen=True)
class WebhookSettings:
    path: str = "/parley/webhook"
    max_body_bytes: int = 64 * 1024
    max_tokens: int = 100
    dedupe_window: float = 600.0
    reject_dead_tokens: bool = False
    read_timeout: float = 10.0  # seconds to receive a whole body once the headers are in (then 408)
    # Event names Parley may add later: a silent push like typing events (SPEC §5), or 200 "ignored" (§2).
    unknown_events: Literal["silent", "ignore"] = "silent"


@dataclass(frozen=True)
class DedupeSettings:
    """``dedupe``: when a resent event is a duplicate (SPEC §2; messages: ``webhook.dedupe_window``).

    An event has no id or time: it is a resend only when it repeats the last event for its push token and
    agent within ``event_window`` seconds (never longer than the event's TTL; 0: never a resend).
    """

    event_window: float = 5.0


SignatureAlgorithm = Literal["hmac-sha256", "rsa-sha256", "rsa-pss-sha256", "ecdsa-sha256", "ed25519"]
SIGNATURE_ALGORITHMS: tuple[SignatureAlgorithm, ...] = (
    "hmac-sha256", "rsa-sha256", "rsa-pss-sha256", "ecdsa-sha256", "ed25519")


@dataclass(frozen=True)
class SignatureSettings:
    """``auth.signature``: a signature header over the raw body (or ``timestamp + "." + body``)."""

    header: str
    algorithm: SignatureAlgorithm
    keys: tuple[bytes, ...] = field(repr=False)  # HMAC secrets or PEM public keys; any one may match (rotation)
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    timestamp_header: str | None = None
    tolerance: float = 300.0


@dataclass(frozen=True)
class OAuthClient:
    """One OAuth client (Parley): only the SHA-256 of its secret is kept."""

    secret_sha256: bytes = field(repr=False)
    scopes: tuple[str, ...] = ()


@dataclass(frozen=True)
class OAuthSettings:
    """``auth.oauth``: the relay as Parley's OauthEndpoint (client_credentials, signed expiring tokens)."""

    clients: Mapping[str, OAuthClient]
    signing_keys: tuple[tuple[str, bytes], ...] = field(repr=False)  # (kid, secret); the first one signs
    token_ttl: int = 3600
    issuer: str = "parley-relay"
    path: str = "/oauth/token"
    required_scope: str | None = None


@dataclass(frozen=True)
class RateLimitSettings:
    """``auth.rate_limit``: failed authentications per client address before answers become 429."""

    max_failures: int = 10  # 0 disables
    window: float = 60.0
    trusted_proxies: tuple[str, ...] = ()  # networks whose X-Forwarded-For names the client


@dataclass(frozen=True)
class AuthSettings:
    headers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # each header's accepted values
    signature: SignatureSettings | None = None
    oauth: OAuthSettings | None = None
    rate_limit: RateLimitSettings = field(default_factory=RateLimitSettings)
    allow_unauthenticated: bool = False  # no layer at all is a config error unless this says it is meant


@dataclass(frozen=True)
class StoreSettings:
    backend: Literal["sqlite", "redis"] = "sqlite"
    path: Path = Path("relay.db")
    url: str = "redis://127.0.0.1:6379/0"
    commit_interval: float = 0.0  # extra wait to grow a group commit; 0 = commit as soon as the last one ends
    claim_idle: float = 60.0  # redis: a dead instance's in-flight deliveries are reclaimed after this many seconds
    prefix: str = "relay"  # redis: key prefix, so that several relays can share one Redis database
    keep_finished: float = 3600.0  # finished deliveries (but dead letters) stay inspectable this long, then pruned


@dataclass(frozen=True)
class DeliverySettings:
    concurrency: int = 256
    batch_size: int = 256
    max_age: float = 24 * 3600.0
    unroutable_grace: float = 600.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    send_timeout: float = 15.0
    config_error_retry: float = 60.0


@dataclass(frozen=True)
class MetricsSettings:
    """``metrics.listen``: the operations listener for ``/metrics`` and ``/status`` (and health), on localhost by
    default so that a reverse proxy in front of the webhook port never publishes them; None (``listen: null``)
    = the webhook listener serves them too."""

    listen: Listen | None = field(default_factory=lambda: Listen("127.0.0.1", OPS_PORT))


@dataclass(frozen=True)
class LoggingSettings:
    format: Literal["logfmt", "json"] = "logfmt"
    level: str = "INFO"
    trace_lines_per_second: float = 50.0  # routine trace lines per process per second (0: all); see LineBudget


@dataclass(frozen=True)
class ApiKey:
    """One client of the device API: the SHA-256 (hex) of its key, the apps it may touch, and what it may do.

    ``scope`` defaults to ``register``, the least a key can do: a key whose config does not say otherwise may
    have been shipped inside an app, where it can be extracted.
    """

    name: str
    key_sha256: str
    apps: tuple[str, ...]
    scope: ApiScope = "register"

    @property
    def manages(self) -> bool:
        """Whether this key may map tokens to other device tokens, overwrite other entries, delete and list."""
        return self.scope == "manage"


@dataclass(frozen=True)
class ApiSettings:
    """The ``/v1/`` device API; without keys every API request is refused."""

    keys: Mapping[str, ApiKey] = field(default_factory=dict)
    listener: Literal["webhook", "metrics"] = "webhook"  # metrics: only on the metrics.listen listener (restart)


@dataclass(frozen=True)
class Policy:
    """Translation policy of one app (SPEC §5); every default is overridable per app."""

    default_title: str = "New message"
    title_template: str = "{agent}"
    body_template: str = "{message}"
    type_policy: Mapping[int, Delivery] = field(default_factory=lambda: {2: "alert", 3: "alert", 5: "silent"})
    thread_id: str | None = None
    sound: str = "default"
    event_ttl: int = 30
    channel_id: str | None = None
    event_priority: Literal["normal", "high"] = "normal"

    def delivery_for(self, type_id: int | None) -> Delivery:
        """Alert or silent push for a message ``typeId``; unknown ids alert."""
        if type_id is None:
            return "alert"
        return self.type_policy.get(type_id, "alert")


@dataclass(frozen=True)
class ApnsApp:
    """An APNs app. ``environment`` is the host for devices whose own environment is not known; ``endpoint``
    replaces Apple's hosts (both, unless ``sandbox_endpoint`` replaces the sandbox one). ``sandbox_fallback``
    (production apps): a device without a known environment that production refuses as ``BadDeviceToken`` is
    tried once on the sandbox host (a development build's token) before it counts as dead."""

    name: str
    topic: str
    environment: ApnsEnvironment
    key_file: Path | None
    key_id: str | None
    team_id: str | None
    cert_file: Path | None
    endpoint: str | None
    ca_file: Path | None
    concurrency: int
    max_connections: int
    policy: Policy
    platform: Literal["apns"] = "apns"
    sandbox_endpoint: str | None = None
    sandbox_fallback: bool = True
    proxy: str | None = None  # an http:// CONNECT proxy; None: HTTPS_PROXY/NO_PROXY decide


@dataclass(frozen=True)
class FcmApp:
    name: str
    service_account_file: Path
    endpoint: str | None
    ca_file: Path | None
    concurrency: int
    policy: Policy
    platform: Literal["fcm"] = "fcm"
    proxy: str | None = None  # an http:// proxy; None: HTTPS_PROXY/NO_PROXY decide


App = ApnsApp | FcmApp


@dataclass(frozen=True)
class Config:
    """The whole validated configuration; ``source`` is the file it came from."""

    source: Path
    listen: Listen
    webhook: WebhookSettings
    auth: AuthSettings
    store: StoreSettings
    registry: Path
    delivery: DeliverySettings
    logging: LoggingSettings
    apps: Mapping[str, App]
    api: ApiSettings = field(default_factory=ApiSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    shutdown_timeout: float = 10.0  # on SIGTERM: bound for in-flight requests, then for in-flight sends
    # False: loaded for store commands (load_config(credentials=False)): no credential file was read or
    # checked and auth/api are empty, so it must never serve.
    credentials: bool = True
    processes: Processes = field(default_factory=Processes)
    dedupe: DedupeSettings = field(default_factory=DedupeSettings)
