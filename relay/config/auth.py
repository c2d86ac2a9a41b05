"""Configuration of inbound security (``auth``) and of the device API (``api``): the keys as written, and the
secrets they name, read once per (re)load.

The ``*File`` models are the YAML's shape (part of the schema); their validators check what only this relay
knows (a secret long enough, a PEM key that fits the algorithm) when the context asks files to be checked.
:func:`build_auth` and :func:`build_api` then read the secrets into the values the service uses: HMAC secrets
as bytes, OAuth client secrets and API keys only as their SHA-256.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass as plain_dataclass
from dataclasses import field as plain_field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationInfo, model_validator
from pydantic.dataclasses import dataclass

from relay.config.fields import MODEL, File, Flag, Int, Seconds, Sha256Hex, UrlPath, problem, resolve_file
from relay.inbound.signing import load_public_key

MIN_SIGNING_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash
MIN_API_KEY_CHARS = 16  # a key_file shorter than this is a typo or a placeholder, not a secret
SignatureAlgorithm = Literal["hmac-sha256", "rsa-sha256", "rsa-pss-sha256", "ecdsa-sha256", "ed25519"]
SIGNATURE_ALGORITHMS: tuple[SignatureAlgorithm, ...] = (
    "hmac-sha256", "rsa-sha256", "rsa-pss-sha256", "ecdsa-sha256", "ed25519")
# What a device API key may do: ``register`` a token as itself only (safe to ship inside an app), or ``manage``
# (map a token to another device token, overwrite any device of its apps, delete, list: for backends).
ApiScope = Literal["register", "manage"]


def _matching(pattern: str, what: str) -> AfterValidator:
    def check(value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise ValueError(f"{what}, not {value!r}")
        return value
    return AfterValidator(check)


HeaderName = Annotated[str, _matching(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", "is not a valid HTTP header name")]  # RFC 9110
Scope = Annotated[str, _matching(r"[\x21\x23-\x5b\x5d-\x7e]+", "must be a scope name (no spaces or quotes)")]
ClientId = Annotated[str, _matching(r"[\x21-\x39\x3b-\x7e]+", "a client id is printable ASCII without spaces or ':'")]
NonEmpty = Annotated[str, Field(min_length=1)]


def _network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value, strict=False))
    except ValueError:
        raise ValueError(f"not an IP address or network: {value!r}") from None


def _header_values(value: object, info: ValidationInfo) -> tuple[str, ...]:
    """One header's accepted values: a secret, or a list of them while a rotation is under way; each may be
    read from a file (``cred:NAME``, ``file:PATH``) so that no secret need sit in the YAML, and a value that
    starts so is never taken literally."""
    items = value if isinstance(value, list) else [value]
    if not items:
        raise problem("", "must name at least one value")
    secrets = []
    for i, item in enumerate(items):
        where = f"[{i}]" if isinstance(value, list) else ""
        if not isinstance(item, str) or not item:
            raise problem(where, "must be a non-empty string" + (
                " (a number must be put in quotes)" if isinstance(item, int | float) else ""))
        if item.startswith(("cred:", "file:")) and _checking(info):
            path = resolve_file(item.removeprefix("file:"), (info.context or {}).get("base", Path.cwd()))
            try:
                item = path.read_text(encoding="utf-8").rstrip("\r\n")
            except (OSError, UnicodeDecodeError) as exc:
                raise problem(where, f"cannot read the secret {item!r} from {path}: "
                                     f"{getattr(exc, 'strerror', None) or exc}") from None
            if not item:
                raise problem(where, f"the secret file {path} is empty")
        secrets.append(item)
    return tuple(secrets)


HeaderValues = Annotated[tuple[str, ...],
                         BeforeValidator(_header_values, json_schema_input_type=NonEmpty | list[NonEmpty])]


def _read(path: Path | None) -> bytes | None:
    return None if path is None else path.read_bytes().rstrip(b"\r\n")


def _checking(info: ValidationInfo) -> bool:
    return bool((info.context or {}).get("files"))


def _secret(value: str | None, path: Path | None, value_key: str, file_key: str, *, check: bool) -> bytes | None:
    """A secret given inline or in a file (trailing newline stripped): one of them, never empty."""
    if value is not None and path is not None:
        raise problem(file_key, f"give either {value_key} or {file_key}, not both")
    if value is not None:
        if not value:
            raise problem(value_key, "must not be empty")
        return value.encode()
    if path is not None and check:
        if not (data := _read(path)):
            raise problem(file_key, f"{path} is empty")
        return data
    return None


@dataclass(frozen=True, kw_only=True, config=MODEL)
class SignatureKey:
    """One verification key: ``secret``/``secret_file`` for HMAC, ``public_key_file`` (PEM) otherwise."""

    secret: str | None = None
    secret_file: File | None = None
    public_key_file: File | None = None

    def check(self, algorithm: str, where: str, *, files: bool) -> bool:
        """Whether a key is given; raises the problem with it, ``where`` prefixing the key."""
        if algorithm == "hmac-sha256":
            if self.public_key_file is not None:
                raise problem(f"{where}public_key_file", "hmac-sha256 takes secret or secret_file")
            return _secret(self.secret, self.secret_file, f"{where}secret", f"{where}secret_file",
                           check=files) is not None or self.secret_file is not None
        for name in ("secret", "secret_file"):
            if getattr(self, name) is not None:
                raise problem(f"{where}{name}", f"{algorithm} takes public_key_file (PEM), not a secret")
        if self.public_key_file is not None and files:
            try:
                load_public_key(self.public_key_file.read_bytes(), algorithm)
            except ValueError as exc:
                raise problem(f"{where}public_key_file", f"{self.public_key_file}: {exc}") from None
        return self.public_key_file is not None

    def read(self) -> bytes:
        """The secret or PEM bytes (after validation)."""
        return self.secret.encode() if self.secret else _read(self.secret_file or self.public_key_file) or b""


@dataclass(frozen=True, kw_only=True, config=MODEL)
class SignatureFile(SignatureKey):
    """``auth.signature``: a signature header over the raw body (or ``timestamp + "." + body``)."""

    header: HeaderName = Field(description="the header carrying the signature")
    algorithm: SignatureAlgorithm = "hmac-sha256"
    keys: list[SignatureKey] = Field(default_factory=list, description="more keys, all accepted (rotation)")
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    timestamp_header: HeaderName | None = None
    tolerance: Seconds = Field(default=300.0, ge=1)

    @model_validator(mode="after")
    def _keys(self, info: ValidationInfo) -> SignatureFile:
        given = [key.check(self.algorithm, where, files=_checking(info))
                 for where, key in [("", self), *((f"keys[{i}].", k) for i, k in enumerate(self.keys))]]
        if not any(given):
            what = "secret or secret_file" if self.algorithm == "hmac-sha256" else "public_key_file"
            raise problem("", f"give {what} (or a list keys: of them)")
        if self.timestamp_header and self.timestamp_header.lower() == self.header.lower():
            raise problem("timestamp_header", "must differ from header")
        return self


@dataclass(frozen=True, config=MODEL)
class OAuthClientFile:
    secret_sha256: Sha256Hex | None = Field(default=None, description="printf %s SECRET | sha256sum")
    secret_file: File | None = None
    scopes: list[Scope] = Field(default_factory=list, description="scopes it may request")

    @model_validator(mode="after")
    def _one_secret(self, info: ValidationInfo) -> OAuthClientFile:
        if (self.secret_sha256 is None) == (self.secret_file is None):
            raise problem("secret_sha256", "give exactly one of secret_sha256 (hex SHA-256 of the secret) "
                                           "or secret_file")
        _secret(None, self.secret_file, "", "secret_file", check=_checking(info))
        return self


@dataclass(frozen=True, config=MODEL)
class SigningKey:
    id: str | None = None
    secret: str | None = None
    secret_file: File | None = None


@dataclass(frozen=True, config=MODEL)
class OAuthFile:
    """``auth.oauth``: the relay as Parley's OauthEndpoint (client_credentials, signed expiring tokens)."""

    clients: dict[ClientId, OAuthClientFile] = Field(min_length=1, description="client id -> its secret")
    signing_secret: str | None = None
    signing_secret_file: File | None = Field(default=None, description=">= 32 bytes (openssl rand -hex 32)")
    signing_keys: list[SigningKey] = Field(default_factory=list, description="older keys, still accepted")
    token_ttl: Int = Field(default=3600, ge=1)
    issuer: str = "parley-relay"
    path: UrlPath = "/oauth/token"
    required_scope: str | None = None

    def secrets(self, *, check: bool = True) -> list[tuple[str, bytes]]:
        """(kid, secret), the signing one first; a stable kid that reveals nothing about the secret."""
        found: list[tuple[str, str, str | None, str | None, Path | None]] = [
            ("signing_secret", "signing_secret_file", None, self.signing_secret, self.signing_secret_file)]
        found += [(f"signing_keys[{i}].secret", f"signing_keys[{i}].secret_file", k.id, k.secret, k.secret_file)
                  for i, k in enumerate(self.signing_keys)]
        keys = []
        for value_key, file_key, kid, value, path in found:
            secret = _secret(value, path, value_key, file_key, check=check)
            if secret is not None:
                if len(secret) < MIN_SIGNING_SECRET_BYTES:
                    raise problem(file_key if path else value_key,
                                  f"must be at least {MIN_SIGNING_SECRET_BYTES} bytes (e.g. openssl rand -hex 32)")
                keys.append((kid or hashlib.sha256(b"parley-relay kid\0" + secret).hexdigest()[:16], secret))
        return keys

    @model_validator(mode="after")
    def _checks(self, info: ValidationInfo) -> OAuthFile:
        keys = self.secrets(check=_checking(info))
        if not keys and not (self.signing_secret_file or any(k.secret_file for k in self.signing_keys)):
            raise problem("signing_secret_file", "give signing_secret, signing_secret_file or signing_keys")
        if len({kid for kid, _ in keys}) != len(keys):
            raise problem("signing_keys", "key ids must be unique")
        scope = self.required_scope
        if scope is not None and not any(scope in c.scopes for c in self.clients.values()):
            raise problem("required_scope", f"no client has the scope {scope!r}, so no token would pass")
        return self


@dataclass(frozen=True, config=MODEL)
class RateLimitSettings:
    """``auth.rate_limit``: failed authentications per client address before answers become 429."""

    max_failures: Int = Field(default=10, ge=0, description="0 disables")
    window: Seconds = Field(default=60.0, ge=1, description="seconds over which failures are counted")
    trusted_proxies: tuple[Annotated[str, AfterValidator(_network)], ...] = Field(default=
        (), description="networks whose X-Forwarded-For names the client")


@dataclass(frozen=True, config=MODEL)
class AuthFile:
    """``auth``: every configured layer must pass; none at all is an error unless ``allow_unauthenticated``."""

    headers: dict[HeaderName, HeaderValues] = Field(default_factory=dict, description="static headers every "
                                                    "webhook must carry (Parley's header(s) option): a secret, or a "
                                                    "list of them during a rotation; `cred:NAME` or `file:PATH` reads "
                                                    "it from a file")
    signature: SignatureFile | None = Field(default=None, description="a signature over the raw body")
    oauth: OAuthFile | None = Field(default=None, description="OAuth 2.0 client credentials (Parley pushType 5)")
    rate_limit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    allow_unauthenticated: Flag = Field(default=False, description="accept a config with none of headers, signature, "
                                                           "oauth (tests, demos)")

    @model_validator(mode="after")
    def _some_layer(self, info: ValidationInfo) -> AuthFile:
        # Checked when a file is loaded for the service (not for store commands: see relay.config.parse).
        unchecked = not (info.context or {}).get("files")
        if not (self.allow_unauthenticated or unchecked or self.headers or self.signature or self.oauth):
            raise problem("", "no inbound authentication: anyone who reaches the webhook could make the relay "
                              "push; configure auth.headers, auth.signature or auth.oauth (a test setup without "
                              "any: auth.allow_unauthenticated: true)")
        return self


@dataclass(frozen=True, kw_only=True, config=MODEL)
class ApiKeyFile:
    key_sha256: Sha256Hex | None = Field(default=None, description="hex SHA-256 of the key")
    key_file: File | None = Field(default=None, description="or the key itself in a file (kept only as its SHA-256)")
    apps: list[str] = Field(min_length=1, description="a non-empty list of the apps it may use")
    scope: ApiScope = Field(default="register", description="`register` (a token as itself only) or `manage` "
                                                            "(see docs/device-api.md)")

    def digest(self) -> str | None:
        """The key's SHA-256 (hex), read from ``key_file`` if that is how it is given."""
        secret = _read(self.key_file)
        return self.key_sha256 or (hashlib.sha256(secret).hexdigest() if secret is not None else None)

    @model_validator(mode="after")
    def _one_key(self, info: ValidationInfo) -> ApiKeyFile:
        if (self.key_sha256 is None) == (self.key_file is None):
            raise problem("key_sha256", "give exactly one of key_sha256 (hex SHA-256 of the key) or key_file")
        secret = _read(self.key_file) if _checking(info) else None
        if secret is not None and len(secret.strip()) < MIN_API_KEY_CHARS:
            raise problem("key_file", f"the key in {self.key_file} must have at least {MIN_API_KEY_CHARS} characters")
        return self


@dataclass(frozen=True, config=MODEL)
class ApiFile:
    """``api``: the ``/v1/`` device API; without keys every API request is refused."""

    keys: dict[str, ApiKeyFile] = Field(default_factory=dict, description="name -> key_sha256 or key_file, "
                                        "apps, scope (register, the default, or manage)")
    listener: Literal["webhook", "metrics"] = Field(default="webhook", description="`metrics`: only on metrics.listen")

    @model_validator(mode="after")
    def _distinct(self, info: ValidationInfo) -> ApiFile:
        seen: dict[str, str] = {}
        for name, key in self.keys.items():
            digest = key.digest() if _checking(info) or key.key_sha256 else None
            if digest in seen:
                raise problem(f"keys.{name}", f"the same key as api.keys.{seen[digest]}")
            if digest:
                seen[digest] = name
        return self


@plain_dataclass(frozen=True)
class SignatureSettings:
    header: str
    algorithm: SignatureAlgorithm
    keys: tuple[bytes, ...] = plain_field(repr=False)  # HMAC secrets or PEM public keys; any one may match
    encoding: Literal["hex", "base64"] = "hex"
    prefix: str = ""
    timestamp_header: str | None = None
    tolerance: float = 300.0


@plain_dataclass(frozen=True)
class OAuthClient:
    """One OAuth client (Parley): only the SHA-256 of its secret is kept."""

    secret_sha256: bytes = plain_field(repr=False)
    scopes: tuple[str, ...] = ()


@plain_dataclass(frozen=True)
class OAuthSettings:
    clients: Mapping[str, OAuthClient]
    signing_keys: tuple[tuple[str, bytes], ...] = plain_field(repr=False)  # (kid, secret); the first one signs
    token_ttl: int = 3600
    issuer: str = "parley-relay"
    path: str = "/oauth/token"
    required_scope: str | None = None


@plain_dataclass(frozen=True)
class AuthSettings:
    headers: Mapping[str, tuple[str, ...]] = plain_field(default_factory=dict)  # each header's accepted values
    signature: SignatureSettings | None = None
    oauth: OAuthSettings | None = None
    rate_limit: RateLimitSettings = plain_field(default_factory=RateLimitSettings)
    allow_unauthenticated: bool = False


@plain_dataclass(frozen=True)
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


@plain_dataclass(frozen=True)
class ApiSettings:
    keys: Mapping[str, ApiKey] = plain_field(default_factory=dict)
    listener: Literal["webhook", "metrics"] = "webhook"  # metrics: only on the metrics.listen listener (restart)


def build_auth(auth: AuthFile) -> AuthSettings:
    """The ``auth`` the service uses, secrets read (the file was validated with its files checked)."""
    sig, oauth = auth.signature, auth.oauth
    signature = None if sig is None else SignatureSettings(
        sig.header, sig.algorithm, tuple(k.read() for k in (sig, *sig.keys) if k.check(sig.algorithm, "", files=False)),
        sig.encoding, sig.prefix, sig.timestamp_header, sig.tolerance)
    oauth_settings = None if oauth is None else OAuthSettings(
        {cid: OAuthClient(bytes.fromhex(c.secret_sha256) if c.secret_sha256
                          else hashlib.sha256(_read(c.secret_file) or b"").digest(), tuple(dict.fromkeys(c.scopes)))
         for cid, c in oauth.clients.items()},
        tuple(oauth.secrets()), oauth.token_ttl, oauth.issuer, oauth.path, oauth.required_scope)
    return AuthSettings(dict(auth.headers), signature, oauth_settings, auth.rate_limit, auth.allow_unauthenticated)


def build_api(api: ApiFile) -> ApiSettings:
    """The device API's keys, kept hashed only."""
    keys = {name: ApiKey(name, key.digest() or "", tuple(dict.fromkeys(key.apps)), key.scope)
            for name, key in api.keys.items()}
    return ApiSettings(keys, api.listener)
