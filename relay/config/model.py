"""Configuration model: the frozen settings every stage reads, validated by pydantic from ``relay.yaml``.

Each class is a pydantic dataclass (frozen, ``extra="forbid"``): it is both the value code reads and the
schema of its YAML section, so the JSON Schema (``parley-relay config schema``) and the key reference are
generated from here. Types are strict where YAML 1.1 would hide a mistake: text is never taken from a number
(``key_id: 0123`` is the number 83), a flag never from ``yes`` or ``1``, a number never from a flag. Numbers
and flags given as text are accepted, because ``${VAR}`` expands to text. What only the relay knows (file
paths resolved against the config file, secrets read from files) is in :mod:`relay.config.fields` and
:mod:`relay.config.auth`; :mod:`relay.config.parse` turns a file into a :class:`Config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass as plain_dataclass
from dataclasses import field as plain_field
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema

from relay.config.auth import ApiFile, ApiSettings, AuthFile, AuthSettings
from relay.config.fields import (
    MODEL,
    AppleId,
    Endpoint,
    File,
    Flag,
    Int,
    ProcessesInput,
    Proxy,
    Seconds,
    UrlPath,
    problem,
    processes_value,
)

Platform = Literal["apns", "fcm"]
Delivery = Literal["alert", "silent"]
# Apple's two hosts: a development build's device token is valid only on the sandbox one (api.sandbox.push.apple.com).
ApnsEnvironment = Literal["production", "sandbox"]
APNS_ENVIRONMENTS: tuple[ApnsEnvironment, ...] = ("production", "sandbox")


@dataclass(frozen=True, config=MODEL)
class Listen:
    host: str = Field(default="127.0.0.1", description="where the HTTP listener binds (not under socket activation)")
    port: Annotated[int, Field(ge=0, le=65535, description="its port (0: any free one)")] = 8080
    idle_timeout: Seconds = Field(default=75.0, ge=0.1, description="seconds a connection may wait for (or dribble) "
                                                            "its next request's headers, then it is closed")
    # Accept queue: connections the kernel holds until a process accepts them (capped by net.core.somaxconn).
    backlog: Int = Field(default=4096, ge=1, description="connections the kernel queues before a process accepts them "
                                                 "(capped by net.core.somaxconn); sized for bursts")


@dataclass(frozen=True, config=MODEL)
class MetricsListen(Listen):
    """``metrics.listen``: its own host and port (9464, Prometheus' registered port, by default)."""

    port: Annotated[int, Field(ge=0, le=65535, description="its port (0: any free one)")] = 9464


@dataclass(frozen=True, config=MODEL)
class Processes:
    """``processes``: how many webhook (ingest) and delivery processes ``serve`` runs; ``single`` = one
    process doing both (``processes: 1``, or ``serve --processes 1``)."""

    ingest: Int | None = Field(default=None, ge=1)
    delivery: Int | None = Field(default=None, ge=1)
    single: bool = False


@dataclass(frozen=True, config=MODEL)
class WebhookSettings:
    path: UrlPath = Field(default="/parley/webhook", description="the path Parley posts to")
    max_body_bytes: Int = Field(default=64 * 1024, ge=64, description="larger bodies get `413`")
    max_tokens: Int = Field(default=100, ge=1, description="most push tokens in one webhook's `to`")
    dedupe_window: Seconds = Field(default=600.0, description="seconds within which a resent notification is a "
                                                      "duplicate (`0` disables)")
    reject_dead_tokens: Flag = Field(default=False, description="answer `410` to webhooks whose tokens are all dead, "
                                                        "so that Parley drops them")
    read_timeout: Seconds = Field(default=10.0, ge=0.1, description="seconds to receive a whole body once the headers "
                                                            "are in (then `408`)")
    # Event names Parley may add later: a silent push like typing events (SPEC §5), or 200 "ignored" (§2).
    unknown_events: Literal["silent", "ignore"] = Field(default="silent", description="events other than startTyping/"
                                                        "stopTyping: a silent push, or `ignore` (`200` ignored)")


@dataclass(frozen=True, config=MODEL)
class StoreSettings:
    backend: Literal["sqlite", "redis"] = Field(default="sqlite", description="`sqlite` (embedded) or `redis` "
                                                                      "(several instances)")
    path: Path = Field(default=Path("relay.db"), description="SQLite file, relative to `$STATE_DIRECTORY` or else "
                                                     "the config file")
    url: str = Field(default="redis://127.0.0.1:6379/0", description="Redis URL for `backend: redis`")
    commit_interval: Seconds = Field(default=0.0, description="extra seconds to wait to grow a group commit (0: commit "
                                                      "as soon as the previous one ends)")
    claim_idle: Seconds = Field(default=60.0, ge=0.1, description="Redis: seconds after which a silent instance's "
                                                          "claimed deliveries are taken over")
    prefix: str = Field(default="relay", description="Redis: key prefix, so that several relays can share a database")
    keep_finished: Seconds = Field(default=3600.0, description="seconds a finished delivery (not a dead letter) stays "
                                                       "visible to `parley-relay deliveries`, then is pruned")


@dataclass(frozen=True, config=MODEL)
class DeliverySettings:
    concurrency: Int = Field(default=256, ge=1, description="caps each app's `concurrency` (its sends in flight; "
                                                    "a sixteenth is the unrouted share)")
    batch_size: Int = Field(default=256, ge=1, description="deliveries claimed from the store at once")
    max_age: Seconds = Field(default=24 * 3600.0, ge=1, description="seconds a message is retried before it ends "
                                                            "as *expired*")
    unroutable_grace: Seconds = Field(default=600.0, description="seconds a token without a registry entry is kept "
                                                         "before it ends as *unroutable*")
    backoff_initial: Seconds = Field(default=1.0, ge=0.001, description="first retry delay (exponential, full jitter, "
                                                                "never sooner than `Retry-After`)")
    backoff_max: Seconds = Field(default=300.0, ge=0.001, description="longest retry delay")
    # At most 60: a send (with its one resend after a 401) must end well within the claim's lease (300 s, half of
    # it spent waiting claimed ahead at most), or another claim could take the delivery again and send it twice.
    send_timeout: Seconds = Field(default=15.0, ge=0.01, le=60.0, description="seconds one provider request may take "
                                                                               "(at most 60)")
    config_error_retry: Seconds = Field(default=60.0, ge=0.01, description="seconds between probes of an app whose "
                                                                   "credentials were refused")

    @model_validator(mode="after")
    def _backoff_in_order(self) -> DeliverySettings:
        # The retry policy refuses it too, but only when a (re)load builds the dispatcher: too late to refuse.
        if self.backoff_initial > self.backoff_max:
            raise problem("backoff_initial", f"must not exceed backoff_max ({self.backoff_max:g}), "
                                             f"not {self.backoff_initial:g}")
        return self


@dataclass(frozen=True, config=MODEL)
class MetricsSettings:
    """``metrics.listen``: the operations listener for ``/metrics`` and ``/status`` (and health), on localhost by
    default so that a reverse proxy in front of the webhook port never publishes them; None (``listen: null``)
    = the webhook listener serves them too."""

    listen: MetricsListen | None = Field(default_factory=lambda: MetricsListen(), description="the operations "
                                         "listener: `/metrics`, `/status` (and `/healthz`, `/readyz`, also on the "
                                         "webhook listener); `null` serves them on the webhook listener")


@dataclass(frozen=True, config=MODEL)
class DedupeSettings:
    """``dedupe``: when a resent event is a duplicate (SPEC §2; messages: ``webhook.dedupe_window``).

    An event has no id or time: it is a resend only when it repeats the last event for its push token and
    agent within ``event_window`` seconds (never longer than the event's TTL; 0: never a resend).
    """

    event_window: Seconds = Field(default=5.0, description="seconds within which an event that repeats the last "
                                  "event of its push token and agent is a duplicate (never longer than the event's "
                                  "TTL; `0`: an event is never a duplicate)")


@dataclass(frozen=True, config=MODEL)
class LoggingSettings:
    format: Literal["logfmt", "json"] = Field(default="logfmt", description="`logfmt` or `json`, to stderr")
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO", description="the least severe "
                                                                "level logged")
    trace_lines_per_second: Seconds = Field(default=50.0, description="routine trace lines (accepted, sent, waits) "
                                            "per process per second; past it they are counted in a summary line "
                                            "every 10 s; `0`: every line")


@plain_dataclass(frozen=True)
class Policy:
    """Translation policy of one app (SPEC §5), built from the app's keys; every default is per-app overridable."""

    default_title: str = "New message"
    title_template: str = "{agent}"
    body_template: str = "{message}"
    type_policy: Mapping[int, Delivery] = plain_field(default_factory=lambda: {2: "alert", 3: "alert", 5: "silent"})
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


@dataclass(frozen=True, kw_only=True, config=MODEL)
class _AppKeys:
    """What every app has: its name (the key under ``apps``), hosts, concurrency and translation policy."""

    name: SkipJsonSchema[str] = ""
    endpoint: Endpoint | None = Field(default=None, description="a base URL replacing the provider's host (tests, "
                                                        "demos, proxies)")
    ca_file: File | None = Field(default=None, description="trust store for `endpoint` (PEM)")
    proxy: Proxy | None = Field(default=None, description="an http:// CONNECT proxy for this app's provider "
                                                          "connections (default: HTTPS_PROXY/NO_PROXY decide)")
    concurrency: Int = Field(default=100, ge=1, description="this app's requests in flight")
    default_title: str = Field(default="New message", description="alert title when the agent has no name")
    title_template: str = Field(default="{agent}", description="placeholders: {agent}, {message}")
    body_template: str = "{message}"
    type_policy: dict[int, Delivery] = Field(default_factory=dict, description="message typeId -> alert | "
                                             "silent, over the default {2: alert, 3: alert, 5: silent}")
    event_ttl: Int = Field(default=30, ge=1, description="seconds a typing event may be delivered late")

    def _policy(self, **platform: object) -> Policy:
        return Policy(self.default_title, self.title_template, self.body_template,
                      {**Policy().type_policy, **self.type_policy}, event_ttl=self.event_ttl, **platform)  # type: ignore[arg-type]


@dataclass(frozen=True, kw_only=True, config=MODEL)
class ApnsApp(_AppKeys):
    """An APNs app. ``environment`` is the host for devices whose own environment is not known; ``endpoint``
    replaces Apple's hosts (both, unless ``sandbox_endpoint`` replaces the sandbox one). ``sandbox_fallback``
    (production apps): a device without a known environment that production refuses as ``BadDeviceToken`` is
    tried once on the sandbox host (a development build's token) before it counts as dead."""

    platform: Literal["apns"] = "apns"
    topic: str = Field(description="the app's bundle id")
    environment: ApnsEnvironment = "production"
    key_file: File | None = Field(default=None, description="token auth (recommended): the .p8 key ...")
    key_id: AppleId | None = Field(default=None, description="... its Key ID (10 characters) ...")
    team_id: AppleId | None = Field(default=None, description="... and your Team ID (10 characters)")
    cert_file: File | None = Field(default=None, description="or a client certificate + key (PEM), not with key_file")
    max_connections: Int = Field(default=4, ge=1, description="HTTP/2 connections per environment")
    sandbox_endpoint: Endpoint | None = None
    sandbox_fallback: Flag = Field(default=True, description="production refuses an unknown device as BadDeviceToken: "
                                                     "try the sandbox host once")
    thread_id: str | None = Field(default=None, description="aps.thread-id (groups notifications)")
    sound: str = "default"

    @model_validator(mode="after")
    def _one_credential(self) -> ApnsApp:
        if self.key_file is not None and self.cert_file is not None:
            raise problem("cert_file", "give either key_file (token auth) or cert_file, not both")
        if self.key_file is None and self.cert_file is None:
            raise problem("key_file", "is required (token auth; or cert_file, a client certificate)")
        if self.key_file is not None:
            missing = [name for name in ("key_id", "team_id") if getattr(self, name) is None]
            if missing:
                raise problem(missing[0], f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                                          "required with key_file")
        return self

    @cached_property
    def policy(self) -> Policy:
        """The translation policy these keys describe."""
        return self._policy(thread_id=self.thread_id, sound=self.sound)


@dataclass(frozen=True, kw_only=True, config=MODEL)
class FcmApp(_AppKeys):
    platform: Literal["fcm"] = "fcm"
    service_account_file: File = Field(description="the Firebase service account JSON")
    channel_id: str | None = Field(default=None, description="Android notification channel for alerts")
    event_priority: Literal["normal", "high"] = Field(default="normal", description="android.priority of typing events")

    @cached_property
    def policy(self) -> Policy:
        """The translation policy these keys describe."""
        return self._policy(channel_id=self.channel_id, event_priority=self.event_priority)


App = ApnsApp | FcmApp
AnyApp = Annotated[App, Field(discriminator="platform")]


@dataclass(frozen=True, config=MODEL)
class RelayFile:
    """The whole of ``relay.yaml``, as written (``auth`` and ``api`` still name their secrets' files)."""

    apps: dict[str, AnyApp] = Field(min_length=1, description="one entry per mobile app (see Apps)")
    listen: Listen = Field(default_factory=Listen)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    auth: AuthFile = Field(default_factory=AuthFile)
    store: StoreSettings = Field(default_factory=StoreSettings)
    registry: File = Field(default=Path("devices.yaml"), description="the device registry file, relative to this file")
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    api: ApiFile = Field(default_factory=ApiFile)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    dedupe: DedupeSettings = Field(default_factory=DedupeSettings)
    shutdown_timeout: Seconds = Field(default=10.0, ge=0.1, description="on SIGTERM: seconds for in-flight requests, "
                                                                "then as long for in-flight sends")
    processes: Annotated[Processes, BeforeValidator(processes_value, json_schema_input_type=ProcessesInput)] = Field(
        default_factory=Processes, description="`auto`, `1` (one process does everything), or "
                                               "`{ingest: N|auto, delivery: N|auto}`")

    @model_validator(mode="before")
    @classmethod
    def _app_names(cls, data: object) -> object:
        """Each app knows the name it is listed under."""
        if isinstance(data, dict) and isinstance(data.get("apps"), dict):
            data = {**data, "apps": {name: {**app, "name": name} if isinstance(app, dict) else app
                                     for name, app in data["apps"].items()}}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> RelayFile:
        listen, metrics = self.listen, self.metrics.listen
        if metrics is not None and metrics.port and (metrics.host, metrics.port) == (listen.host, listen.port):
            raise problem("metrics.listen", f"must differ from listen ({listen.host}:{listen.port})")
        oauth = self.auth.oauth
        if oauth is not None and oauth.path == self.webhook.path:
            raise problem("auth.oauth.path", "must differ from webhook.path")
        for name, key in self.api.keys.items():
            unknown = [app for app in key.apps if app not in self.apps]
            if unknown:
                raise problem(f"api.keys.{name}.apps", f"unknown app {unknown[0]!r} (known: {', '.join(self.apps)})")
        return self


@plain_dataclass(frozen=True)
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
    api: ApiSettings = plain_field(default_factory=ApiSettings)
    metrics: MetricsSettings = plain_field(default_factory=MetricsSettings)
    shutdown_timeout: float = 10.0  # on SIGTERM: bound for in-flight requests, then for in-flight sends
    # False: loaded for store commands (load_config(credentials=False)): no credential file was read or
    # checked and auth/api are empty, so it must never serve.
    credentials: bool = True
    processes: Processes = plain_field(default_factory=Processes)
    dedupe: DedupeSettings = plain_field(default_factory=DedupeSettings)

