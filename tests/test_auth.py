"""Inbound authentication (SPEC §3): static headers, signatures with rotation and replay window, the
failed-authentication limiter, and their configuration. Signatures in these tests are computed with
``hmac``/``cryptography`` directly, not with the relay's own signer, so a shared bug cannot hide."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from relay.cli import main as cli_main
from relay.config import AuthSettings, RateLimitSettings, SignatureSettings, load_config
from relay.errors import ConfigError
from relay.inbound.auth import (
    Authenticator,
    AuthFailed,
    Signature,
    StaticHeaders,
    build_authenticator,
    sign_headers,
)
from relay.inbound.ratelimit import FailureLimiter, client_address
from relay.inbound.signing import raw_ecdsa
from relay.runtime.relay import reload
from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE, IOS_TOKEN, Sandbox, sample
from tests.conftest import MakeRelay

SECRET = b"hmac-secret-for-tests-4f1c9a"
OLD_SECRET = b"hmac-secret-rotated-out-77d2e1"
BODY = json.dumps(sample("message", to=[IOS_TOKEN])).encode()


def hmac_hex(secret: bytes, message: bytes) -> str:
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def hmac_settings(**kw: Any) -> SignatureSettings:
    args: dict[str, Any] = {"header": "X-Signature", "algorithm": "hmac-sha256", "keys": (SECRET,)}
    args.update(kw)
    return SignatureSettings(**args)


class Clock:
    """A settable clock for the replay window and the limiter."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- static headers ---------------------------------------------------------------------------------------


def test_static_header_must_match_exactly() -> None:
    """A missing header, a wrong value and a prefix of the right value are all refused."""
    layer = StaticHeaders({AUTH_HEADER: (AUTH_VALUE,)})
    layer.verify({AUTH_HEADER: AUTH_VALUE}, b"")
    for headers in ({}, {AUTH_HEADER: "wrong"}, {AUTH_HEADER: AUTH_VALUE[:-1]}, {AUTH_HEADER: AUTH_VALUE + "x"}):
        with pytest.raises(AuthFailed) as info:
            layer.verify(headers, b"")
        assert AUTH_VALUE not in info.value.reason


def test_all_configured_layers_must_pass() -> None:
    """With static headers and a signature configured, either one alone is refused."""
    auth = build_authenticator(AuthSettings({AUTH_HEADER: (AUTH_VALUE,)}, hmac_settings()))
    good_sig = {"X-Signature": hmac_hex(SECRET, BODY)}
    auth.verify({AUTH_HEADER: AUTH_VALUE, **good_sig}, BODY)
    with pytest.raises(AuthFailed):
        auth.verify({AUTH_HEADER: AUTH_VALUE}, BODY)
    with pytest.raises(AuthFailed):
        auth.verify(good_sig, BODY)


# -- HMAC signatures --------------------------------------------------------------------------------------


def test_hmac_signature_of_the_raw_body_passes() -> None:
    """hex HMAC-SHA256 of the exact body bytes is accepted, in lower or upper case."""
    layer = Signature(hmac_settings())
    layer.verify({"X-Signature": hmac_hex(SECRET, BODY)}, BODY)
    layer.verify({"X-Signature": hmac_hex(SECRET, BODY).upper()}, BODY)


def test_signature_of_another_body_is_refused() -> None:
    """A valid signature of a different body (one byte changed, or re-serialized JSON) does not pass."""
    layer = Signature(hmac_settings())
    signature = hmac_hex(SECRET, BODY)
    for other in (BODY + b" ", BODY.replace(b"Hello", b"Hellp"), json.dumps(json.loads(BODY), indent=1).encode()):
        with pytest.raises(AuthFailed, match="does not match"):
            layer.verify({"X-Signature": signature}, other)


def test_truncated_signature_is_refused() -> None:
    """A signature cut short by one byte, half, or to nothing is refused."""
    layer = Signature(hmac_settings())
    signature = hmac_hex(SECRET, BODY)
    for cut in (signature[:-2], signature[:32], signature[:-1], ""):
        with pytest.raises(AuthFailed):
            layer.verify({"X-Signature": cut}, BODY)


def test_signature_by_another_secret_or_missing_header_is_refused() -> None:
    """The signature of an unknown secret, and a request without the header, do not pass."""
    layer = Signature(hmac_settings())
    with pytest.raises(AuthFailed, match="does not match"):
        layer.verify({"X-Signature": hmac_hex(b"another-secret", BODY)}, BODY)
    with pytest.raises(AuthFailed, match="missing"):
        layer.verify({}, BODY)


def test_prefix_is_required_and_stripped() -> None:
    """With prefix ``sha256=`` the header must carry it; the bare digest is refused."""
    layer = Signature(hmac_settings(prefix="sha256="))
    digest = hmac_hex(SECRET, BODY)
    layer.verify({"X-Signature": "sha256=" + digest}, BODY)
    with pytest.raises(AuthFailed, match="prefix"):
        layer.verify({"X-Signature": digest}, BODY)


def test_base64_encoding_standard_and_url_safe() -> None:
    """encoding base64 accepts standard and URL-safe alphabets, padded or not; hex is then refused."""
    layer = Signature(hmac_settings(encoding="base64"))
    raw = hmac.new(SECRET, BODY, hashlib.sha256).digest()
    for text in (base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("=")):
        layer.verify({"X-Signature": text}, BODY)
    with pytest.raises(AuthFailed):
        layer.verify({"X-Signature": raw.hex()}, BODY)


def test_rotation_accepts_any_configured_secret() -> None:
    """During a rotation both the old and the new secret pass; a third does not."""
    layer = Signature(hmac_settings(keys=(SECRET, OLD_SECRET)))
    layer.verify({"X-Signature": hmac_hex(SECRET, BODY)}, BODY)
    layer.verify({"X-Signature": hmac_hex(OLD_SECRET, BODY)}, BODY)
    with pytest.raises(AuthFailed):
        layer.verify({"X-Signature": hmac_hex(b"never-configured", BODY)}, BODY)


# -- timestamp and replay window --------------------------------------------------------------------------


def _stamped(clock: Clock, **kw: Any) -> Signature:
    return Signature(hmac_settings(timestamp_header="X-Timestamp", tolerance=300, **kw), clock=clock)


def test_timestamped_signature_covers_timestamp_dot_body() -> None:
    """With a timestamp header the signed bytes are ``timestamp + "." + body``; the body alone is refused."""
    clock = Clock()
    ts = str(int(clock.now))
    _stamped(clock).verify({"X-Timestamp": ts, "X-Signature": hmac_hex(SECRET, f"{ts}.".encode() + BODY)}, BODY)
    with pytest.raises(AuthFailed, match="does not match"):
        _stamped(clock).verify({"X-Timestamp": ts, "X-Signature": hmac_hex(SECRET, BODY)}, BODY)


def test_replayed_signed_request_outside_the_window_is_refused() -> None:
    """A correctly signed request whose timestamp is 301 s old (or 301 s ahead) is refused; 299 s passes."""
    clock = Clock()
    layer = _stamped(clock)

    def headers_at(ts: int) -> dict[str, str]:
        return {"X-Timestamp": str(ts), "X-Signature": hmac_hex(SECRET, f"{ts}.".encode() + BODY)}

    now = int(clock.now)
    layer.verify(headers_at(now - 299), BODY)
    layer.verify(headers_at(now + 299), BODY)
    for ts in (now - 301, now + 301, now - 86400):
        with pytest.raises(AuthFailed, match="window"):
            layer.verify(headers_at(ts), BODY)
    replay = headers_at(now)
    clock.now += 301  # the same captured request, replayed five minutes later
    with pytest.raises(AuthFailed, match="window"):
        layer.verify(replay, BODY)


def test_timestamp_moved_into_the_window_breaks_the_signature() -> None:
    """Rewriting an old request's timestamp to now does not help: the timestamp is signed."""
    clock = Clock()
    old = int(clock.now) - 3600
    signature = hmac_hex(SECRET, f"{old}.".encode() + BODY)
    with pytest.raises(AuthFailed, match="does not match"):
        _stamped(clock).verify({"X-Timestamp": str(int(clock.now)), "X-Signature": signature}, BODY)


def test_missing_or_malformed_timestamp_is_refused() -> None:
    """No timestamp header, or one that is not Unix time digits, is refused."""
    clock = Clock()
    layer = _stamped(clock)
    sig = hmac_hex(SECRET, BODY)
    for headers in ({"X-Signature": sig}, {"X-Signature": sig, "X-Timestamp": "now"},
                    {"X-Signature": sig, "X-Timestamp": "-5"}, {"X-Signature": sig, "X-Timestamp": "1e9"}):
        with pytest.raises(AuthFailed):
            layer.verify(headers, BODY)


def test_millisecond_timestamps_are_understood() -> None:
    """A 13-digit timestamp is read as milliseconds for the window (and signed as sent)."""
    clock = Clock()
    ms = str(int(clock.now * 1000))
    _stamped(clock).verify({"X-Timestamp": ms, "X-Signature": hmac_hex(SECRET, f"{ms}.".encode() + BODY)}, BODY)


# -- asymmetric algorithms --------------------------------------------------------------------------------

Signer = Callable[[bytes], bytes]


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return _rsa()


def _pss() -> padding.PSS:
    return padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)


def _public_pem(key: Any) -> bytes:
    pem: bytes = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem


def _signer(algorithm: str, key: Any, raw_ec: bool = False) -> Signer:
    if algorithm == "rsa-sha256":
        return lambda m: bytes(key.sign(m, padding.PKCS1v15(), hashes.SHA256()))
    if algorithm == "rsa-pss-sha256":
        return lambda m: bytes(key.sign(m, _pss(), hashes.SHA256()))
    if algorithm == "ecdsa-sha256":
        if raw_ec:
            return lambda m: raw_ecdsa(key.sign(m, ec.ECDSA(hashes.SHA256())), key.curve.key_size)
        return lambda m: bytes(key.sign(m, ec.ECDSA(hashes.SHA256())))
    return lambda m: bytes(key.sign(m))


ASYMMETRIC = [
    ("rsa-sha256", None, False),
    ("rsa-pss-sha256", None, False),
    ("ecdsa-sha256", ec.SECP256R1(), False),
    ("ecdsa-sha256", ec.SECP256R1(), True),
    ("ecdsa-sha256", ec.SECP384R1(), False),
    ("ed25519", None, False),
]


@pytest.mark.parametrize(("algorithm", "curve", "raw_ec"), ASYMMETRIC,
                         ids=["rsa-pkcs1", "rsa-pss", "ecdsa-p256-der", "ecdsa-p256-raw", "ecdsa-p384", "ed25519"])
def test_asymmetric_signature_verifies_with_the_public_key(rsa_key: rsa.RSAPrivateKey, algorithm: str,
                                                           curve: ec.EllipticCurve | None, raw_ec: bool) -> None:
    """Each public-key algorithm accepts its signature (base64) and refuses another body or another key."""
    def new_key() -> Any:
        if algorithm.startswith("rsa"):
            return _rsa()
        if curve is not None:
            return ec.generate_private_key(curve)
        return ed25519.Ed25519PrivateKey.generate()

    key = rsa_key if algorithm.startswith("rsa") else new_key()
    other = new_key()
    settings = SignatureSettings("X-Signature", algorithm, (_public_pem(key),), encoding="base64")  # type: ignore[arg-type]
    layer = Signature(settings)
    sign = _signer(algorithm, key, raw_ec)
    layer.verify({"X-Signature": base64.b64encode(sign(BODY)).decode()}, BODY)
    with pytest.raises(AuthFailed, match="does not match"):
        layer.verify({"X-Signature": base64.b64encode(sign(BODY + b"x")).decode()}, BODY)
    with pytest.raises(AuthFailed, match="does not match"):
        layer.verify({"X-Signature": base64.b64encode(_signer(algorithm, other, raw_ec)(BODY)).decode()}, BODY)
    truncated = sign(BODY)[:-1]
    with pytest.raises(AuthFailed):
        layer.verify({"X-Signature": base64.b64encode(truncated).decode()}, BODY)
    # Rotation works for public keys too: the other key, once listed, passes.
    both = Signature(SignatureSettings("X-Signature", algorithm, (_public_pem(key), _public_pem(other)),  # type: ignore[arg-type]
                                       encoding="base64"))
    both.verify({"X-Signature": base64.b64encode(_signer(algorithm, other, raw_ec)(BODY)).decode()}, BODY)


def test_rsa_padding_schemes_are_not_interchangeable(rsa_key: rsa.RSAPrivateKey) -> None:
    """A PKCS#1 v1.5 signature does not pass rsa-pss-sha256, nor a PSS signature rsa-sha256."""
    pem = (_public_pem(rsa_key),)
    pkcs1 = rsa_key.sign(BODY, padding.PKCS1v15(), hashes.SHA256()).hex()
    pss = rsa_key.sign(BODY, _pss(), hashes.SHA256()).hex()
    with pytest.raises(AuthFailed):
        Signature(SignatureSettings("X-Signature", "rsa-pss-sha256", pem)).verify({"X-Signature": pkcs1}, BODY)
    with pytest.raises(AuthFailed):
        Signature(SignatureSettings("X-Signature", "rsa-sha256", pem)).verify({"X-Signature": pss}, BODY)


def test_sign_headers_match_what_the_verifier_expects(rsa_key: rsa.RSAPrivateKey) -> None:
    """``sign_headers`` (behind ``parley-relay sign``) produces headers that pass, HMAC and RSA alike."""
    clock = Clock()
    settings = hmac_settings(prefix="sha256=", timestamp_header="X-Timestamp")
    headers = dict(sign_headers(settings, BODY, timestamp=int(clock.now)))
    assert headers == {"X-Timestamp": str(int(clock.now)),
                       "X-Signature": "sha256=" + hmac_hex(SECRET, f"{int(clock.now)}.".encode() + BODY)}
    Signature(settings, clock=clock).verify(headers, BODY)
    private = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    rsa_settings = SignatureSettings("X-Signature", "rsa-pss-sha256", (_public_pem(rsa_key),))
    Signature(rsa_settings).verify(dict(sign_headers(rsa_settings, BODY, private_key=private)), BODY)
    with pytest.raises(ValueError, match="private key"):
        sign_headers(rsa_settings, BODY)


# -- configuration ----------------------------------------------------------------------------------------


def test_signature_config_reads_secret_files_and_key_lists(sandbox: Sandbox) -> None:
    """``secret_file`` (trailing newline stripped) plus a ``keys`` list all end up as verification keys."""
    (sandbox.root / "new.key").write_bytes(SECRET + b"\n")
    (sandbox.root / "old.key").write_bytes(OLD_SECRET)
    path = sandbox.write(auth={"signature": {
        "header": "X-Hub-Signature-256", "secret_file": "new.key", "keys": [{"secret_file": "old.key"}],
        "prefix": "sha256=", "timestamp_header": "X-Timestamp", "tolerance": 60, "encoding": "hex"}})
    signature = load_config(path).auth.signature
    assert signature is not None
    assert signature.keys == (SECRET, OLD_SECRET)
    assert (signature.header, signature.prefix, signature.timestamp_header, signature.tolerance) == (
        "X-Hub-Signature-256", "sha256=", "X-Timestamp", 60.0)
    assert SECRET.decode() not in repr(signature)  # secrets stay out of reprs (and so out of tracebacks)


@pytest.mark.parametrize(("signature", "key", "message"), [
    ({"header": "X-Sig"}, "auth.signature", "give secret or secret_file"),
    ({"header": "X-Sig", "secret": "a", "secret_file": "x.key"}, "auth.signature.secret_file", "file not found"),
    ({"header": "X-Sig", "algorithm": "md5", "secret": "a"}, "auth.signature.algorithm", "must be one of"),
    ({"header": "X Sig", "secret": "a"}, "auth.signature.header", "not a valid HTTP header name"),
    ({"secret": "a"}, "auth.signature.header", "is required"),
    ({"header": "X-Sig", "algorithm": "ed25519", "secret": "a"}, "auth.signature.secret", "takes public_key_file"),
    ({"header": "X-Sig", "secret": "a", "encoding": "base32"}, "auth.signature.encoding", "must be one of"),
    ({"header": "X-Sig", "secret": "a", "tolerance": 0}, "auth.signature.tolerance", "at least"),
    ({"header": "X-Sig", "secret": "a", "keys": [{"secret_file": "missing.key"}]}, "auth.signature.keys[0].secret_file",
     "file not found"),
    ({"header": "X-Sig", "secret": "a", "colour": "red"}, "auth.signature.colour", "unknown key"),
])
def test_signature_config_problems_name_file_and_key(sandbox: Sandbox, signature: dict[str, Any], key: str,
                                                     message: str) -> None:
    """Each mistake in ``auth.signature`` is reported with the config file and the dotted key."""
    path = sandbox.write(auth={"signature": signature})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(p.file == str(path) and p.key == key and message in p.message for p in info.value.problems), \
        info.value.problems


def test_public_key_of_the_wrong_type_is_a_config_problem(sandbox: Sandbox) -> None:
    """An Ed25519 PEM for ``ecdsa-sha256`` (or a non-PEM file) is refused, naming the file and key."""
    (sandbox.root / "ed.pem").write_bytes(_public_pem(ed25519.Ed25519PrivateKey.generate()))
    (sandbox.root / "junk.pem").write_text("not a key")
    for name, needle in (("ed.pem", "cannot verify ecdsa-sha256"), ("junk.pem", "not a PEM public key")):
        path = sandbox.write(auth={"signature": {"header": "X-Sig", "algorithm": "ecdsa-sha256",
                                                 "public_key_file": name}})
        with pytest.raises(ConfigError) as info:
            load_config(path)
        (problem,) = info.value.problems
        assert problem.key == "auth.signature.public_key_file" and needle in problem.message
        assert name in problem.message


# -- end to end over HTTP ---------------------------------------------------------------------------------


async def test_signed_webhook_is_accepted_and_unsigned_refused_over_http(make_relay: MakeRelay,
                                                                         sandbox: Sandbox) -> None:
    """Over HTTP: a request signed per config is stored and delivered; a bad signature gets 401 JSON."""
    (sandbox.root / "sig.key").write_bytes(SECRET)
    r = await make_relay(auth={"signature": {"header": "X-Signature", "secret_file": "sig.key",
                                             "prefix": "sha256=", "timestamp_header": "X-Timestamp"}})
    ts = str(int(time.time()))
    good = {"X-Timestamp": ts, "X-Signature": "sha256=" + hmac_hex(SECRET, f"{ts}.".encode() + BODY)}
    assert (await r.post(raw=BODY, headers=good, auth=False))[0] == 200
    status, answer = await r.post(raw=BODY + b" ", headers=good, auth=False)
    assert (status, answer["error"]) == (401, "authentication failed")
    (request,) = await sandbox.apns.wait_for(1)
    assert request.device_token == IOS_TOKEN


def test_sign_command_prints_headers_the_relay_accepts(sandbox: Sandbox, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """``parley-relay sign --body FILE`` prints the timestamp and signature header lines."""
    (sandbox.root / "sig.key").write_bytes(SECRET)
    path = sandbox.write(auth={"signature": {"header": "X-Signature", "secret_file": "sig.key",
                                             "timestamp_header": "X-Timestamp"}})
    (tmp_path / "body.json").write_bytes(BODY)
    assert cli_main(["sign", "-c", str(path), "--body", str(tmp_path / "body.json"), "--timestamp", "1700000000"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["X-Timestamp: 1700000000",
                     "X-Signature: " + hmac_hex(SECRET, b"1700000000." + BODY)]
    assert cli_main(["sign", "-c", str(sandbox.write("plain.yaml")), "--body", str(tmp_path / "body.json")]) == 1


# -- failed-authentication limiter ------------------------------------------------------------------------


def test_limiter_answers_429_after_n_failures_within_the_window() -> None:
    """Failures 1..N pass through as 401; the next ones are limited until the window has moved on."""
    clock = Clock(0.0)
    limiter = FailureLimiter(3, 60.0, clock=clock)
    assert [limiter.failed("a").retry_after for _ in range(3)] == [None, None, None]
    verdict = limiter.failed("a")
    assert verdict.retry_after == 60.0 and verdict.first
    assert not limiter.failed("a").first  # logged once per episode, not once per attempt
    assert limiter.failed("b").retry_after is None  # other addresses are not affected
    clock.now = 61.0  # every failure so far happened at t=0: the window has moved past them
    assert limiter.failed("a").retry_after is None
    assert limiter.failures("a") == 1


def test_limiter_memory_is_bounded() -> None:
    """At most ``max_addresses`` addresses are remembered: a spray of addresses cannot grow memory."""
    limiter = FailureLimiter(2, 60.0, clock=Clock(0.0), max_addresses=100)
    for i in range(1000):
        limiter.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter._entries) == 100


def test_client_address_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    """X-Forwarded-For names the client only behind a listed proxy, read right to left past proxies."""
    fwd = {"X-Forwarded-For": "203.0.113.9, 198.51.100.7, 10.0.0.2"}
    assert client_address("192.0.2.1", fwd, ()) == "192.0.2.1"
    assert client_address("192.0.2.1", fwd, ("10.0.0.0/8",)) == "192.0.2.1"  # peer is not a proxy
    assert client_address("10.0.0.1", fwd, ("10.0.0.0/8",)) == "198.51.100.7"
    assert client_address("10.0.0.1", {"X-Forwarded-For": "junk"}, ("10.0.0.0/8",)) == "10.0.0.1"
    assert client_address("10.0.0.1", {}, ("10.0.0.0/8",)) == "10.0.0.1"


def test_authenticator_limits_failures_but_never_authenticated_requests() -> None:
    """Past the limit failures raise status 429, while a correct request from the same address passes."""
    auth = Authenticator([StaticHeaders({AUTH_HEADER: (AUTH_VALUE,)})], limiter=FailureLimiter(2, 60.0))
    for _ in range(2):
        with pytest.raises(AuthFailed) as info:
            auth.authenticate({}, b"", "192.0.2.1")
        assert info.value.status == 401
    with pytest.raises(AuthFailed) as info:
        auth.authenticate({}, b"", "192.0.2.1")
    assert info.value.status == 429 and info.value.retry_after
    auth.authenticate({AUTH_HEADER: AUTH_VALUE}, b"", "192.0.2.1")


async def test_http_429_after_failures_while_parley_still_gets_200(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """Over HTTP: the 4th wrong key in a minute gets 429 + Retry-After; the right key still gets 200."""
    r = await make_relay(auth={"headers": {AUTH_HEADER: AUTH_VALUE}, "rate_limit": {"max_failures": 3, "window": 60}})
    statuses = [(await r.post(sample("message"), headers={AUTH_HEADER: "guess"}, auth=False))[0] for _ in range(5)]
    assert statuses == [401, 401, 401, 429, 429]
    response = await r.client.post("/parley/webhook", json=sample("message"), headers={AUTH_HEADER: "guess"})
    assert response.status == 429 and int(response.headers["Retry-After"]) >= 1
    assert (await response.json())["status"] == "error"
    assert (await r.post(sample("message")))[0] == 200  # authenticated Parley traffic is never limited
    await sandbox.apns.wait_for(1)
    assert r.relay.metrics.webhooks.labels("rate_limited")._value.get() == 3


async def test_failure_counts_survive_a_reload(make_relay: MakeRelay) -> None:
    """A SIGHUP reload keeps the limiter's counts: reloading does not reset a guesser's budget."""
    r = await make_relay(auth={"headers": {AUTH_HEADER: AUTH_VALUE}, "rate_limit": {"max_failures": 2}})
    for _ in range(2):
        await r.post(sample("message"), headers={AUTH_HEADER: "guess"}, auth=False)
    assert await reload(r.relay)
    assert (await r.post(sample("message"), headers={AUTH_HEADER: "guess"}, auth=False))[0] == 429


def test_rate_limit_config_problems(sandbox: Sandbox) -> None:
    """Bad trusted proxies and negative limits name their key; defaults are 10 failures a minute."""
    assert load_config(sandbox.write()).auth.rate_limit == RateLimitSettings(10, 60.0, ())
    path = sandbox.write(auth={"headers": {AUTH_HEADER: AUTH_VALUE},
                               "rate_limit": {"max_failures": -1, "trusted_proxies": ["10.0.0.0/8", "proxy"]}})
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert {p.key for p in info.value.problems} == {"auth.rate_limit.max_failures",
                                                    "auth.rate_limit.trusted_proxies[1]"}
