"""APNs streams: a send given up by the timeout resets its HTTP/2 stream, and answers are matched by stream id."""

from __future__ import annotations

import uuid

from relay.config import ApnsApp, load_config
from relay.outcome import Outcome
from relay.providers import Bounded
from relay.providers.apns import ApnsProvider
from relay.push import ApnsPush
from relay.testing.sandbox import Sandbox
from tests.conftest import wait_until


def _ios(sandbox: Sandbox) -> ApnsApp:
    app = load_config(sandbox.write(apps={"ios": {"max_connections": 1}})).apps["ios"]
    assert isinstance(app, ApnsApp)
    return app


async def test_apns_retry_with_the_same_apns_id_gets_its_own_verdict_not_the_timed_out_streams(
        sandbox: Sandbox) -> None:
    """The first send times out after its body left; APNs would answer it (410) only once the retry (same apns-id,
    same connection) arrives. The given-up stream was reset, so the retry gets its own 200, and the fake saw the
    RST_STREAM."""
    token = "ad" * 32
    sandbox.apns.answer_late(token, 410, "Unregistered")
    provider = Bounded(ApnsProvider(_ios(sandbox)), concurrency=10, timeout=0.3)
    push = _push(token)
    try:
        first = await provider.send(push)
        retry = await provider.send(push)
    finally:
        await provider.close()
    assert first.outcome is Outcome.RETRY and "timeout" in first.reason
    assert (retry.outcome, retry.status) == (Outcome.SENT, 200)
    requests = sandbox.apns.requests
    assert [r.status for r in requests] == [410, 200]
    assert requests[0].headers["apns-id"] == requests[1].headers["apns-id"]
    assert {r.connection_id for r in requests} == {1}  # one connection: the case where ids could be confused
    assert sandbox.apns.streams_reset == 1


async def test_apns_stream_given_up_while_waiting_for_its_answer_frees_its_slot(sandbox: Sandbox) -> None:
    """With room for one stream per connection, a hung send that times out gives its stream back (reset), so the
    next send uses the same connection instead of waiting for a slot that never frees."""
    provider = Bounded(ApnsProvider(_ios(sandbox)), concurrency=10, timeout=0.3)
    inner = provider.inner
    assert isinstance(inner, ApnsProvider)
    try:
        assert (await provider.send(_push("a1" * 32))).outcome is Outcome.SENT
        connection = await inner._pools["production"].acquire()
        connection.free_channels.bound = 1
        sandbox.apns.hang(True)
        hung = await provider.send(_push("a2" * 32))
        sandbox.apns.recover()
        await wait_until(lambda: sandbox.apns.streams_reset == 1)
        after = await provider.send(_push("a3" * 32))
    finally:
        sandbox.apns.recover()
        await provider.close()
    assert hung.outcome is Outcome.RETRY and after.outcome is Outcome.SENT
    assert sandbox.apns.connections_opened == 1


async def test_apns_authorization_and_per_push_headers_stay_out_of_the_hpack_table(sandbox: Sandbox) -> None:
    """h2 no longer normalizes the relay's request headers (a tenth of a push's CPU); the provider token is still
    sent never-indexed, as h2 made it, and so are the values unique to each push (path, apns-id), twice over
    one connection; the headers arrive lowercase and exactly as built."""
    provider = Bounded(ApnsProvider(_ios(sandbox)), concurrency=10, timeout=5)
    tokens = ["ab" * 32, "cd" * 32]
    try:
        results = [await provider.send(_push(token)) for token in tokens]
    finally:
        await provider.close()
    assert [r.outcome for r in results] == [Outcome.SENT, Outcome.SENT]
    requests = sandbox.apns.requests
    assert {r.connection_id for r in requests} == {1}
    for request, token in zip(requests, tokens, strict=True):
        assert {"authorization", ":path", "apns-id"} <= request.never_indexed
        assert "apns-topic" not in request.never_indexed  # repeats on every push: indexed
        assert request.headers[":path"] == f"/3/device/{token}"
        assert request.headers["authorization"].startswith("bearer ")
        assert all(name == name.lower() for name in request.headers)


def _push(token: str) -> ApnsPush:
    return ApnsPush("ios", token, str(uuid.uuid4()), "alert", 10, None, None, {"aps": {"alert": "hi"}})
