"""Operating the relay: per-app delivery state (``/status``, ``stats``, systemd ``STATUS=``), the operations
listener, the version, and operator commands that only read (SPEC §8; issue 20.1, 20.4, 20.7, 20.8)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from relay import __version__
from relay.cli import main
from relay.config import load_config
from relay.delivery.health import AppHealth
from relay.observability import Metrics
from relay.runtime.roles import SUCCESS_RESOLUTION, _health_moved
from relay.runtime.supervisor import STATUS_EVERY
from relay.testing.process import Datagram, NotifySocket, RelayProcess, free_port, relay_command
from relay.testing.sandbox import ANDROID_TOKEN, AUTH_HEADER, AUTH_VALUE, IOS_TOKEN, Sandbox, sample

HOOK = "/parley/webhook"



def _get(url: str, doc: Any = None) -> tuple[int, Any]:
    data = None if doc is None else json.dumps(doc).encode()
    request = urllib.request.Request(url, data=data, headers={AUTH_HEADER: AUTH_VALUE})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body, status = response.read(), int(response.status)
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exc:  # argparse's --version and usage errors
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


def _wait(predicate: Any, timeout: float = 30.0, what: str = "condition") -> None:
    import time

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _relay(sandbox: Sandbox, notify: NotifySocket | None = None, mode: str | None = None,
           **overrides: Any) -> tuple[RelayProcess, str, str]:
    """A relay (``mode`` None: the test run's process model, multi-process by default) on fixed free ports;
    its webhook and operations base URLs."""
    port, ops = free_port(), free_port()
    config = sandbox.write(listen={"host": "127.0.0.1", "port": port},
                           metrics={"listen": {"host": "127.0.0.1", "port": ops}}, **overrides)
    relay = RelayProcess(config, notify=notify, processes=mode)
    relay.wait_ready(f"http://127.0.0.1:{port}/readyz")
    return relay, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{ops}"


# -- delivery state with the providers unreachable -----------------------------------------------------------


def test_with_apple_and_google_unreachable_status_stats_and_systemd_status_name_each_app_and_why(
        sandbox: Sandbox, notify: NotifySocket) -> None:
    """Both providers' endpoints on a closed port: /status, `stats` (table and --json) and the STATUS= line each
    name ios and android as not delivering, with the reason and the oldest waiting delivery's age, while
    /readyz stays 200 (webhooks are still accepted)."""
    closed = free_port()  # nothing listens there: connections are refused, as by a firewall that rejects
    relay, hook, ops = _relay(sandbox, notify, apps={"ios": {"endpoint": f"https://127.0.0.1:{closed}"},
                                                     "android": {"endpoint": f"http://127.0.0.1:{closed}"}})
    with relay:
        for n, token in enumerate((IOS_TOKEN, ANDROID_TOKEN)):
            assert _get(hook + HOOK, sample("message", to=[token], id=7000 + n))[0] == 200

        def parked() -> bool:
            apps = _get(ops + "/status")[1]["apps"]
            return not apps["ios"]["delivering"] and not apps["android"]["delivering"]

        _wait(parked, what="both circuits open in /status")
        doc = _get(ops + "/status")[1]
        assert doc["status"] == "degraded" and doc["version"] == __version__
        for app in ("ios", "android"):
            state = doc["apps"][app]
            assert state["circuit"] in ("open", "half-open") and state["reason"], state
            assert state["oldest_waiting_age_seconds"] is not None and state["last_success"] is None, state
            assert any(p.startswith(f"app {app}: circuit") for p in doc["problems"]), doc["problems"]
        assert _get(hook + "/readyz")[0] == 200

        ready = notify.wait_for("READY=1", timeout=1)
        _wait(lambda: _naming_both(notify) is not None, timeout=STATUS_EVERY + 5, what="STATUS= naming both apps")
        # Sent when the circuits changed, not by the periodic refresh (whose first line comes STATUS_EVERY
        # seconds after READY=1): the circuits open within about two seconds of the webhooks.
        named = _naming_both(notify)
        assert named is not None and named.at - ready.at < STATUS_EVERY, named

        code, out, _ = _cli("stats", "--json", "--config", str(relay.config))
        stats = json.loads(out)
        assert code == 0 and stats["delivery_state_from"] == ops + "/status"
        for app in ("ios", "android"):
            assert stats["apps"][app]["delivering"] is False and stats["apps"][app]["reason"], stats["apps"]
            assert stats["apps"][app]["oldest_waiting_age_seconds"] is not None
        code, out, _ = _cli("stats", "--config", str(relay.config))
        rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("ios ", "android "))}
        assert set(rows) == {"ios", "android"}, out
        for line in rows.values():
            assert re.match(r"\S+\s+(open|half-open)\s+\d+s", line) and stats["apps"]["ios"]["reason"][:20], line
        assert relay.stop() == 0


def _naming_both(notify: NotifySocket) -> Datagram | None:
    """The first STATUS= line that names ios and android as not delivering, with a reason and a wait."""
    for message in notify.messages:
        said = message.fields.get("STATUS", "")
        if all(re.search(rf"{app} (OPEN|HALF-OPEN) \(.+?\) waiting \d", said) for app in ("ios", "android")):
            return message
    return None


def test_status_shows_a_delivering_app_with_its_last_success(sandbox: Sandbox) -> None:
    """With the providers up, each app is closed and delivering, its last success recent, nothing waiting."""
    relay, hook, ops = _relay(sandbox)
    with relay:
        assert _get(hook + HOOK, sample("message", to=[IOS_TOKEN], id=7100))[0] == 200
        sandbox.apns.wait_for_requests(1)
        _wait(lambda: _get(ops + "/status")[1]["apps"]["ios"]["last_success"] is not None, what="ios success")
        doc = _get(ops + "/status")[1]
        assert doc["status"] == "ok" and doc["problems"] == []
        assert doc["apps"]["ios"]["circuit"] == "closed" and doc["apps"]["ios"]["delivering"] is True
        _wait(lambda: _get(ops + "/status")[1]["apps"]["ios"]["oldest_waiting_age_seconds"] is None,
              what="nothing waiting")
        assert relay.stop() == 0


# -- the operations listener ----------------------------------------------------------------------------------


def test_metrics_and_status_are_off_the_webhook_listener_by_default_and_on_the_operations_listener(
        sandbox: Sandbox) -> None:
    """Defaults: metrics.listen is 127.0.0.1:9464; /metrics and /status answer 404 on the webhook port and 200
    on the operations port; /healthz and /readyz answer on both (load balancers probe the webhook port)."""
    assert load_config(sandbox.write(metrics=None)).metrics.listen is not None
    default = load_config(sandbox.write(metrics={})).metrics.listen
    assert default is not None and (default.host, default.port) == ("127.0.0.1", 9464)
    assert load_config(sandbox.write(metrics={"listen": None})).metrics.listen is None
    relay, hook, ops = _relay(sandbox)
    with relay:
        assert _get(hook + "/metrics")[0] == 404 and _get(hook + "/status")[0] == 404
        for base in (hook, ops):
            assert _get(base + "/healthz")[0] == 200 and _get(base + "/readyz")[0] == 200
        status, text = _get(ops + "/metrics")
        assert status == 200 and f'parley_relay_build_info{{version="{__version__}"}} 1.0' in text
        assert _get(ops + "/status")[0] == 200
        assert relay.stop() == 0


def test_metrics_listen_null_serves_metrics_and_status_on_the_webhook_listener(sandbox: Sandbox) -> None:
    """``metrics: {listen: null}`` is the way back to one listener for everything."""
    port = free_port()
    relay = RelayProcess(sandbox.write(listen={"host": "127.0.0.1", "port": port}, metrics={"listen": None}))
    with relay:
        relay.wait_ready(f"http://127.0.0.1:{port}/readyz")
        assert _get(f"http://127.0.0.1:{port}/metrics")[0] == 200
        assert _get(f"http://127.0.0.1:{port}/status")[0] == 200
        assert relay.stop() == 0


def _listening_inode(port: int) -> str:
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
            return fields[9]
    raise AssertionError(f"nothing listens on {port}")


def _holds(pid: int, inode: str) -> bool:
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return True
    return False


def test_exactly_one_process_serves_the_operations_listener_with_every_processs_metrics(sandbox: Sandbox) -> None:
    """Two webhook processes: only ingest.0 holds the operations socket, and its /metrics counts the
    webhooks both processes accepted."""
    relay, hook, ops = _relay(sandbox, mode="auto", processes={"ingest": 2, "delivery": 1})
    with relay:
        children = relay.children()
        inode = _listening_inode(int(ops.rsplit(":", 1)[1]))
        assert {name for name, pid in children.items() if _holds(pid, inode)} == {"ingest.0"}
        for n in range(10):
            assert _get(hook + HOOK, sample("message", to=[ANDROID_TOKEN], id=7200 + n))[0] == 200
        assert 'parley_relay_webhooks_total{result="accepted"} 10.0' in _get(ops + "/metrics")[1]
        assert relay.stop() == 0, relay.log()


# -- version --------------------------------------------------------------------------------------------------


def test_version_is_printed_logged_when_ready_and_exported_as_build_info(sandbox: Sandbox) -> None:
    """`parley-relay --version`, the "relay ready" line and parley_relay_build_info all say the installed version."""
    done = subprocess.run([*relay_command(), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == f"parley-relay {__version__}"
    metrics = Metrics()
    assert metrics.registry.get_sample_value("parley_relay_build_info", {"version": __version__}) == 1
    relay, _hook, _ops = _relay(sandbox)
    with relay:
        assert relay.stop() == 0
    assert re.search(rf'event="relay ready" version={re.escape(__version__)} ', relay.log()), relay.log()


# -- read-only commands ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["stats"], ["stats", "--json"], ["deliveries", "--token", IOS_TOKEN],
                                  ["dead-letters", "list"], ["devices", "list"]])
def test_a_read_only_command_on_a_missing_store_exits_1_and_creates_nothing(sandbox: Sandbox,
                                                                            argv: list[str]) -> None:
    """A mistyped store path: exit 1 with "no store at PATH", and no file is created there."""
    missing = sandbox.root / "typo" / "relay.db"
    config = sandbox.write(store={"backend": "sqlite", "path": str(missing)})
    code, out, err = _cli(*argv, "--config", str(config))
    assert code == 1 and f"no store at {missing}" in err, (code, out, err)
    assert not missing.exists() and not missing.parent.exists()


def test_read_only_commands_read_a_live_store_without_changing_it(sandbox: Sandbox) -> None:
    """On an existing store `stats` reads (read-only) what a relay stored; the file's bytes stay the same."""
    relay, hook, _ops = _relay(sandbox)
    with relay:
        assert _get(hook + HOOK, sample("message", to=[IOS_TOKEN], id=7300))[0] == 200
        sandbox.apns.wait_for_requests(1)
        assert relay.stop() == 0
    db = sandbox.root / "relay.db"
    before = db.read_bytes()
    code, out, _ = _cli("stats", "--json", "--config", str(relay.config))
    assert code == 0 and json.loads(out)["accepted"] == 1
    assert _cli("devices", "list", "--config", str(relay.config))[0] == 0
    assert db.read_bytes() == before


# -- check-config --online ------------------------------------------------------------------------------------


def test_check_config_online_reports_each_app_ok_against_the_fakes(sandbox: Sandbox) -> None:
    """Against the fakes: an FCM token is fetched, APNs and FCM each answer a push to a test token: exit 0."""
    code, out, err = _cli("check-config", "--online", "--config", str(sandbox.write()))
    assert code == 0, (out, err)
    assert re.search(r"online: app ios: ok: .*reached, credentials accepted", out), out
    assert re.search(r"online: app android: ok: .*reached, credentials accepted", out), out
    assert sandbox.fcm.token_requests >= 1 and len(sandbox.fcm.requests) == 1 and len(sandbox.apns.requests) == 1


def test_check_config_online_names_each_app_that_cannot_reach_its_provider_and_exits_1(sandbox: Sandbox) -> None:
    """APNs and FCM on a closed port: each app FAILED with the provider's reason, exit 1; plain check-config
    (offline) still says ok."""
    closed = free_port()
    config = sandbox.write(delivery={"send_timeout": 5},
                           apps={"ios": {"endpoint": f"https://127.0.0.1:{closed}"},
                                 "android": {"endpoint": f"http://127.0.0.1:{closed}"}})
    assert _cli("check-config", "--config", str(config))[0] == 0
    code, out, err = _cli("check-config", "--online", "--config", str(config))
    assert code == 1, (out, err)
    for app in ("ios", "android"):
        line = next(line for line in err.splitlines() if line.startswith(f"online: app {app}: FAILED: "))
        assert f"127.0.0.1:{closed}" in line and not line.endswith(":"), line


def test_check_config_online_reports_a_refused_credential(sandbox: Sandbox) -> None:
    """APNs refuses the key (403 InvalidProviderToken): the app FAILED naming Apple's reason."""
    sandbox.apns.fail_all(403, "InvalidProviderToken")
    code, _out, err = _cli("check-config", "--online", "--config", str(sandbox.write()))
    assert code == 1 and re.search(r"online: app ios: FAILED: .*InvalidProviderToken", err), err


def test_a_delivery_process_republishes_its_health_on_a_state_change_not_on_every_push() -> None:
    """A circuit, alarm or reason change is published at the next look; a last success only once it moved by
    SUCCESS_RESOLUTION (under traffic it changes with every push, and each publication is a file write)."""
    published = {"ios": AppHealth("ios", last_success=1000.0)}
    assert not _health_moved(published, {"ios": AppHealth("ios", last_success=1000.0 + SUCCESS_RESOLUTION / 2)})
    assert _health_moved(published, {"ios": AppHealth("ios", last_success=1000.0 + SUCCESS_RESOLUTION)})
    assert _health_moved(published, {"ios": AppHealth("ios", circuit="open", reason="503",
                                                      last_success=1000.0 + SUCCESS_RESOLUTION / 2)})
    assert _health_moved({"ios": AppHealth("ios")}, {"ios": AppHealth("ios", last_success=1000.0)})
    assert _health_moved(published, {**published, "android": AppHealth("android")})
