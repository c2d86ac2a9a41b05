"""Test credentials: APNs `.p8` keys, Google service accounts and a local TLS CA.

Used by the fake providers (`fake_apns`, `fake_fcm`), the tests, `parley-relay demo` and the
benchmarks. Everything here is freshly generated and worthless outside this process.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import ssl
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = [
    "ApnsKey",
    "ServiceAccount",
    "TestCA",
    "make_apns_key",
    "make_ca",
    "make_service_account",
    "write_json",
]

_ID_ALPHABET = string.ascii_uppercase + string.digits


def _random_id(length: int = 10) -> str:
    # Apple key ids and team ids are 10 upper-case alphanumerics.
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(length))


@dataclass(frozen=True)
class ApnsKey:
    """An APNs token-auth signing key, as Apple hands it out (`AuthKey_<key_id>.p8`)."""

    private_pem: str
    public_pem: str
    key_id: str
    team_id: str

    def write_p8(self, path: str | os.PathLike[str]) -> Path:
        """Write the private key in `.p8` form (PKCS#8 PEM) and return the path."""
        return _write_private(Path(path), self.private_pem)


def make_apns_key(key_id: str | None = None, team_id: str | None = None) -> ApnsKey:
    """Generate a new EC P-256 key in Apple's `.p8` format (PKCS#8 PEM)."""
    private_key = ec.generate_private_key(ec.SECP256R1())
    private_pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return ApnsKey(
        private_pem=private_pem,
        public_pem=public_pem,
        key_id=key_id or _random_id(),
        team_id=team_id or _random_id(),
    )


@dataclass(frozen=True)
class ServiceAccount:
    """A Google service-account JSON document (`info`) plus the PEM of its public key."""

    info: dict[str, Any]
    public_pem: str

    @property
    def client_email(self) -> str:
        """The account's e-mail, the `iss` of its token-grant assertions."""
        return str(self.info["client_email"])

    @property
    def project_id(self) -> str:
        """The Firebase/Google Cloud project the account belongs to."""
        return str(self.info["project_id"])

    @property
    def token_uri(self) -> str:
        """Where google-auth exchanges the signed assertion for an access token."""
        return str(self.info["token_uri"])

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON document (mode 0600) and return the path."""
        return write_json(path, self.info)


@functools.cache
def _shared_rsa_key() -> rsa.RSAPrivateKey:
    # RSA-2048 generation takes ~50-200 ms; one key per process keeps test suites fast.
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def make_service_account(
    token_uri: str,
    project_id: str = "demo-project",
    *,
    client_email: str | None = None,
    fresh_key: bool = False,
) -> ServiceAccount:
    """Build a complete service-account JSON dict whose tokens are minted at `token_uri`.

    The RSA key is shared by every account of the process unless `fresh_key` is true (use that
    to test key rotation, where the old key must stop working).
    """
    key = rsa.generate_private_key(65537, 2048) if fresh_key else _shared_rsa_key()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public_pem = (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    email = client_email or (
        f"firebase-adminsdk-{secrets.token_hex(3)}@{project_id}.iam.gserviceaccount.com"
    )
    info: dict[str, Any] = {
        "type": "service_account",
        "project_id": project_id,
        "private_key_id": secrets.token_hex(20),
        "private_key": private_pem,
        "client_email": email,
        "client_id": str(10**20 + secrets.randbelow(9 * 10**20)),  # 21 digits, like Google's
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": (
            "https://www.googleapis.com/robot/v1/metadata/x509/" + email.replace("@", "%40")
        ),
        "universe_domain": "googleapis.com",
    }
    return ServiceAccount(info=info, public_pem=public_pem)


def write_json(path: str | os.PathLike[str], info: dict[str, Any]) -> Path:
    """Write `info` as JSON to `path` with mode 0600 (it holds a private key); return the path."""
    return _write_private(Path(path), json.dumps(info, indent=2) + "\n")


def _write_private(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    return path


class TestCA(trustme.CA):
    """A `trustme.CA` that also holds a server certificate for `127.0.0.1` and `localhost`."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self) -> None:
        super().__init__(organization_name="parley-relay test CA")
        self.server_cert: trustme.LeafCert = self.issue_cert("127.0.0.1", "localhost")

    def write_ca_pem(self, path: str | os.PathLike[str]) -> Path:
        """Write the CA certificate (what clients must trust) to `path` and return it."""
        target = Path(path)
        self.cert_pem.write_to_path(str(target))
        return target

    def write_client_cert(
        self, path: str | os.PathLike[str], name: str = "apns-client@example.com"
    ) -> Path:
        """Issue a client certificate and write key + chain as one PEM (aioapns' `client_cert`)."""
        target = Path(path)
        leaf = self.issue_cert(name, common_name=name)
        _write_private(target, leaf.private_key_and_cert_chain_pem.bytes().decode())
        return target

    def client_context(self) -> ssl.SSLContext:
        """A client `SSLContext` trusting only this CA, offering ALPN `h2`."""
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        self.configure_trust(ctx)
        ctx.set_alpn_protocols(["h2"])
        return ctx

    def server_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        """A server `SSLContext` presenting the `127.0.0.1`/`localhost` certificate."""
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server_cert.configure_cert(ctx)
        if alpn:
            ctx.set_alpn_protocols(alpn)
        return ctx


def make_ca() -> TestCA:
    """Create a throw-away CA with a server certificate for `127.0.0.1` and `localhost`."""
    return TestCA()
