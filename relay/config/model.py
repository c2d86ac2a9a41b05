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



@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8080
    idle_timeout: float = 75.0  # seconds a connection may wait for (or dribble) its next request's headers


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
    headers: Mapping[str, str] = field(default_factory=dict)
    signature: SignatureSettings | None = None
    oauth: OAuthSettings | None = None
    rate_limit: RateLimitSettings = field(default_factory=RateLimitSettings)


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
    """``metrics.listen``: a separate listener for ``/metrics`` (and health); None = the webhook listener."""

    listen: Listen | None = None


@dataclass(frozen=True)
class LoggingSettings:
    format: Literal["logfmt", "json"] = "logfmt"
    level: str = "INFO"


@dataclass(frozen=True)
class ApiKey:
    """One client of the device API: the SHA-256 (hex) of its key and the apps it may register devices for."""

    name: str
    key_sha256: str
    apps: tuple[str, ...]


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
    name: str
    topic: str
    environment: Literal["production", "sandbox"]
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


@dataclass(frozen=True)
class FcmApp:
    name: str
    service_account_file: Path
    endpoint: str | None
    ca_file: Path | None
    concurrency: int
    policy: Policy
    platform: Literal["fcm"] = "fcm"


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
