"""Configuration of inbound security: the ``auth.signature``, ``auth.oauth`` and ``auth.rate_limit`` sections.

Split from :mod:`relay.config` (which calls :func:`parse_auth_layers`) to keep each module one concept;
it uses the same problem-collecting reader, so every problem names the file and the dotted key.
Secrets are read here, once per (re)load: HMAC secrets as bytes, OAuth client secrets only as their SHA-256.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from pathlib import Path

from relay.config.model import (
    SIGNATURE_ALGORITHMS,
    OAuthClient,
    OAuthSettings,
    RateLimitSettings,
    SignatureSettings,
)
from relay.config.reader import MISSING, Reader, read_file
from relay.inbound.signing import load_public_key

MIN_SIGNING_SECRET_BYTES = 32  # RFC 7518 §3.2: an HS256 key at least as long as the hash
_TOKEN_CHARS_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP header name (RFC 9110 token)
_SCOPE_RE = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")  # RFC 6749 §3.3 scope-token
_CLIENT_ID_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")  # printable ASCII without ':' (HTTP Basic)


def _secret_bytes(reader: Reader, base: Path, value_key: str | None, file_key: str) -> bytes | None:
    """A secret given inline (``value_key``) or in a file (``file_key``, trailing newline stripped)."""
    value = reader.text(value_key, None) if value_key else None
    path = read_file(reader, file_key, base, required=False)
    if value is not None and path is not None:
        reader.problem(file_key, f"give either {value_key} or {file_key}, not both")
        return None
    if path is not None:
        try:
            data = path.read_bytes().rstrip(b"\r\n")
        except OSError:
            return None  # _file has named the problem already
        if not data:
            reader.problem(file_key, f"{path} is empty")
        return data or None
    if value is not None and not value:
        reader.problem(str(value_key), "must not be empty")
    return value.encode() if value else None


def _signature_key(reader: Reader, base: Path, algorithm: str) -> bytes | None:
    """One verification key: ``secret``/``secret_file`` for HMAC, ``public_key_file`` (PEM) otherwise."""
    if algorithm == "hmac-sha256":
        if reader.text("public_key_file", None) is not None:
            reader.problem("public_key_file", "hmac-sha256 takes secret or secret_file")
        return _secret_bytes(reader, base, "secret", "secret_file")
    for name in ("secret", "secret_file"):
        if reader.text(name, None) is not None:
            reader.problem(name, f"{algorithm} takes public_key_file (PEM), not a secret")
    path = read_file(reader, "public_key_file", base, required=False)
    if path is None or not path.is_file():
        return None
    pem = path.read_bytes()
    try:
        load_public_key(pem, algorithm)
    except ValueError as exc:
        reader.problem("public_key_file", f"{path}: {exc}")
        return None
    return pem


def _header_name(reader: Reader, name: str, required: bool) -> str | None:
    value: str | None = reader.text(name, MISSING if required else None)
    if value is not None and not _TOKEN_CHARS_RE.match(value):
        reader.problem(name, f"is not a valid HTTP header name: {value!r}")
    return value


def _signature(parent: Reader, base: Path) -> SignatureSettings | None:
    """``auth.signature``; ``keys:`` lists several secrets/public keys at once (rotation)."""
    if parent.data.get("signature") is None:
        parent.used.add("signature")
        return None
    reader = parent.section("signature")
    header = _header_name(reader, "header", required=True) or ""
    algorithm = reader.choice("algorithm", SIGNATURE_ALGORITHMS, "hmac-sha256")
    keys = [key] if (key := _signature_key(reader, base, algorithm)) is not None else []
    listed = reader.raw("keys")
    if listed is not MISSING and listed is not None and not isinstance(listed, list):
        reader.problem("keys", "must be a list of {secret | secret_file | public_key_file}")
    for i, item in enumerate(listed if isinstance(listed, list) else []):
        item_r = Reader(item, reader.file, f"{reader.key('keys')}[{i}]", reader.problems)
        if (key := _signature_key(item_r, base, algorithm)) is not None:
            keys.append(key)
        item_r.finish()
    if not keys and not any(p.key.startswith(reader.prefix) for p in reader.problems):
        what = "secret or secret_file" if algorithm == "hmac-sha256" else "public_key_file"
        reader.problem("", f"give {what} (or a list keys: of them)")
    timestamp_header = _header_name(reader, "timestamp_header", required=False)
    settings = SignatureSettings(
        header=header, algorithm=algorithm, keys=tuple(keys),
        encoding=reader.choice("encoding", ("hex", "base64"), "hex"),
        prefix=reader.text("prefix", ""),
        timestamp_header=timestamp_header,
        tolerance=reader.number("tolerance", 300.0, minimum=1),
    )
    if timestamp_header and timestamp_header.lower() == header.lower():
        reader.problem("timestamp_header", "must differ from header")
    reader.finish()
    return settings


def _signing_keys(reader: Reader, base: Path) -> list[tuple[str, bytes]]:
    """``signing_secret``/``signing_secret_file`` (signs) then ``signing_keys: [{id?, secret|secret_file}]``."""
    found: list[tuple[str | None, bytes, Reader, str]] = []
    before = len(reader.problems)
    first = _secret_bytes(reader, base, "signing_secret", "signing_secret_file")
    if first is not None:
        found.append((None, first, reader, "signing_secret"))
    listed = reader.raw("signing_keys")
    if listed is not MISSING and listed is not None and not isinstance(listed, list):
        reader.problem("signing_keys", "must be a list of {id, secret | secret_file}")
    for i, item in enumerate(listed if isinstance(listed, list) else []):
        item_r = Reader(item, reader.file, f"{reader.key('signing_keys')}[{i}]", reader.problems)
        secret = _secret_bytes(item_r, base, "secret", "secret_file")
        kid = item_r.text("id", None)
        if secret is not None:
            found.append((kid, secret, item_r, "secret"))
        item_r.finish()
    keys: list[tuple[str, bytes]] = []
    for kid, secret, where, name in found:
        if len(secret) < MIN_SIGNING_SECRET_BYTES:
            where.problem(name, f"must be at least {MIN_SIGNING_SECRET_BYTES} bytes (e.g. openssl rand -hex 32)")
        # A stable key id that reveals nothing about the secret (a keyed hash, not the hash of the secret).
        keys.append((kid or hashlib.sha256(b"parley-relay kid\0" + secret).hexdigest()[:16], secret))
    if not found and len(reader.problems) == before:  # a missing or empty file was named already
        reader.problem("signing_secret_file", "give signing_secret, signing_secret_file or signing_keys")
    if len({kid for kid, _ in keys}) != len(keys):
        reader.problem("signing_keys", "key ids must be unique")
    return keys


def _oauth(parent: Reader, base: Path, webhook_path: str) -> OAuthSettings | None:
    """``auth.oauth``: clients (secrets kept hashed), token signing keys, lifetime, issuer, path."""
    if parent.data.get("oauth") is None:
        parent.used.add("oauth")
        return None
    reader = parent.section("oauth")
    clients_r = reader.section("clients")
    clients: dict[str, OAuthClient] = {}
    for client_id in clients_r.data:
        c_r = clients_r.section(str(client_id))
        if not _CLIENT_ID_RE.match(str(client_id)):
            c_r.problem("", "a client id is printable ASCII without spaces or ':'")
        digest_hex = c_r.text("secret_sha256", None)
        secret = _secret_bytes(c_r, base, None, "secret_file")
        digest: bytes | None = None
        if (digest_hex is None) == (secret is None) and not any(p.key.startswith(c_r.prefix) for p in c_r.problems):
            c_r.problem("secret_sha256", "give exactly one of secret_sha256 (hex SHA-256 of the secret) or secret_file")
        elif digest_hex is not None:
            if re.fullmatch(r"[0-9a-fA-F]{64}", digest_hex):
                digest = bytes.fromhex(digest_hex)
            else:
                c_r.problem("secret_sha256", "must be 64 hex characters (printf %s SECRET | sha256sum)")
        elif secret is not None:
            digest = hashlib.sha256(secret).digest()
        scopes = c_r.raw("scopes")
        if scopes is MISSING or scopes is None:
            scopes = []
        if not isinstance(scopes, list) or not all(isinstance(s, str) and _SCOPE_RE.match(s) for s in scopes):
            c_r.problem("scopes", "must be a list of scope names (no spaces or quotes)")
            scopes = []
        c_r.finish()
        if digest is not None:
            clients[str(client_id)] = OAuthClient(digest, tuple(dict.fromkeys(scopes)))
    if not clients_r.data:
        clients_r.problem("", "at least one client is required")
    clients_r.finish()
    signing_keys = _signing_keys(reader, base)
    path = reader.text("path", OAuthSettings.path)
    if not str(path).startswith("/") or path == webhook_path:
        reader.problem("path", "must start with / and differ from webhook.path")
    required_scope = reader.text("required_scope", None)
    if required_scope is not None and clients and not any(required_scope in c.scopes for c in clients.values()):
        reader.problem("required_scope", f"no client has the scope {required_scope!r}, so no token would pass")
    settings = OAuthSettings(
        clients=clients, signing_keys=tuple(signing_keys),
        token_ttl=reader.number("token_ttl", OAuthSettings.token_ttl, minimum=1, integer=True),
        issuer=reader.text("issuer", OAuthSettings.issuer), path=path, required_scope=required_scope,
    )
    reader.finish()
    return settings


def _rate_limit(reader: Reader) -> RateLimitSettings:
    """``auth.rate_limit``: failed authentications per client address per window; proxies to look behind."""

    proxies = reader.raw("trusted_proxies")
    networks: list[str] = []
    for proxy in proxies if isinstance(proxies, list) else []:
        try:
            networks.append(str(ipaddress.ip_network(str(proxy), strict=False)))
        except ValueError:
            reader.problem("trusted_proxies", f"not an IP address or network: {proxy!r}")
    if proxies is not MISSING and proxies is not None and not isinstance(proxies, list):
        reader.problem("trusted_proxies", "must be a list of IP addresses or networks")
    settings = RateLimitSettings(
        max_failures=reader.number("max_failures", RateLimitSettings.max_failures, integer=True),
        window=reader.number("window", RateLimitSettings.window, minimum=1),
        trusted_proxies=tuple(networks),
    )
    reader.finish()
    return settings


def parse_auth_layers(
    auth: Reader, base: Path, webhook_path: str,
) -> tuple[SignatureSettings | None, OAuthSettings | None, RateLimitSettings]:
    """The signature, OAuth and rate-limit parts of the ``auth`` section (``headers`` stays in config)."""
    return _signature(auth, base), _oauth(auth, base, webhook_path), _rate_limit(auth.section("rate_limit"))
