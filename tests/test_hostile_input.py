"""Hostile input (SPEC §2, §9; issue 4 items 4 and 6): arbitrary bytes, arbitrary JSON and near-valid Parley
payloads against the parser and the live endpoint. The answer is always 2xx/4xx with a JSON error, never a
500; the process stays up; notifications stored before the attack are all delivered afterwards. Also the
limits: body size, nesting depth, string length, tokens per webhook, and slow clients (headers and body).

Hypothesis runs a fixed number of examples per property (``EXAMPLES``); each property prints how many ran
and which statuses came back (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import gzip
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import load_config
from relay.errors import InvalidWebhook
from relay.http.app import runner_options
from relay.inbound.parse import MAX_DEPTH, MAX_STRING, Webhook, decode_json, parse_webhook
from relay.runtime.relay import create_app
from relay.testing.sandbox import (
    ANDROID_TOKEN,
    AUTH_HEADER,
    AUTH_VALUE,
    IOS_TOKEN,
    SAMPLE_EVENT,
    SAMPLE_MESSAGE,
    Sandbox,
    sample,
)
from tests.conftest import MakeRelay, RelayUnderTest

EXAMPLES = 250
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- strategies -------------------------------------------------------------------------------------------

# Every code point, lone surrogates included (json.dumps writes them as \udXXX escapes).
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
scalars = (st.none() | st.booleans() | st.integers(min_value=-(10**40), max_value=10**40)
           | st.floats(allow_nan=False, allow_infinity=False) | any_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5)
                           | st.dictionaries(any_text, inner, max_size=5), max_leaves=25)

# Raw JSON-ish texts no json.dumps produces: huge numbers, NaN, duplicate keys, deep nesting, odd escapes.
odd_texts = st.sampled_from([
    "9" * 5000, "1e400", "-1e400", "NaN", "Infinity", "-Infinity", '{"a":1,"a":2}', '"\\ud800"', '"\\udc00\\ud800"',
    "[" * 5000, "[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), '{"data":' * 200 + "1" + "}" * 200, "\ufeff{}",
    '{"data":{"type":"message","type":"event"},"to":["a"]}', "", " ", "null", "[]", '"\\u0000"',
])

_PATHS: list[tuple[str | int, ...]] = [
    ("data",), ("data", "type"), ("data", "object"), ("data", "object", "id"), ("data", "object", "message"),
    ("data", "object", "typeId"), ("data", "object", "time"), ("data", "object", "image"),
    ("data", "object", "agent"), ("data", "object", "agent", "name"), ("data", "object", "agent", "id"),
    ("data", "object", "name"), ("data", "object", "body"), ("to",), ("to", 0), ("extra",),
    ("data", "object", "extra"),
]
TOKENS = [IOS_TOKEN, ANDROID_TOKEN, "unregistered-token-0000"]
hostile_values = (json_values | st.sampled_from([
    10**30, -(2**63) - 1, 2**63, 1.5, True, "", " ", "x" * (MAX_STRING + 1), [], {}, [None], "\ud800",
    "📷" * 100, "\u202e\u0000", [IOS_TOKEN] * 200, ["", None],
]))


def _set(doc: Any, path: tuple[str | int, ...], value: Any, delete: bool) -> None:
    target = doc
    for step in path[:-1]:
        child = target.get(step) if isinstance(target, dict) else None
        if not isinstance(child, (dict, list)):
            return  # an earlier mutation replaced the container: nothing left to change down this path
        target = child
    last = path[-1]
    if isinstance(target, dict) and isinstance(last, str):
        if delete:
            target.pop(last, None)
        else:
            target[last] = value
    elif isinstance(target, list) and isinstance(last, int) and last < len(target):
        target[last] = value


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    """One of Parley's samples with one to three fields replaced or removed, serialized in odd ways."""
    doc = copy.deepcopy(draw(st.sampled_from([SAMPLE_MESSAGE, SAMPLE_EVENT])))
    doc["to"] = draw(st.lists(st.sampled_from(TOKENS), min_size=1, max_size=3))
    for _ in range(draw(st.integers(1, 3))):
        _set(doc, draw(st.sampled_from(_PATHS)), draw(hostile_values), draw(st.booleans()))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    if draw(st.booleans()):  # a duplicate key, which json.dumps cannot write
        text = text.replace('"data": {', '"data": {"type": "event", ', 1)
    # surrogatepass turns lone surrogates into invalid UTF-8 bytes instead of failing here.
    return text.encode("utf-8", "surrogatepass")


def _json_bytes(value: Any) -> bytes:
    return json.dumps(value).encode()


bodies = st.one_of(
    st.binary(max_size=512),
    json_values.map(_json_bytes),
    odd_texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
    near_valid(),
    near_valid().map(lambda b: b[: len(b) // 2]),  # truncated mid-document
)


# -- the parser -------------------------------------------------------------------------------------------


def _parse_or_refuse(body: bytes) -> Webhook | None:
    try:
        hook = parse_webhook(body, max_tokens=100)
    except InvalidWebhook as exc:
        assert 400 <= exc.status < 500 and exc.message
        return None
    # What is accepted is storable: strict, finite, encodable JSON, and plausible tokens.
    json.loads(hook.data, parse_constant=lambda c: pytest.fail(f"stored JSON contains {c}"))
    assert hook.tokens and all(t.isprintable() for t in hook.tokens)
    return hook


def _run_property(name: str, strategy: st.SearchStrategy[bytes], check: Callable[[bytes], Any]) -> None:
    counts: collections.Counter[str] = collections.Counter()

    @SETTINGS
    @given(strategy)
    def prop(body: bytes) -> None:
        counts[check(body)] += 1

    prop()
    print(f"\n{name}: {sum(counts.values())} examples, outcomes {dict(counts)}")
    assert sum(counts.values()) >= EXAMPLES * 0.8  # the property really ran (hypothesis may skip a few)


def test_parser_never_raises_anything_but_invalid_webhook_on_arbitrary_bytes() -> None:
    """Arbitrary bytes: parse_webhook returns a Webhook or raises InvalidWebhook, nothing else."""
    _run_property("parser/bytes", st.binary(max_size=2048),
                  lambda b: "accepted" if _parse_or_refuse(b) else "refused")


def test_parser_never_raises_anything_but_invalid_webhook_on_arbitrary_json() -> None:
    """Arbitrary JSON documents (lone surrogates, huge numbers, nulls) and odd JSON texts."""
    strategy = json_values.map(_json_bytes) | odd_texts.map(lambda t: t.encode("utf-8", "surrogatepass"))
    _run_property("parser/json", strategy, lambda b: "accepted" if _parse_or_refuse(b) else "refused")


def test_parser_handles_near_valid_parley_payloads() -> None:
    """Samples with wrong types, huge numbers, nulls, invalid UTF-8 and duplicate keys: accept or refuse."""
    _run_property("parser/near-valid", near_valid(), lambda b: "accepted" if _parse_or_refuse(b) else "refused")


@pytest.mark.parametrize(("body", "needle"), [
    (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "nested deeper"),
    (b"[" * 100_000, "nested deeper"),
    (_json_bytes(sample("message", message="x" * (MAX_STRING + 1))), "longer than"),
    (_json_bytes(sample("message", to=[f"t{i}" for i in range(101)])), "more than the limit"),
    (b'{"data": {"type": "message", "type": "event"}, "to": ["a"]}', "duplicate key"),
    (b'{"data": {"type": "message", "object": {"id": NaN}}, "to": ["a"]}', "not valid JSON"),
    (b'{"data": {"type": "message", "object": {"id": 1, "x": 1e400}}, "to": ["a"]}', "out of range"),
    (b'{"data": {"type": "message", "object": {"id": 1, "x": "\\ud800"}}, "to": ["a"]}', "surrogate"),
    (b'{"data": {"type": "message", "object": {"id": 1, "message": "\\udc00"}}, "to": ["a"]}', "invalid character"),
    (b'{"data": {"type": "message", "object": {"id": ' + b"9" * 5000 + b"}}, \"to\": [\"a\"]}", "not valid JSON"),
    (b'{"data": {"type": "message", "object": {"id": 1}}, "to": ["\xff"]}', "not UTF-8"),
    (b'{"data": {"type": "message", "object": {"id": 1}}, "to": ["a\\u0000b"]}', "not a plausible push token"),
])
def test_each_limit_and_strictness_rule_refuses_with_a_clear_message(body: bytes, needle: str) -> None:
    """Depth, string length, token count, duplicates, NaN, overflow, surrogates, huge ints, bad UTF-8, NUL."""
    with pytest.raises(InvalidWebhook) as info:
        parse_webhook(body, max_tokens=100)
    assert needle in info.value.message


def test_nesting_is_bounded_by_depth_not_by_how_many_brackets_a_body_holds() -> None:
    """Bodies with at most ``MAX_DEPTH`` openers skip the depth scan (none can nest deeper); the others are
    scanned: many shallow arrays, and brackets inside strings, pass; one level too deep among them does not."""
    assert decode_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH) is not None
    assert len(decode_json(b"[" + b"[1]," * 500 + b"[]]")) == 501
    assert decode_json(b'{"m": "' + b"[{" * 100 + b'"}') == {"m": "[{" * 100}
    deep = b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1)
    with pytest.raises(InvalidWebhook, match="nested deeper"):
        decode_json(b"[" + b"[]," * 50 + deep + b"]")


# -- the live endpoint ------------------------------------------------------------------------------------


def _parley_id(raw: str) -> int | None:
    """The object id of a delivered notification; None for a hostile body's (any JSON: a list, a dict...)."""
    obj = json.loads(raw).get("object", {})
    found = obj.get("id") if isinstance(obj, dict) else None
    return found if isinstance(found, int) and not isinstance(found, bool) else None


def _delivered_ids(sandbox: Sandbox) -> set[int]:
    ids = {_parley_id(r.payload["parley"]) for r in sandbox.apns.requests if r.status == 200}
    ids |= {_parley_id(r.message.get("data", {}).get("parley", "{}")) for r in sandbox.fcm.requests if r.status == 200}
    return {i for i in ids if i is not None}


async def _store_before_attack(r: RelayUnderTest, sandbox: Sandbox) -> set[int]:
    """Post six notifications while both providers fail, so that they wait in the store during the attack."""
    sandbox.apns.fail_all(503, "ServiceUnavailable")
    sandbox.fcm.fail_all(error_code="UNAVAILABLE")
    ids = set()
    for i, token in enumerate([IOS_TOKEN] * 3 + [ANDROID_TOKEN] * 3):
        ids.add(900_000 + i)
        status, answer = await r.post(sample("message", to=[token], id=900_000 + i, message=f"before attack {i}"))
        assert (status, answer["status"]) == (200, "accepted")
    return ids


async def _delivered_after_recovery(r: RelayUnderTest, sandbox: Sandbox, ids: set[int]) -> None:
    sandbox.apns.recover()
    sandbox.fcm.recover()
    deadline = time.monotonic() + 30
    while not ids <= _delivered_ids(sandbox):
        assert time.monotonic() < deadline, f"not delivered: {ids - _delivered_ids(sandbox)}"
        await asyncio.sleep(0.05)
    assert (await r.client.get("/healthz")).status == 200


def _attack(r: RelayUnderTest, loop: asyncio.AbstractEventLoop, name: str, headers: dict[str, str],
            allowed: set[int]) -> collections.Counter[int]:
    """Run the hypothesis property in this (worker) thread, posting through the test loop."""
    statuses: collections.Counter[int] = collections.Counter()

    async def post(body: bytes, content_type: str) -> tuple[int, Any, str]:
        response = await r.client.post(r.relay.config.webhook.path, data=body,
                                       headers={**headers, "Content-Type": content_type})
        return response.status, await response.json(), response.headers.get("Content-Type", "")

    @SETTINGS
    @given(bodies, st.sampled_from(["application/json", "text/plain", "application/octet-stream",
                                    "application/json; charset=latin-1", "multipart/form-data; boundary=x"]))
    def prop(body: bytes, content_type: str) -> None:
        status, answer, answered_type = asyncio.run_coroutine_threadsafe(post(body, content_type), loop).result(30)
        statuses[status] += 1
        assert status in allowed, (status, answer, body[:200])
        assert answered_type.startswith("application/json")
        assert isinstance(answer, dict) and answer.get("status") in ("accepted", "duplicate", "ignored", "error")
        if status >= 400:
            assert isinstance(answer.get("error"), str) and answer["error"]

    prop()
    print(f"\n{name}: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    return statuses


# Hypothesis draws in a worker thread while the relay's dispatcher, on the loop thread, draws backoff jitter
# from the global ``random``; hypothesis notices the global state moving during a draw and warns. That is
# the relay's activity, not the strategy's, so that one warning is ignored in the live-endpoint tests.
LIVE_RANDOM = pytest.mark.filterwarnings(
    "ignore:Do not use the `random` module inside strategies:hypothesis.errors.HypothesisDeprecationWarning")


@LIVE_RANDOM
async def test_authenticated_attack_never_gets_500_and_stored_notifications_survive(
        make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """With the right key, hostile bodies get 200/400/413 JSON answers; what was stored is still delivered."""
    r = await make_relay()
    ids = await _store_before_attack(r, sandbox)
    loop = asyncio.get_running_loop()
    statuses = await asyncio.to_thread(_attack, r, loop, "endpoint/authenticated", {AUTH_HEADER: AUTH_VALUE},
                                       {200, 400, 413})
    assert 500 not in statuses and sum(statuses.values()) >= EXAMPLES * 0.8
    assert statuses[400] > 0  # the attack did reach the parser
    assert r.relay.metrics.webhooks.labels("invalid")._value.get() == statuses[400]
    await _delivered_after_recovery(r, sandbox, ids)


@LIVE_RANDOM
async def test_unauthenticated_attack_is_refused_before_parsing(make_relay: MakeRelay, sandbox: Sandbox) -> None:
    """Without credentials every hostile body gets 401 (or 429 once limited), nothing is stored."""
    r = await make_relay()
    ids = await _store_before_attack(r, sandbox)
    accepted_before = (await r.relay.store.stats()).accepted
    loop = asyncio.get_running_loop()
    statuses = await asyncio.to_thread(_attack, r, loop, "endpoint/unauthenticated", {AUTH_HEADER: "guess"},
                                       {401, 429})
    assert statuses[401] == 10 and statuses[429] > 0  # the default limit: 10 failures a minute
    assert (await r.relay.store.stats()).accepted == accepted_before
    await _delivered_after_recovery(r, sandbox, ids)


# -- body size and slow clients ---------------------------------------------------------------------------


async def test_oversized_bodies_get_413_however_they_are_sent(make_relay: MakeRelay) -> None:
    """Over max_body_bytes: 413 JSON with Content-Length, chunked, or as a gzip bomb."""
    r = await make_relay(webhook={"max_body_bytes": 4096})
    big = _json_bytes(sample("message", message="x" * 5000))
    status, answer = await r.post(raw=big)
    assert (status, answer["status"]) == (413, "error")

    async def chunks() -> Any:
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    response = await r.client.post("/parley/webhook", data=chunks(), headers={AUTH_HEADER: AUTH_VALUE})
    assert response.status == 413 and (await response.json())["status"] == "error"
    bomb = gzip.compress(b" " * 50_000_000)  # 50 MB of spaces in ~50 KB
    response = await r.client.post("/parley/webhook", data=bomb, headers={
        AUTH_HEADER: AUTH_VALUE, "Content-Encoding": "gzip", "Content-Type": "application/json"})
    assert response.status == 413 and (await response.json())["status"] == "error"  # counted decompressed
    assert (await r.post(sample("message")))[0] == 200  # and the relay carries on


@pytest.fixture
async def slow_relay(sandbox: Sandbox) -> AsyncIterator[tuple[str, int]]:
    """A relay served as ``serve`` does, with the production runner options (idle 0.5 s, body read 0.5 s)."""
    config = load_config(sandbox.write(listen={"host": "127.0.0.1", "port": 0, "idle_timeout": 0.5},
                                       webhook={"read_timeout": 0.5}))
    # A real AppRunner: aiohttp's TestServer drops runner keyword arguments.
    runner = web.AppRunner(create_app(config), access_log=None, **runner_options(config))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield str(host), int(port)
    await runner.cleanup()


async def test_slow_headers_are_cut_off_after_the_idle_timeout(slow_relay: tuple[str, int]) -> None:
    """A client trickling header bytes (slowloris) is disconnected after listen.idle_timeout."""
    reader, writer = await asyncio.open_connection(*slow_relay)
    writer.write(b"POST /parley/webhook HTTP/1.1\r\nHost: relay\r\n")
    started = time.monotonic()
    closed = False
    while time.monotonic() - started < 5:
        writer.write(b"X")  # one more byte of an endless header line, every 50 ms
        try:
            if await asyncio.wait_for(reader.read(1024), 0.05) == b"":
                closed = True
                break
        except TimeoutError:
            continue
        except ConnectionError:
            closed = True
            break
    writer.close()
    assert closed and time.monotonic() - started < 2.5


async def test_slow_body_gets_408_after_the_read_timeout(slow_relay: tuple[str, int]) -> None:
    """Headers complete but the body never finishes: 408 JSON after webhook.read_timeout, not a held handler."""
    reader, writer = await asyncio.open_connection(*slow_relay)
    writer.write(b"POST /parley/webhook HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
                 + f"{AUTH_HEADER}: {AUTH_VALUE}\r\nContent-Length: 500\r\n\r\n".encode() + b'{"data":')
    started = time.monotonic()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 408")
    assert time.monotonic() - started < 2.0
    writer.close()


async def test_server_options_carry_the_configured_timeouts(sandbox: Sandbox) -> None:
    """runner_options hands listen.idle_timeout to aiohttp as keepalive_timeout (default 75 s)."""
    assert runner_options(load_config(sandbox.write()))["keepalive_timeout"] == 75.0
    config = load_config(sandbox.write(listen={"host": "127.0.0.1", "port": 0, "idle_timeout": 7}))
    runner = web.AppRunner(web.Application(), **runner_options(config))
    await runner.setup()
    try:
        assert runner.server is not None
        handler: Any = runner.server()
        assert handler.keepalive_timeout == 7.0
    finally:
        await runner.cleanup()
