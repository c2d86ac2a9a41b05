"""Log lines (SPEC §8, issue 19 part 3, issue 20 items 5 and 10): rendered by structlog, one line per record
whatever the input, the line's own keys never overwritten, chatty libraries demoted, and a budget for the
routine trace lines so that journald's rate limit never drops the lines that matter."""

from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.observability import LOGGER_NAME, LineBudget, event, formatter, name_process, setup_logging, trace_budget
from relay.testing.sandbox import AUTH_VALUE, IOS_TOKEN, Sandbox, sample
from tests.conftest import MakeRelay

# Anything a sender controls: every code point class, with the ones that forge lines weighted in.
HOSTILE = st.lists(st.one_of(
    st.characters(codec=None),
    st.sampled_from(["\n", "\r", "\x1b[31m", "\x1b]0;title\x07", "\u2028", "\u202e", "\x00", "\x7f", "\x85",
                     "\ud800", "\udfff", '"', "\\", "=", " ", "level=error", 'event="forged"']),
), max_size=20).map("".join)
UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u202a-\u202e\u2066-\u2069]")  # never raw
LOGFMT_PAIR = re.compile(r'([^\s=]+)=("(?:[^"\\]|\\.)*"|[^\s"]*)(?:\s|$)')


def parse_logfmt(line: str) -> dict[str, str]:
    """A strict logfmt reader: the whole line must be ``key=value`` pairs, values bare or double-quoted."""
    pairs, at = {}, 0
    for match in LOGFMT_PAIR.finditer(line):
        assert match.start() == at, f"unparseable at {at}: {line!r}"
        value = match.group(2)
        pairs[match.group(1)] = re.sub(r"\\(.)", r"\1", value[1:-1]) if value.startswith('"') else value
        at = match.end()
    assert at == len(line), f"unparseable tail: {line[at:]!r}"
    return pairs


def render(fmt: str, name: str, **fields: Any) -> str:
    """One record through the relay's formatter, as setup_logging installs it."""
    record = logging.LogRecord(LOGGER_NAME, logging.INFO, __file__, 1, name, None, None)
    record.fields = fields
    return formatter(fmt).format(record)


def assert_one_clean_line(line: str) -> None:
    assert "\n" not in line and "\r" not in line
    assert not UNSAFE.search(line), repr(line)
    assert line.isprintable() or all(ch.isprintable() or ch in " " or not UNSAFE.match(ch) for ch in line)


@settings(max_examples=400, deadline=None)
@given(name=HOSTILE, value=HOSTILE, other=HOSTILE)
def test_any_text_renders_as_one_parseable_line_in_both_formats(name: str, value: str, other: str) -> None:
    """Whatever text reaches a field or the event name, each format writes one line with no raw control
    character, that parses back to the same keys, and the line's own keys (``event``, ``level``) stay ours."""
    fields = {"type": value, "event": other, "level": other, "request_id": value}
    line = render("logfmt", name, **fields)
    assert_one_clean_line(line)
    parsed = parse_logfmt(line)
    assert parsed["level"] == "info"
    assert set(parsed) >= {"ts", "level", "event", "type", "event_", "level_", "request_id"}
    doc = json.loads(rendered := render("json", name, **fields))
    assert_one_clean_line(rendered)
    assert doc["level"] == "info" and doc["event_"] is not None and doc["level_"] is not None
    assert list(doc)[:3] == ["ts", "level", "event"]


def test_a_control_character_is_written_escaped_not_raw() -> None:
    """ESC and CR reach the line as visible ``\\x1b`` / ``\\x0d``, so a terminal or the journal shows them inert."""
    line = render("logfmt", "webhook ignored", type="x\x1b[2J\r\nlevel=error event=forged")
    assert "\\x1b[2J" in line and "\\x0d" in line and "\\x0a" in line
    assert parse_logfmt(line)["event"] == "webhook ignored"


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """The relay's own handlers (logfmt and JSON, DEBUG) writing into buffers; restored afterwards."""
    logger, root = logging.getLogger(LOGGER_NAME), logging.getLogger()
    saved = (list(logger.handlers), logger.level, logger.propagate, list(root.handlers))
    buffers = io.StringIO(), io.StringIO()
    setup_logging("json", "DEBUG")
    json_handler = logger.handlers[0]
    setup_logging("logfmt", "DEBUG")
    assert isinstance(json_handler, logging.StreamHandler)
    json_handler.setStream(buffers[1])
    handler = logger.handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buffers[0])
    logger.addHandler(json_handler)
    caplog.set_level(logging.DEBUG)
    try:
        yield buffers
    finally:
        logger.handlers[:], logger.level, logger.propagate, root.handlers[:] = saved


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=HOSTILE)
async def test_input_a_sender_controls_never_forges_a_log_line(
        make_relay: MakeRelay, captured: tuple[io.StringIO, io.StringIO], text: str) -> None:
    """Arbitrary text in every field a sender or API client controls (``data.type``, an event name, push
    tokens, X-Request-Id, the device API's token and app, OAuth client ids) leaves every record one line,
    parseable, without a raw control character or a secret."""
    r = await make_relay(webhook={"unknown_events": "ignore"})
    safe_header = "".join(c for c in text if " " <= c < "\x7f")[:60]  # what an HTTP client can send
    hostile = text or "x"
    await r.post({"type": "message", "data": {"type": hostile, "object": {}}, "to": [IOS_TOKEN]},
                 headers={"X-Request-Id": safe_header})
    await r.post(sample("typing_start", to=[IOS_TOKEN]) | {"data": {"type": "event", "object": {
        "name": hostile, "body": {"agent": {"uid": hostile}}}}})
    await r.post(sample("message", to=[hostile[:200]]))
    await r.post(sample("message", to=[IOS_TOKEN]), auth=False)  # refused: logs the peer, never the secret
    await r.client.put(f"/v1/devices/{hostile[:100].encode('utf-8', 'surrogatepass').hex()}x",
                       json={"app": hostile}, headers={"Authorization": "Bearer " + safe_header})
    await r.client.post("/oauth/token", data={"grant_type": "client_credentials", "client_id": hostile.encode(
        "utf-8", "replace").decode(), "client_secret": AUTH_VALUE})
    logfmt, json_lines = (b.getvalue().splitlines() for b in captured)
    assert logfmt and len(logfmt) == len(json_lines)
    for line in logfmt:
        assert_one_clean_line(line)
        assert AUTH_VALUE not in line and IOS_TOKEN not in line
        parse_logfmt(line)
    for line in json_lines:
        assert_one_clean_line(line)
        assert AUTH_VALUE not in line
        json.loads(line)
    for b in captured:
        b.seek(0)
        b.truncate()


async def test_an_event_name_is_logged_beside_the_line_name_not_over_it(make_relay: MakeRelay,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """An ignored unknown event logs ``event="webhook ignored"`` and the event's own name apart (it once
    replaced the line's name with Parley's text)."""
    r = await make_relay(webhook={"unknown_events": "ignore"})
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    await r.post({"type": "message", "data": {"type": "event", "object": {"name": "agentWaves"}}, "to": [IOS_TOKEN]})
    (record,) = [rec for rec in caplog.records if rec.getMessage() == "webhook ignored"]
    parsed = parse_logfmt(formatter("logfmt").format(record))
    assert parsed["event"] == "webhook ignored" and parsed["event_name"] == "agentWaves"


def test_aioapns_connection_errors_are_demoted_to_debug(captured: tuple[io.StringIO, io.StringIO],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """aioapns' ERROR "Could not connect to server" (18 a minute in an outage, no app, no host) is written at
    debug, in the relay's format, so ``journalctl -p err`` shows the relay's own reason instead."""
    logging.getLogger("aioapns").error("Could not connect to server: %s", "[Errno -2] Name or service not known")
    (record,) = [r for r in caplog.records if r.name == "aioapns"]
    parsed = parse_logfmt(formatter("logfmt").format(record))
    assert parsed["level"] == "debug" and parsed["logger"] == "aioapns"
    logging.getLogger(LOGGER_NAME).setLevel(logging.INFO)
    logging.getLogger("aioapns").error("Could not connect to server")
    assert len([r for r in caplog.records if r.name == "aioapns"]) == 1  # not written at all at INFO


def test_lines_from_executor_threads_name_their_process(captured: tuple[io.StringIO, io.StringIO]) -> None:
    """``process=`` is on every line of a role's process, also those the store writes from its threads."""
    name_process("delivery.0")
    try:
        thread = threading.Thread(target=event, args=(logging.WARNING, "store slow"), kwargs={"ms": 3})
        thread.start()
        thread.join()
    finally:
        name_process(None)
    assert parse_logfmt(captured[0].getvalue().splitlines()[-1])["process"] == "delivery.0"


class FakeTime:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_line_budget_passes_a_burst_then_counts_and_summarizes(caplog: pytest.LogCaptureFixture) -> None:
    """50 routine lines a second pass; the rest are counted, and one summary line every 10 s says how many."""
    clock = FakeTime()
    budget = LineBudget(50, clock)
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    assert sum(budget.allow("webhook accepted") for _ in range(300)) == 50
    clock.now += 1.0
    assert sum(budget.allow("delivery sent") for _ in range(300)) == 50
    clock.now += 10.0
    assert budget.allow("webhook accepted")
    (summary,) = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "trace lines sampled"]
    assert summary["webhook_accepted"] == 250 and summary["delivery_sent"] == 250
    assert LineBudget(0, clock).allow("x")  # 0: every line


async def test_at_volume_routine_lines_are_sampled_and_every_failure_is_written(
        make_relay: MakeRelay, sandbox: Sandbox, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """At the default budget, 300 webhooks in a burst write at most ~50 "webhook accepted" lines (journald's
    default limit would otherwise drop lines at ~170 notifications/s), while every dead-lettered end, which
    calls for action, is written."""
    r = await make_relay(routing=[{"match": "apns-hex", "app": "ios"}])
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    # The budget is the process's: lines of earlier tests may have spent part of it, so it starts full here.
    monkeypatch.setattr(trace_budget, "tokens", trace_budget.per_second)
    monkeypatch.setattr(trace_budget, "stamp", time.monotonic())
    started = time.monotonic()
    for i in range(300):
        doc = sample("message", to=[IOS_TOKEN])
        doc["data"]["object"]["id"] = 10_000 + i
        assert (await r.post(doc))[0] == 200
    elapsed = time.monotonic() - started
    # "webhook accepted" shares the budget with the routine lines of the pushes sent meanwhile.
    routine = [rec for rec in caplog.records if rec.getMessage() == "webhook accepted" or (
        rec.getMessage() == "delivery ended" and getattr(rec, "fields", {}).get("state") == "sent")]
    assert 50 <= len(routine) <= 50 + 50 * elapsed + 1 < 300, (len(routine), elapsed)
    await r.settle()
    sandbox.apns.fail_all(400, "BadCollapseId")  # permanent: each delivery ends dead-lettered
    tokens = [f"{i:064x}" for i in range(80)]
    assert (await r.post(sample("message", to=tokens)))[0] == 200
    await r.settle()
    ends = [getattr(rec, "fields", {}) for rec in caplog.records if rec.getMessage() == "delivery ended"]
    assert sum(1 for f in ends if f["state"] == "dead_letter") == 80
