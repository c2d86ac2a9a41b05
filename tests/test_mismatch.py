"""Topic and sender mismatches judged in context (issue 17.3), and circuits kept across a reload (issue 20.9), on
the real ``parley-relay serve`` in its default process model, against fakes scripted to answer like Apple and
Google."""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from relay.cli import main
from relay.delivery.mismatch import Mismatches, Verdict
from relay.testing.process import NotifySocket, RelayProcess, free_port
from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE, IOS_TOKEN, Sandbox, sample

HOOK = "/parley/webhook"
APNS_TOKENS = [f"{i:02x}" * 32 for i in range(1, 9)]  # eight iOS devices
FCM_TOKENS = [f"fcm-device-{i}:APA91b" + "x" * 30 for i in range(1, 9)]  # eight Android devices




def _post(sock: socket.socket, doc: Any, path: str = HOOK) -> tuple[int, str]:
    data = None if doc is None else json.dumps(doc).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{sock.getsockname()[1]}{path}", data=data,
                                     headers={AUTH_HEADER: AUTH_VALUE})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metrics(ops: int) -> str:
    """The merged /metrics of every process, from the operations listener."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ops}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _wait(predicate: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _start(sandbox: Sandbox, notify: NotifySocket, sock: socket.socket, devices: dict[str, dict[str, str]],
           ops: int = 0, **overrides: Any) -> RelayProcess:
    """The relay, its operations listener (/metrics) on ``ops``."""
    config = sandbox.write(devices=devices, metrics={"listen": {"host": "127.0.0.1", "port": ops}}, **overrides)
    relay = RelayProcess(config, notify=notify, activation=[("webhook", sock)])
    try:
        notify.wait_for("READY=1", timeout=30)
    except TimeoutError:
        relay.__exit__()
        raise AssertionError(f"relay did not become ready:\n{relay.log()}") from None
    return relay


def _reload(relay: RelayProcess, notify: NotifySocket) -> float:
    """SIGHUP and wait for the supervisor's READY=1 again; returns when it was sent."""
    mark = len(notify.messages)
    relay.signal(signal.SIGHUP)
    ready = notify.wait_for("READY=1", timeout=30, start=mark)
    assert not ready.fields.get("STATUS", "").startswith("reload rejected"), ready.fields
    return time.monotonic()


def _dead_tokens(config: Path) -> int:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["stats", "--json", "--config", str(config)])
    return int(json.loads(out.getvalue())["dead_tokens"])


def _sent_ids(sandbox: Sandbox, platform: str) -> set[int]:
    """Parley message ids the fake of ``platform`` accepted."""
    if platform == "apns":
        raws = [q.payload.get("parley") for q in sandbox.apns.requests if q.status == 200]
    else:
        raws = [q.message.get("data", {}).get("parley") for q in sandbox.fcm.requests if q.status == 200]
    return {int(json.loads(raw)["object"]["id"]) for raw in raws if raw}


def _mismatch_everywhere(sandbox: Sandbox, platform: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Script the fake so that the relay's app is another app's (wrong topic / service account of another
    project): config overrides for the mistake, then for the fix."""
    if platform == "apns":
        sandbox.apns.bind_topic("com.example.parleyapp")
        return {"apps": {"ios": {"topic": "com.example.otherapp"}}}, {}
    sandbox.fcm.bind_project("demo-project")
    other = sandbox.fcm.make_service_account("another-project")
    other.write(sandbox.root / "other-firebase.json")
    return {"apps": {"android": {"service_account_file": "other-firebase.json"}}}, {}


@pytest.mark.parametrize("platform", ["apns", "fcm"])
def test_a_mismatch_across_devices_is_the_apps_alarm_kills_no_token_and_the_fixing_reload_sends_all(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket, platform: str) -> None:
    """DeviceTokenNotForTopic / SENDER_ID_MISMATCH for 8 devices: the app's alarm (metric with its reason, log), no
    token marked dead, every notification kept; after the reload that fixes the topic or service account, all 8
    are sent within 5 s."""
    app, tokens = ("ios", APNS_TOKENS) if platform == "apns" else ("android", FCM_TOKENS)
    mistake, fix = _mismatch_everywhere(sandbox, platform)
    devices = {token: {"app": app} for token in tokens}
    ops = free_port()
    with _start(sandbox, notify, webhook_socket, devices, ops, **mistake) as relay:
        for i, token in enumerate(tokens, 1):
            assert _post(webhook_socket, sample("message", to=[token], id=i))[0] == 200
        reason = "DeviceTokenNotForTopic" if platform == "apns" else "SENDER_ID_MISMATCH"
        _wait(lambda: f'parley_relay_app_alarm_reason{{app="{app}",reason="{reason}"}} 1.0' in _metrics(ops),
              what="the app's alarm with its reason")
        assert f'parley_relay_app_alarm{{app="{app}"}} 1.0' in _metrics(ops)
        assert "app configuration alarm" in relay.log() and reason in relay.log()
        assert "push token is dead" not in relay.log()
        assert _dead_tokens(relay.config) == 0
        assert _sent_ids(sandbox, platform) == set()

        sandbox.write(devices=devices, metrics={"listen": {"host": "127.0.0.1", "port": ops}}, **fix)
        reloaded = _reload(relay, notify)
        _wait(lambda: _sent_ids(sandbox, platform) == set(range(1, 9)), timeout=5,
              what="every kept notification within 5 s of the fixing reload")
        assert time.monotonic() - reloaded < 5
        assert _dead_tokens(relay.config) == 0
        assert f'parley_relay_app_alarm{{app="{app}"}} 0.0' in _metrics(ops)
        assert relay.stop() == 0


@pytest.mark.parametrize("platform", ["apns", "fcm"])
def test_one_devices_mismatch_while_the_app_delivers_to_others_ends_that_token(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket, platform: str) -> None:
    """A genuine DeviceTokenNotForTopic / SENDER_ID_MISMATCH for one device: its first answer holds it (evidence,
    not a verdict); once another device of the app is delivered to, its next mismatch marks it dead. No alarm."""
    app, (bad, good, *_) = ("ios", APNS_TOKENS) if platform == "apns" else ("android", FCM_TOKENS)
    if platform == "apns":
        sandbox.apns.respond(bad, 400, "DeviceTokenNotForTopic")
    else:
        sandbox.fcm.respond(bad, error_code="SENDER_ID_MISMATCH")

    def requests() -> list[str]:
        if platform == "apns":
            return [q.device_token for q in sandbox.apns.requests]
        return [str(q.message.get("token")) for q in sandbox.fcm.requests]

    ops = free_port()
    with _start(sandbox, notify, webhook_socket, {bad: {"app": app}, good: {"app": app}}, ops) as relay:
        assert _post(webhook_socket, sample("message", to=[bad], id=1))[0] == 200
        _wait(lambda: bad in requests(), what="the first mismatch answer")
        # The app goes on delivering to another device (one push at a time: with several delivery processes,
        # each judges on the successes it saw itself, so the one holding the token must see one too).
        deadline, next_id = time.monotonic() + 30, 2

        def delivered(message_id: int) -> Callable[[], bool]:
            return lambda: message_id in _sent_ids(sandbox, platform)

        while "push token is dead" not in relay.log():
            assert time.monotonic() < deadline, "the mismatching token was never ended"
            assert _post(webhook_socket, sample("message", to=[good], id=next_id))[0] == 200
            _wait(delivered(next_id), what="the other device's push")
            next_id += 1
        assert _dead_tokens(relay.config) == 1
        assert requests().count(bad) >= 2  # never on one answer
        metrics = _metrics(ops)
        assert f'parley_relay_app_alarm{{app="{app}"}} 1.0' not in metrics
        dead = f'parley_relay_token_mismatches_total{{app="{app}",judged="token_dead",platform="{platform}"}} 1.0'
        assert dead in metrics
        assert relay.stop() == 0


def _waits(log: str) -> list[tuple[str, int]]:
    """(wait reason, attempt) of every ``delivery waits`` line, in order."""
    return [(m.group(1), int(m.group(2))) for m in
            re.finditer(r"delivery waits.*?wait=(\w+).*?attempt=(\d+)", log)]


def test_a_reload_during_an_outage_keeps_the_circuit_and_the_backoff_counts_from_its_opening(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """APNs answering 503: the circuit opens; its failed probes add no attempts to the delivery; a reload that
    changes nothing of the app keeps the circuit open (the delivery waits ``circuit_open``, not a ``retry`` with
    the backoff of every probe)."""
    sandbox.apns.fail_all(503, "ServiceUnavailable")
    with _start(sandbox, notify, webhook_socket, {IOS_TOKEN: {"app": "ios"}}) as relay:
        assert _post(webhook_socket, sample("message", to=[IOS_TOKEN], id=1))[0] == 200
        _wait(lambda: "app circuit opened" in relay.log(), what="the circuit to open")
        _wait(lambda: [w for w, _ in _waits(relay.log())].count("circuit_open") >= 3, what="two failed probes")
        # The opening failure counts (its line shows the attempt it was); the probes after it add none.
        opened = [attempt for wait, attempt in _waits(relay.log()) if wait == "circuit_open"]
        assert len(set(opened[1:])) == 1 and opened[1] == opened[0] + 1, opened

        before = len(_waits(relay.log()))
        _reload(relay, notify)
        after, sends = len(_waits(relay.log())), len(sandbox.apns.requests)
        _wait(lambda: len(sandbox.apns.requests) > sends, what="a send after the reload")
        _wait(lambda: len(_waits(relay.log())) > after, what="the delivery's next wait after the reload")
        assert set(_waits(relay.log())[before:]) == {("circuit_open", opened[1])}
        assert "app circuit opened" in relay.log() and relay.log().count("app circuit opened") == 1
        assert relay.stop() == 0


# -- the judge alone ----------------------------------------------------------------------------------------------


def test_one_mismatch_answer_is_evidence_held_never_a_verdict() -> None:
    """A token's first mismatch holds it, even right after successes of the app; only a success after that answer,
    then another mismatch, ends it."""
    evidence = Mismatches()
    evidence.succeeded("other")
    assert evidence.judge("t1") is Verdict.HELD
    assert evidence.judge("t1") is Verdict.HELD  # no success in between: still only evidence
    evidence.succeeded("other")
    assert evidence.judge("t1") is Verdict.TOKEN_DEAD
    assert "t1" not in evidence.suspects


def test_mismatches_of_two_devices_with_no_success_between_are_the_apps_alarm_until_a_success() -> None:
    """Two different tokens answering a mismatch with no success in between: alarm; a later success shows the
    credentials work, after which a suspect that still mismatches is dead (a false alarm clears itself)."""
    evidence = Mismatches()
    assert evidence.judge("t1") is Verdict.HELD
    assert evidence.judge("t2") is Verdict.APP_ALARM
    assert evidence.judge("t1") is Verdict.APP_ALARM
    evidence.succeeded("t3")
    assert evidence.run() == 0
    assert evidence.judge("t2") is Verdict.TOKEN_DEAD
    assert evidence.judge("t4") is Verdict.HELD


def test_a_suspect_that_is_delivered_to_is_no_longer_suspected() -> None:
    """A held token that later succeeds (a transient mismatch) leaves the suspects."""
    evidence = Mismatches()
    evidence.judge("t1")
    evidence.succeeded("t1")
    assert evidence.suspects == {}
    assert evidence.judge("t1") is Verdict.HELD
