"""Signature primitives for ``auth.signature`` (SPEC §3): load keys, sign, verify, encode. No I/O, no config.

Parley does not publish its signing scheme, so every algorithm an operator may meet is here, all through
``cryptography``: HMAC-SHA256 with a shared secret, RSA PKCS#1 v1.5 and RSA-PSS with SHA-256, ECDSA with
SHA-256 (DER or raw ``r || s`` signatures, as JOSE produces), and Ed25519.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
Key = bytes | PublicKey  # an HMAC secret, or a public key

_KEY_TYPES: dict[str, type] = {
    "rsa-sha256": rsa.RSAPublicKey,
    "rsa-pss-sha256": rsa.RSAPublicKey,
    "ecdsa-sha256": ec.EllipticCurvePublicKey,
    "ed25519": ed25519.Ed25519PublicKey,
}
_PRIVATE_TYPES: dict[str, type] = {
    "rsa-sha256": rsa.RSAPrivateKey,
    "rsa-pss-sha256": rsa.RSAPrivateKey,
    "ecdsa-sha256": ec.EllipticCurvePrivateKey,
    "ed25519": ed25519.Ed25519PrivateKey,
}
MAX_SIGNATURE_CHARS = 2048  # an RSA-8192 signature in hex is 2048 characters; anything longer is refused unread


def load_public_key(pem: bytes, algorithm: str) -> PublicKey:
    """A PEM public key (or certificate) of the type ``algorithm`` needs; ``ValueError`` says what is wrong."""
    try:
        if b"-----BEGIN CERTIFICATE-----" in pem:
            key: object = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError("not a PEM public key or certificate") from exc
    expected = _KEY_TYPES[algorithm]
    if not isinstance(key, expected):
        raise ValueError(f"a {type(key).__name__.lstrip('_')} cannot verify {algorithm}")
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise ValueError(f"RSA key of {key.key_size} bits is too weak (2048 at least)")
    return key  # type: ignore[return-value]  # narrowed by the isinstance check against _KEY_TYPES


def load_private_key(pem: bytes, algorithm: str) -> PrivateKey:
    """A PEM private key for ``parley-relay sign``; ``ValueError`` says what is wrong."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError("not an unencrypted PEM private key") from exc
    if not isinstance(key, _PRIVATE_TYPES[algorithm]):
        raise ValueError(f"a {type(key).__name__.lstrip('_')} cannot sign {algorithm}")
    return key  # type: ignore[return-value]  # narrowed by the isinstance check against _PRIVATE_TYPES


def signed_bytes(body: bytes, timestamp: str | None) -> bytes:
    """What is signed: the raw body, or ``timestamp + "." + body`` when a timestamp header is configured."""
    return body if timestamp is None else timestamp.encode("ascii") + b"." + body


def verify(algorithm: str, key: Key, message: bytes, signature: bytes) -> bool:
    """True when ``signature`` is ``key``'s signature of ``message`` under ``algorithm``."""
    if isinstance(key, bytes):
        expected = hmac.new(key, message, hashlib.sha256).digest()
        return hmac.compare_digest(expected, signature)  # also false for a truncated signature
    try:
        if isinstance(key, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding = (
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
                if algorithm == "rsa-pss-sha256" else padding.PKCS1v15())
            key.verify(signature, message, pad, hashes.SHA256())
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(_der_ecdsa(signature, key.curve.key_size), message, ec.ECDSA(hashes.SHA256()))
        else:
            key.verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def _der_ecdsa(signature: bytes, curve_bits: int) -> bytes:
    # JOSE-style raw r || s has exactly twice the coordinate size; DER is always longer, so no ambiguity.
    size = (curve_bits + 7) // 8
    if len(signature) == 2 * size:
        return encode_dss_signature(int.from_bytes(signature[:size], "big"), int.from_bytes(signature[size:], "big"))
    return signature


def sign(algorithm: str, key: bytes | PrivateKey, message: bytes) -> bytes:
    """The signature of ``message`` (HMAC secret or private key): the sending side, for ``parley-relay sign``."""
    if isinstance(key, bytes):
        return hmac.new(key, message, hashlib.sha256).digest()
    if isinstance(key, rsa.RSAPrivateKey):
        pad: padding.AsymmetricPadding = (
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)
            if algorithm == "rsa-pss-sha256" else padding.PKCS1v15())
        return key.sign(message, pad, hashes.SHA256())
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(message, ec.ECDSA(hashes.SHA256()))
    return key.sign(message)


def raw_ecdsa(der: bytes, curve_bits: int) -> bytes:
    """A DER ECDSA signature as JOSE's fixed-size ``r || s``."""
    r, s = decode_dss_signature(der)
    size = (curve_bits + 7) // 8
    return r.to_bytes(size, "big") + s.to_bytes(size, "big")


def encode(signature: bytes, encoding: str) -> str:
    """``hex`` (lower case) or standard ``base64``."""
    return signature.hex() if encoding == "hex" else base64.b64encode(signature).decode("ascii")


def decode(text: str, encoding: str) -> bytes:
    """Decode a presented signature; ``ValueError`` when it is not valid ``hex``/``base64`` (URL-safe too)."""
    text = text.strip()
    if not text or len(text) > MAX_SIGNATURE_CHARS or not text.isascii():
        raise ValueError("signature empty, too long or not ASCII")
    try:
        if encoding == "hex":
            return bytes.fromhex(text)
        text = text.replace("-", "+").replace("_", "/")
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (ValueError, binascii.Error) as exc:
        raise ValueError(f"signature is not valid {encoding}") from exc
