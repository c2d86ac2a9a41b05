"""Privacy of the logs (SPEC §3, issue 4 item 5): with DEBUG logging on, in both formats, no secret, bearer
token, Basic credential, signature or message text appears in any log line, and push tokens only shortened.

One relay with every auth layer on runs the webhook scenarios of the suite (accepted, duplicate, ignored,
invalid, refused, rate limited, token issued and refused, delivered, retried, dead token, reload), then every
captured line is scanned for each sensitive value used.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from relay.config import OAuthSettings
from relay.inbound.oauth import TokenAuthority
from relay.observability import LOGGER_NAME, setup_logging, short_token
from relay.runtime.relay import reload
from relay.testing.sandbox import (
    ANDROID_TOKEN,
    AUTH_HEADER,
    AUTH_VALUE,
    IOS_TOKEN,
    Sandbox,
    sample,
)
from tests.conftest import MakeRelay, RelayUnderTest

HMAC_SECRET = "privacy-hmac-secret-5b0e7f"
CLIENT_SECRET = "privacy-client-secret-a81c44d2"
SIGNING_SECRET = "privacy-token-signing-secret-" + "3f" * 16
DEAD_TOKEN = "deadbeef" * 8


@dataclass
class Logs:
    """Every line the relay (logfmt and JSON) and any other logger (aiohttp, root) wrote."""

    logfmt: io.StringIO = field(default_factory=io.StringIO)
    json: io.StringIO = field(default_factory=io.StringIO)

    def text(self, caplog: pytest.LogCaptureFixture) -> str:
        return f"{self.logfmt.getvalue()}\n{self.json.getvalue()}\n{caplog.text}"


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Iterator[Logs]:
    """DEBUG logging through the relay's own formatters into buffers; restored afterwards."""
    logger, root = logging.getLogger(LOGGER_NAME), logging.getLogger()
    saved = (list(logger.handlers), logger.level, logger.propagate)
    saved_root = list(root.handlers)  # setup_logging also gives a bare root logger its handler
    captured = Logs()
    setup_logging("json", "DEBUG")
    json_handler = logger.handlers[0]
    setup_logging("logfmt", "DEBUG")
    logfmt_handler = logger.handlers[0]
    assert isinstance(json_handler, logging.StreamHandler) and isinstance(logfmt_handler, logging.StreamHandler)
    json_handler.setStream(captured.json)
    logfmt_handler.setStream(captured.logfmt)
    logger.addHandler(json_handler)
    caplog.set_level(logging.DEBUG)  # everything else: aiohttp's access and server logs, the root logger
    try:
        yield captured
    finally:
        logger.handlers[:], logger.level, logger.propagate = saved
        root.handlers[:] = saved_root


@dataclass
class Secrets:
    """Every sensitive value a scenario used; none may reach a log line."""

    values: set[str] = field(default_factory=set)

    def add(self, *values: str) -> None:
        self.values.update(v for v in values if v)


def _oauth_settings(r: RelayUnderTest) -> OAuthSettings:
    oauth = r.relay.config.auth.oauth
    assert oauth is not None
    return oauth


def _signed(body: bytes, secrets: Secrets, ts: int | None = None) -> dict[str, str]:
    stamp = str(int(time.time()) if ts is None else ts)
    signature = "sha256=" + hmac.new(HMAC_SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
    secrets.add(signature, signature.removeprefix("sha256="))
    return {"X-Timestamp": stamp, "X-Signature": signature}


async def _post(r: RelayUnderTest, doc: Any, secrets: Secrets, *, token: str | None, raw: bytes | None = None,
                overrides: dict[str, str] | None = None) -> int:
    body = raw if raw is not None else json.dumps(doc, ensure_ascii=False).encode()
    headers = {AUTH_HEADER: AUTH_VALUE, **_signed(body, secrets)}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    headers.update(overrides or {})
    response = await r.client.post("/parley/webhook", data=body, headers=headers)
    return response.status


async def _token(r: RelayUnderTest, secrets: Secrets, secret: str = CLIENT_SECRET, *, form: bool = False) -> str:
    if form:
        response = await r.client.post("/oauth/token", data={
            "grant_type": "client_credentials", "client_id": "parley", "client_secret": secret})
    else:
        basic = aiohttp.encode_basic_auth("parley", secret)
        secrets.add(basic, basic.removeprefix("Basic "))
        response = await r.client.post("/oauth/token", data={"grant_type": "client_credentials"},
                                       headers={"Authorization": basic})
    body = await response.json()
    token = str(body.get("access_token", ""))
    secrets.add(token)
    return token


async def _wait(condition: Any, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "scenario did not complete"
        await __import__("asyncio").sleep(0.05)


async def test_no_secret_token_signature_or_message_text_in_debug_logs(
        make_relay: MakeRelay, sandbox: Sandbox, logs: Logs, caplog: pytest.LogCaptureFixture) -> None:
    """Run every webhook scenario at DEBUG; scan logfmt, JSON and third-party logs for each sensitive value."""
    secrets = Secrets()
    secrets.add(AUTH_VALUE, HMAC_SECRET, CLIENT_SECRET, SIGNING_SECRET, IOS_TOKEN, ANDROID_TOKEN, DEAD_TOKEN)
    texts = [f"private message text number {i} 🤫" for i in range(6)]
    secrets.add(*texts)
    (sandbox.root / "hmac.key").write_text(HMAC_SECRET)
    devices = {**sandbox.devices, DEAD_TOKEN: {"app": "ios"}}
    r = await make_relay(devices=devices, auth={
        "headers": {AUTH_HEADER: AUTH_VALUE},
        "signature": {"header": "X-Signature", "secret_file": "hmac.key", "prefix": "sha256=",
                      "timestamp_header": "X-Timestamp"},
        "oauth": {"clients": {"parley": {"secret_sha256": hashlib.sha256(CLIENT_SECRET.encode()).hexdigest(),
                                         "scopes": ["push"]}},
                  "signing_secret": SIGNING_SECRET},
        "rate_limit": {"max_failures": 3},
    })

    # OAuth: issued by Basic and by form, refused for a wrong secret.
    token = await _token(r, secrets)
    await _token(r, secrets, form=True)
    assert await _token(r, secrets, CLIENT_SECRET[:-1] + "x") == ""
    secrets.add(CLIENT_SECRET[:-1] + "x")

    # Accepted and delivered: a message to iOS (retried once), a message to Android, an event.
    sandbox.apns.respond(IOS_TOKEN, 503, "ServiceUnavailable", times=1)
    sandbox.apns.respond(DEAD_TOKEN, 410, "Unregistered")
    assert await _post(r, sample("message", to=[IOS_TOKEN], id=1, message=texts[0]), secrets, token=token) == 200
    assert await _post(r, sample("message", to=[ANDROID_TOKEN], id=2, message=texts[1]), secrets, token=token) == 200
    assert await _post(r, sample("event", to=[ANDROID_TOKEN]), secrets, token=token) == 200
    assert await _post(r, sample("message", to=[DEAD_TOKEN], id=3, message=texts[2]), secrets, token=token) == 200
    # Duplicate, ignored type, unknown token, invalid shape carrying message text, invalid UTF-8.
    assert await _post(r, sample("message", to=[IOS_TOKEN], id=1, message=texts[0]), secrets, token=token) == 200
    assert await _post(r, {"data": {"type": "future", "object": {"message": texts[3]}}, "to": [IOS_TOKEN]},
                       secrets, token=token) == 200
    invalid = {"data": {"type": "message", "object": {"message": texts[4]}}, "to": [IOS_TOKEN]}
    assert await _post(r, invalid, secrets, token=token) == 400
    assert await _post(r, None, secrets, token=token, raw=texts[5].encode() + b"\xff") == 400

    # Refused: wrong static header, wrong signature, replayed, expired and forged tokens, then rate limited.
    doc = sample("message", to=[IOS_TOKEN], id=9, message=texts[0])
    assert await _post(r, doc, secrets, token=token, overrides={AUTH_HEADER: AUTH_VALUE + "x"}) == 401
    secrets.add(AUTH_VALUE + "x")
    assert await _post(r, doc, secrets, token=token, overrides={"X-Signature": "sha256=" + "ab" * 32}) == 401
    body = json.dumps(doc).encode()
    replayed = _signed(body, secrets, ts=1_600_000_000)
    assert await _post(r, doc, secrets, token=token, raw=body, overrides=replayed) == 429
    expired = TokenAuthority(_oauth_settings(r), clock=lambda: time.time() - 7200).mint("parley", ()).access_token
    secrets.add(expired)
    assert await _post(r, doc, secrets, token=expired) == 429
    assert await _post(r, doc, secrets, token=token) == 200  # still fine for the real sender

    await _wait(lambda: len([q for q in sandbox.apns.requests if q.status == 200]) >= 2
                and len([q for q in sandbox.fcm.requests if q.status == 200]) >= 2
                and r.relay.registry.is_dead(DEAD_TOKEN))
    await r.settle()
    assert await reload(r.relay)
    secrets.add(*sandbox.apns.jwts_seen)  # the relay's own provider credentials are secrets too

    text = logs.text(caplog)
    leaks = sorted(s for s in secrets.values if s in text)
    assert not leaks, f"sensitive values in logs: {[s[:12] + '…' for s in leaks]}"
    # The scan had something to scan: DEBUG lines with shortened tokens, refusals, issued tokens.
    assert short_token(IOS_TOKEN) in logs.logfmt.getvalue()
    assert short_token(ANDROID_TOKEN) in logs.json.getvalue()
    for needle in ("level=debug", "webhook refused", "oauth token issued", "oauth token refused", "status=429",
                   "webhook accepted", "delivery waits", "delivery ended", "message_id="):
        assert needle in logs.logfmt.getvalue(), needle
    relay_lines = [line for line in logs.logfmt.getvalue().splitlines() if " logger=" not in line]
    assert len(relay_lines) >= 15


def test_an_unexpected_delivery_error_logs_its_type_never_its_message(logs: Logs,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """An exception raised while delivering may quote a token or a body: its log line keeps only the type."""
    from relay.delivery.trace import delivery_error
    from relay.store.base import Job

    body = "private message text in an exception 🤫"
    job = Job("1", "d1", IOS_TOKEN, "message", body.encode(), 100.0, 1e12, 0, app="ios", request_id="r1")
    delivery_error(job, KeyError(f"{IOS_TOKEN} {body}"), "ios", 101.0, 100.5)
    text = logs.text(caplog)
    assert "error_type=KeyError" in text and short_token(IOS_TOKEN) in text
    assert IOS_TOKEN not in text and body not in text
