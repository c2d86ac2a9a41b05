"""Configuration parsing: the main YAML file -> a frozen, validated ``Config``.

Every problem is collected (not just the first) and reported with the file and the dotted key, so that
``parley-relay check-config`` can list them all. Values may embed ``${ENV_VAR}``; file values are relative
to the config file, or ``cred:NAME`` for a systemd credential in ``$CREDENTIALS_DIRECTORY``.
``load_config(path, credentials=False)`` is for commands that only use the store and the registry: it
neither reads nor checks credential files and skips the secrets of ``auth`` and ``api``.
The device registry file is loaded by :mod:`relay.registry.routing`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay.config.auth import parse_auth_layers
from relay.config.model import (
    APNS_ENVIRONMENTS,
    OPS_PORT,
    ApiKey,
    ApiSettings,
    ApnsApp,
    App,
    AuthSettings,
    Config,
    DedupeSettings,
    Delivery,
    DeliverySettings,
    FcmApp,
    Listen,
    LoggingSettings,
    MetricsSettings,
    Platform,
    Policy,
    Processes,
    StoreSettings,
    WebhookSettings,
)
from relay.config.reader import MISSING, Reader, expand_env, load_yaml, read_file, read_secret, resolve_file
from relay.errors import ConfigError, ConfigProblem


def _endpoint(reader: Reader, name: str = "endpoint") -> str | None:
    value = reader.text(name, None)
    if value is None:
        return None
    if not re.match(r"^https?://[^/\s]+$", value.rstrip("/")):
        reader.problem(name, f"must be a base URL such as https://127.0.0.1:8443, not {value!r}")
        return None
    return str(value).rstrip("/")


def _proxy(reader: Reader) -> str | None:
    """``proxy``: ``http://[user:password@]host[:port]``, the egress proxy of this app's provider connections."""
    value = reader.text("proxy", None)
    if value is None:
        return None
    parts = urlsplit(value)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/") or parts.query or not port_ok:
        shown = value if parts.password is None else value.replace(parts.password, "***")
        reader.problem("proxy", f"must be an HTTP proxy URL such as http://proxy.internal:3128 (the relay tunnels "
                                f"through it with CONNECT), not {shown!r}")
        return None
    return str(value)


def _policy(reader: Reader, platform: Platform) -> Policy:
    base = Policy()
    types_reader = reader.section("type_policy")
    type_policy: dict[int, Delivery] = dict(base.type_policy)
    for key, value in types_reader.data.items():
        types_reader.used.add(key)
        try:
            type_id = int(key)
        except (TypeError, ValueError):
            types_reader.problem(str(key), "type ids must be integers")
            continue
        if value not in ("alert", "silent"):
            types_reader.problem(str(key), f"must be alert or silent, not {value!r}")
            continue
        type_policy[type_id] = value
    return Policy(
        default_title=reader.text("default_title", base.default_title),
        title_template=reader.text("title_template", base.title_template),
        body_template=reader.text("body_template", base.body_template),
        type_policy=type_policy,
        thread_id=reader.text("thread_id", None) if platform == "apns" else None,
        sound=reader.text("sound", base.sound) if platform == "apns" else base.sound,
        event_ttl=reader.number("event_ttl", base.event_ttl, minimum=1, integer=True),
        channel_id=reader.text("channel_id", None) if platform == "fcm" else None,
        event_priority=reader.choice("event_priority", ("normal", "high"), "normal") if platform == "fcm" else "normal",
    )


PLATFORMS: tuple[Platform, ...] = ("apns", "fcm")
_OLD_PLATFORM_NAMES = {"gcm": "GCM, FCM's former name", "firebase": "Firebase", "ios": "iOS", "android": "Android"}


def _platform(reader: Reader) -> Platform | None:
    """``platform``, or None after ONE problem that names the valid values (its other keys depend on it)."""
    value = reader.text("platform", None)
    if value in PLATFORMS:
        return value  # type: ignore[no-any-return]
    what = "is required" if value is None else f"{value!r} is not a platform"
    hint = f" ({_OLD_PLATFORM_NAMES[value.lower()]})" if str(value).lower() in _OLD_PLATFORM_NAMES else ""
    reader.problem("platform", f"{what}{hint}: use apns (iOS, Apple Push Notification service) or fcm "
                               "(Android, Firebase Cloud Messaging)")
    reader.used.update(reader.data)  # the other keys are checked once the platform is known
    return None


def _app(name: str, reader: Reader, base: Path) -> App | None:
    platform = _platform(reader)
    if platform is None:
        return None
    concurrency = reader.number("concurrency", 100, minimum=1, integer=True)
    endpoint = _endpoint(reader)
    ca_file = read_file(reader, "ca_file", base, required=False)
    proxy = _proxy(reader)
    policy = _policy(reader, platform)
    if platform == "apns":
        topic = reader.text("topic")
        environment = reader.choice("environment", APNS_ENVIRONMENTS, "production")
        sandbox_endpoint = _endpoint(reader, "sandbox_endpoint")
        sandbox_fallback = reader.bool("sandbox_fallback", ApnsApp.sandbox_fallback)
        cert_file = read_file(reader, "cert_file", base, required=False)
        key_file = read_file(reader, "key_file", base, required=cert_file is None)
        key_id = reader.text("key_id", None)
        team_id = reader.text("team_id", None)
        if key_file is not None and cert_file is not None:
            reader.problem("cert_file", "give either key_file (token auth) or cert_file, not both")
        if key_file is not None:
            for needed, value in (("key_id", key_id), ("team_id", team_id)):
                if not value:
                    reader.problem(needed, "is required with key_file")
        max_connections = reader.number("max_connections", 4, minimum=1, integer=True)
        reader.finish()
        return ApnsApp(name, topic, environment, key_file, key_id, team_id, cert_file, endpoint, ca_file,
                       concurrency, max_connections, policy, sandbox_endpoint=sandbox_endpoint,
                       sandbox_fallback=sandbox_fallback, proxy=proxy)
    service_account = read_file(reader, "service_account_file", base, required=True)
    reader.finish()
    if service_account is None:
        return None
    return FcmApp(name, service_account, endpoint, ca_file, concurrency, policy, proxy=proxy)


_SHA256_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
MIN_API_KEY_CHARS = 16  # a key_file shorter than this is a typo or a placeholder, not a secret


def _api(reader: Reader, base: Path, app_names: Mapping[Any, Any]) -> ApiSettings:
    """``api.keys.NAME: {key_sha256: HEX | key_file: PATH, apps: [NAME, ...], scope: register|manage}``; keys
    are kept hashed only."""
    keys_r = reader.section("keys")
    keys: dict[str, ApiKey] = {}
    seen: dict[str, str] = {}
    for name in keys_r.data:
        key_r = keys_r.section(str(name))
        digest = key_r.text("key_sha256", None)
        key_file = read_file(key_r, "key_file", base, required=False)
        if (digest is None) == (key_file is None):
            key_r.problem("key_sha256", "give exactly one of key_sha256 (hex SHA-256 of the key) or key_file")
        elif digest is not None and not _SHA256_HEX_RE.match(digest):
            key_r.problem("key_sha256", "must be 64 hex characters (e.g. the output of: printf %s KEY | sha256sum)")
        elif key_file is not None and key_file.is_file() and os.access(key_file, os.R_OK):
            secret = key_file.read_text(encoding="utf-8", errors="replace").strip()
            if len(secret) < MIN_API_KEY_CHARS:
                key_r.problem("key_file", f"the key in {key_file} must have at least {MIN_API_KEY_CHARS} characters")
            digest = hashlib.sha256(secret.encode()).hexdigest()
        apps = key_r.raw("apps")
        if not isinstance(apps, list) or not apps or not all(isinstance(a, str) for a in apps):
            key_r.problem("apps", "must be a non-empty list of app names")
            apps = []
        for app in apps:
            if app not in app_names:
                key_r.problem("apps", f"unknown app {app!r} (known: {', '.join(map(str, app_names))})")
        scope = key_r.choice("scope", ("register", "manage"), ApiKey.scope)
        key_r.finish()
        if digest and _SHA256_HEX_RE.match(digest):
            if digest.lower() in seen:
                key_r.problem("", f"the same key as api.keys.{seen[digest.lower()]}")
            seen[digest.lower()] = str(name)
            keys[str(name)] = ApiKey(str(name), digest.lower(), tuple(dict.fromkeys(apps)), scope)
    keys_r.finish()
    listener = reader.choice("listener", ("webhook", "metrics"), "webhook")
    reader.finish()
    return ApiSettings(keys, listener)


def _metrics(reader: Reader) -> MetricsSettings:
    """``metrics: {listen: {host, port}}``: the operations listener (default ``127.0.0.1:9464``);
    ``listen: null`` puts ``/metrics`` and ``/status`` on the webhook listener instead."""
    listen: Listen | None = MetricsSettings().listen
    if "listen" in reader.data and reader.data["listen"] is None:
        listen = None
    elif reader.data.get("listen") is not None:
        listen_r = reader.section("listen")
        listen = Listen(listen_r.text("host", Listen.host), listen_r.number("port", OPS_PORT, integer=True))
        listen_r.finish()
    reader.used.add("listen")
    reader.finish()
    return MetricsSettings(listen)


def _auth(reader: Reader, base: Path, webhook_path: str) -> AuthSettings:
    """``auth``: the layers Parley must pass; none at all is a problem unless ``allow_unauthenticated``."""
    headers_r = reader.section("headers")
    headers = {str(name): _header_secrets(headers_r, str(name), base) for name in headers_r.data}
    headers_r.finish()
    allow_unauthenticated = reader.bool("allow_unauthenticated", False)
    # Only when no layer was even attempted: a broken layer has its own problem line already.
    if not allow_unauthenticated and not any(reader.data.get(layer) for layer in ("headers", "signature", "oauth")):
        reader.problem("", "no inbound authentication: anyone who reaches the webhook could make the relay push; "
                           "configure auth.headers, auth.signature or auth.oauth (a test setup without any: "
                           "auth.allow_unauthenticated: true)")
    auth = AuthSettings(headers, *parse_auth_layers(reader, base, webhook_path),
                        allow_unauthenticated=allow_unauthenticated)
    reader.finish()
    return auth


def _header_secrets(reader: Reader, name: str, base: Path) -> tuple[str, ...]:
    """One header's accepted values: a secret, or a list of them while a rotation is under way; each may be
    read from a file (``cred:NAME``, ``file:PATH``) so that no secret need sit in the YAML."""
    raw = reader.raw(name)
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        reader.problem(name, "must name at least one value")
    secrets: list[str] = []
    for i, item in enumerate(items):
        key = name if not isinstance(raw, list) else f"{name}[{i}]"
        if not isinstance(item, str) or not item:
            reader.problem(key, "must be a non-empty string (a number must be put in quotes)"
                           if isinstance(item, int | float) else "must be a non-empty string")
            continue
        value = expand_env(item, reader, key) if isinstance(raw, list) else item  # raw() expanded a lone one
        if value.startswith(("cred:", "file:")):
            value = read_secret(reader, key, value, base) if reader.files else value
        if value:
            secrets.append(value)
    return tuple(secrets)


def parse_config(data: Any, source: Path, *, credentials: bool = True) -> Config:
    """Validate the parsed YAML of ``source``; raises :class:`ConfigError` listing every problem once.

    ``credentials=False``: credential files are resolved but neither read nor checked, and the ``auth`` and
    ``api`` sections (secrets only the service needs) are left out; such a config must never serve.
    """
    problems: list[ConfigProblem] = []
    file = str(source)
    base = source.parent
    root = Reader(data, file, "", problems, files=credentials)

    listen_r = root.section("listen")
    listen = Listen(listen_r.text("host", Listen.host), listen_r.number("port", Listen.port, integer=True),
                    listen_r.number("idle_timeout", Listen.idle_timeout, minimum=0.1),
                    listen_r.number("backlog", Listen.backlog, minimum=1, integer=True))
    listen_r.finish()

    hook_r = root.section("webhook")
    defaults = WebhookSettings()
    path = hook_r.text("path", defaults.path)
    if not str(path).startswith("/"):
        hook_r.problem("path", "must start with /")
    webhook = WebhookSettings(
        path=path,
        max_body_bytes=hook_r.number("max_body_bytes", defaults.max_body_bytes, minimum=64, integer=True),
        max_tokens=hook_r.number("max_tokens", defaults.max_tokens, minimum=1, integer=True),
        dedupe_window=hook_r.number("dedupe_window", defaults.dedupe_window),
        reject_dead_tokens=hook_r.bool("reject_dead_tokens", defaults.reject_dead_tokens),
        read_timeout=hook_r.number("read_timeout", defaults.read_timeout, minimum=0.1),
        unknown_events=hook_r.choice("unknown_events", ("silent", "ignore"), defaults.unknown_events),
    )
    hook_r.finish()

    dedupe_r = root.section("dedupe")
    dedupe = DedupeSettings(
        event_window=dedupe_r.number("event_window", DedupeSettings.event_window, minimum=0),
    )
    dedupe_r.finish()

    auth = _auth(root.section("auth"), base, path) if credentials else AuthSettings()
    root.used.add("auth")

    store_r = root.section("store")
    backend = store_r.choice("backend", ("sqlite", "redis"), "sqlite")
    state_dir = Path(os.environ.get("STATE_DIRECTORY", "").split(":")[0] or base)
    store_path = Path(store_r.text("path", "relay.db")).expanduser()
    store = StoreSettings(
        backend=backend,
        path=store_path if store_path.is_absolute() else state_dir / store_path,
        url=store_r.text("url", StoreSettings.url),
        commit_interval=store_r.number("commit_interval", 0.0),
        claim_idle=store_r.number("claim_idle", StoreSettings.claim_idle, minimum=0.1),
        prefix=store_r.text("prefix", StoreSettings.prefix),
        keep_finished=store_r.number("keep_finished", StoreSettings.keep_finished),
    )
    store_r.finish()

    registry_value = root.text("registry", "devices.yaml")
    registry = resolve_file(registry_value, base)

    d_r = root.section("delivery")
    dd = DeliverySettings()
    delivery = DeliverySettings(
        concurrency=d_r.number("concurrency", dd.concurrency, minimum=1, integer=True),
        batch_size=d_r.number("batch_size", dd.batch_size, minimum=1, integer=True),
        max_age=d_r.number("max_age", dd.max_age, minimum=1),
        unroutable_grace=d_r.number("unroutable_grace", dd.unroutable_grace),
        backoff_initial=d_r.number("backoff_initial", dd.backoff_initial, minimum=0.001),
        backoff_max=d_r.number("backoff_max", dd.backoff_max, minimum=0.001),
        send_timeout=d_r.number("send_timeout", dd.send_timeout, minimum=0.01),
        config_error_retry=d_r.number("config_error_retry", dd.config_error_retry, minimum=0.01),
    )
    d_r.finish()

    log_r = root.section("logging")
    logging_settings = LoggingSettings(
        format=log_r.choice("format", ("logfmt", "json"), "logfmt"),
        level=log_r.choice("level", ("DEBUG", "INFO", "WARNING", "ERROR"), "INFO"),
        trace_lines_per_second=log_r.number("trace_lines_per_second", 50.0, minimum=0),
    )
    log_r.finish()

    apps_r = root.section("apps")
    apps: dict[str, App] = {}
    for name in apps_r.data:
        app = _app(str(name), apps_r.section(str(name)), base)
        if app is not None:
            apps[str(name)] = app
    if not apps_r.data:
        apps_r.problem("", "at least one app is required")
    api = _api(root.section("api"), base, apps_r.data) if credentials else ApiSettings()
    root.used.add("api")
    metrics_settings = _metrics(root.section("metrics"))
    shutdown_timeout = root.number("shutdown_timeout", 10.0, minimum=0.1)
    processes = _processes(root)
    root.finish()

    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))  # each problem once, in the order found
    return Config(source, listen, webhook, auth, store, registry, delivery, logging_settings, apps,
                  api, metrics=metrics_settings, shutdown_timeout=shutdown_timeout, credentials=credentials,
                  processes=processes, dedupe=dedupe)


def _processes(root: Reader) -> Processes:
    """``processes: auto`` (default), ``processes: 1`` (one process does everything), or
    ``processes: {ingest: N|auto, delivery: M|auto}``."""
    value = root.raw("processes")
    if value is MISSING or value is None or value == "auto":
        return Processes()
    if value == 1 or value == "1":
        return Processes(single=True)
    if not isinstance(value, dict):
        root.problem("processes", f"must be auto, 1, or a mapping with ingest and delivery, not {value!r}")
        return Processes()
    reader = root.section("processes")
    counts = [None if reader.data.get(role) in (None, "auto") else reader.number(role, 1, minimum=1, integer=True)
              for role in ("ingest", "delivery")]
    reader.used.update(("ingest", "delivery"))
    reader.finish()
    return Processes(counts[0], counts[1])


def load_config(path: str | Path, *, credentials: bool = True) -> Config:
    """Load and validate the main configuration file.

    ``credentials=False`` loads what store and registry commands need (store, registry, app names and
    platforms) without reading or checking credential files or secrets: see :func:`parse_config`.
    """
    source = Path(path).resolve()
    return parse_config(load_yaml(source), source, credentials=credentials)
