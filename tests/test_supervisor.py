"""The multi-process relay's supervisor, under a stand-in for systemd: a child that cannot be kept running
is reported and stops the watchdog, children run the configuration the supervisor validated, a reload is
reported as it happened, /readyz means "webhooks can be accepted", and webhook processes build no provider."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from relay.testing.process import NotifySocket, RelayProcess, free_port
from relay.testing.sandbox import ANDROID_TOKEN, AUTH_HEADER, IOS_TOKEN, Sandbox, sample
from tests.test_service import _fcm_ids, _reload_command, _request, _start, _url, _wait

NEW_SECRET = "rotated-shared-secret-77c1"




def _main_status(notify: NotifySocket, relay: RelayProcess, text: str, start: int = 0,
                 timeout: float = 30.0) -> tuple[int, str]:
    """The index and text of the first STATUS= line of the main process (from ``start``) containing ``text``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = notify.messages
        for i, message in enumerate(messages[start:], start):
            status = message.fields.get("STATUS", "")
            if message.pid == relay.pid and text in status:
                return i, status
        time.sleep(0.02)
    seen = [m.fields.get("STATUS") for m in notify.messages[start:] if m.pid == relay.pid]
    raise AssertionError(f"no STATUS with {text!r} from the main process; got {seen}\n{relay.log()[-3000:]}")


def _restarted(relay: RelayProcess, name: str, old: int) -> int:
    """Wait until ``name`` runs as a process other than ``old`` and return its pid."""
    _wait(lambda: relay.children().get(name, old) != old, timeout=30, what=f"{name} to be started again")
    return relay.children()[name]


def _with_secret(config: Path, secret: str) -> None:
    doc = yaml.safe_load(config.read_text())
    doc["auth"]["headers"][AUTH_HEADER] = secret
    config.write_text(yaml.safe_dump(doc, sort_keys=False))


def _hook(sock: socket.socket, doc: object, secret: str | None = None) -> int:
    return _request(_url(sock), doc, {AUTH_HEADER: secret} if secret else None)[0]


# -- a child that cannot be kept running ----------------------------------------------------------


def test_a_delivery_process_that_cannot_start_is_reported_down_and_stops_the_watchdog(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """The APNs key file is overwritten with garbage, then the delivery process dies: its restarts fail, and
    at the third failure in a row (before the next restart) STATUS= names it with its error, the metrics
    say `parley_relay_role_down{role="delivery"} 1`, the watchdog pings stop; webhooks are still accepted
    and /readyz stays 200. With the key back, the next restart clears it all and the pings resume."""
    ops = free_port()
    relay = _start(sandbox, notify, webhook_socket, mode="auto", env={"WATCHDOG_USEC": "1000000"},
                   metrics={"listen": {"host": "127.0.0.1", "port": ops}})
    with relay:
        key = sandbox.root / "AuthKey.p8"
        good = key.read_bytes()
        key.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        mark = len(notify.messages)
        os.kill(relay.children()["delivery.0"], signal.SIGKILL)
        at, status = _main_status(notify, relay, "DOWN delivery.0", start=mark)
        assert "failed to start" in status and "AuthKey.p8" in status, status
        assert "restarting in" in status  # said when the third failure happened, not at a later restart
        assert "relay process down" in relay.log()
        down_at = notify.messages[at].at
        _wait(lambda: 'parley_relay_role_down{role="delivery"} 1.0' in _request(f"http://127.0.0.1:{ops}/metrics")[1],
              what="the role_down metric")
        assert _request(_url(webhook_socket, "/readyz"))[0] == 200  # webhooks are still accepted and stored
        assert _hook(webhook_socket, sample("message", to=[ANDROID_TOKEN], id=1700)) == 200
        time.sleep(2.5)  # WatchdogSec=1s: two intervals and more without a ping
        late = [m for m in notify.messages if m.pid == relay.pid and "WATCHDOG=1" in m and m.at > down_at + 0.6]
        assert late == [], "the watchdog kept pinging while a process was down"

        key.write_bytes(good)  # the operator fixes the key: the next restart (within 30 s) starts it
        _wait(lambda: "relay process up again" in relay.log(), timeout=40, what="delivery.0 to start again")
        _wait(lambda: 1700 in _fcm_ids(sandbox), what="the stored webhook to be pushed")
        pings = len(notify.messages)
        notify.wait_for("WATCHDOG=1", start=pings, timeout=5)
        _wait(lambda: 'parley_relay_role_down{role="delivery"} 0.0' in _request(f"http://127.0.0.1:{ops}/metrics")[1],
              what="the role_down metric to clear")
        relay.stop()


def test_a_webhook_process_builds_no_provider_and_restarts_with_a_key_no_provider_could_load(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """With the APNs key file unusable, a killed webhook process starts again and accepts: it never loads
    provider credentials (only delivery processes do)."""
    relay = _start(sandbox, notify, webhook_socket, mode="auto")
    with relay:
        (sandbox.root / "AuthKey.p8").write_text("garbage")
        old = relay.children()["ingest.0"]
        os.kill(old, signal.SIGKILL)
        _restarted(relay, "ingest.0", old)
        _wait(lambda: _request(_url(webhook_socket, "/readyz"))[0] == 200, timeout=30, what="ingest.0 to serve")
        assert _hook(webhook_socket, sample("message", to=[ANDROID_TOKEN], id=1701)) == 200
        _wait(lambda: 1701 in _fcm_ids(sandbox), what="the push through the running delivery process")
        assert "DOWN" not in _main_status(notify, relay, "processes", start=0)[1]
        relay.stop()


_IMPORTS = """
import asyncio, sys
from aiohttp import web
from relay.config import load_config
from relay.running import RELAY_KEY
from relay.runtime.relay import create_app

async def main() -> None:
    app = create_app(load_config(sys.argv[1]), run_dispatcher=sys.argv[2] == "deliver")
    runner = web.AppRunner(app)
    await runner.setup()
    loaded = [m for m in ("aioapns", "firebase_admin", "google.auth") if m in sys.modules]
    print(len(app[RELAY_KEY].providers), *loaded)
    await runner.cleanup()

asyncio.run(main())
"""


def test_a_webhook_process_imports_no_provider_client(sandbox: Sandbox) -> None:
    """The application a webhook process runs builds no provider and never imports aioapns, firebase_admin
    or google.auth (a delivery process's application does all three)."""
    config = sandbox.write()

    def run(role: str) -> list[str]:
        done = subprocess.run([sys.executable, "-c", _IMPORTS, str(config), role], capture_output=True, text=True,
                              timeout=60, check=True)
        return done.stdout.split()

    assert run("ingest") == ["0"]
    assert run("deliver") == ["2", "aioapns", "firebase_admin", "google.auth"]


# -- the configuration the supervisor validated ---------------------------------------------------


def test_a_restarted_child_runs_the_validated_config_until_a_reload(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """relay.yaml (a new webhook secret) and the registry (a new device) are edited on disk without a reload,
    and both children are killed: the restarted ones still run what the supervisor validated (old secret
    accepted, new one refused, the new device unknown); after `reload` both run the new files."""
    newcomer = "eJ9x-new-android-device-token:APA91b_after_the_edit"
    relay = _start(sandbox, notify, webhook_socket, mode="auto")
    with relay:
        _with_secret(relay.config, NEW_SECRET)
        registry = sandbox.root / "devices.yaml"
        registry.write_text(yaml.safe_dump({"devices": {**sandbox.devices, newcomer: {"app": "android"}}}))
        before = relay.children()
        for pid in before.values():
            os.kill(pid, signal.SIGKILL)
        for name, pid in before.items():
            _restarted(relay, name, pid)
        _wait(lambda: _request(_url(webhook_socket, "/readyz"))[0] == 200, timeout=30, what="the new ingest.0")
        _wait(lambda: relay.log().count("relay ready") >= 5, timeout=30, what="both children to be ready")
        assert _hook(webhook_socket, sample("message", to=[ANDROID_TOKEN], id=1710)) == 200  # the old secret
        assert _hook(webhook_socket, sample("message", to=[ANDROID_TOKEN], id=1711), NEW_SECRET) == 401
        assert _hook(webhook_socket, sample("message", to=[newcomer], id=1712)) == 200
        _wait(lambda: any("wait=unroutable" in line and "message_id=1712" in line for line in relay.log().splitlines()),
              what="the new device to be unknown to the restarted delivery process")
        assert 1712 not in _fcm_ids(sandbox)

        reloaded = _reload_command(relay)
        assert reloaded.returncode == 0 and "reloaded" in reloaded.stdout, reloaded
        assert _hook(webhook_socket, sample("message", to=[ANDROID_TOKEN], id=1713), NEW_SECRET) == 200
        assert _hook(webhook_socket, sample("message", to=[ANDROID_TOKEN], id=1714)) == 401
        _wait(lambda: {1710, 1712, 1713} <= set(_fcm_ids(sandbox)), what="the new registry's device")
        relay.stop()


# -- reloads reported as they happened ------------------------------------------------------------


def test_a_reload_one_process_rejects_is_undone_in_the_others_and_reported_with_the_reason(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """A reload with a new webhook secret and an APNs key file only the delivery process loads (and refuses):
    ingest.0 took it and is put back, `reload` exits 1 naming delivery.0 and the key's error, and the old
    secret still works in every process."""
    relay = _start(sandbox, notify, webhook_socket, mode="auto")
    with relay:
        (sandbox.root / "Bad.p8").write_text("garbage")
        doc = yaml.safe_load(relay.config.read_text())
        doc["apps"]["ios"]["key_file"] = "Bad.p8"
        doc["auth"]["headers"][AUTH_HEADER] = NEW_SECRET
        relay.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        rejected = _reload_command(relay)
        assert rejected.returncode == 1, rejected
        assert "reload rejected by delivery.0" in rejected.stderr and "Bad.p8" in rejected.stderr, rejected.stderr
        assert "previous configuration in force" in rejected.stderr
        assert _hook(webhook_socket, sample("message", to=[IOS_TOKEN], id=1720)) == 200  # the old secret
        assert _hook(webhook_socket, sample("message", to=[IOS_TOKEN], id=1721), NEW_SECRET) == 401
        _wait(lambda: any(r.status == 200 for r in sandbox.apns.requests), what="the push on the old key")
        assert relay.stop() == 0


def test_a_reload_that_applies_in_some_processes_only_is_reported_partial(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """The delivery process refuses the new APNs key, and ingest.0 cannot go back because the old key file
    is gone: `reload` exits 1 and STATUS= and the log say PARTIAL, naming which process runs which."""
    ops = free_port()
    relay = _start(sandbox, notify, webhook_socket, mode="auto", metrics={"listen": {"host": "127.0.0.1", "port": ops}})
    with relay:
        (sandbox.root / "Bad.p8").write_text("garbage")
        doc = yaml.safe_load(relay.config.read_text())
        doc["apps"]["ios"]["key_file"] = "Bad.p8"
        relay.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        (sandbox.root / "AuthKey.p8").unlink()  # the old generation no longer loads anywhere
        mark = len(notify.messages)
        partial = _reload_command(relay)
        assert partial.returncode == 1, partial
        assert "reload PARTIAL: configuration 2 in ingest.0; rejected by delivery.0" in partial.stderr, partial.stderr
        assert "PARTIAL" in notify.wait_for("READY=1", start=mark).fields["STATUS"]
        assert "reload partial" in relay.log()
        _wait(lambda: 'parley_relay_reloads_total{result="partial"} 1.0'
              in _request(f"http://127.0.0.1:{ops}/metrics")[1], what="the partial reload counted")
        relay.stop()


def test_a_reload_with_backoff_initial_above_backoff_max_is_rejected_before_any_process_takes_it(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """delivery.backoff_initial > backoff_max (which the dispatcher refuses after a swap): the reload is
    rejected as a whole, naming the key, and the relay keeps delivering."""
    relay = _start(sandbox, notify, webhook_socket, mode="auto")
    with relay:
        doc = yaml.safe_load(relay.config.read_text())
        doc["delivery"] = {"backoff_initial": 5, "backoff_max": 1}
        relay.config.write_text(yaml.safe_dump(doc, sort_keys=False))
        rejected = _reload_command(relay)
        assert rejected.returncode == 1 and "delivery.backoff_initial" in rejected.stderr, rejected
        assert _hook(webhook_socket, sample("message", to=[ANDROID_TOKEN], id=1730)) == 200
        _wait(lambda: 1730 in _fcm_ids(sandbox), what="delivery on the old configuration")
        assert relay.stop() == 0


# -- readiness ------------------------------------------------------------------------------------


def test_readyz_stays_ready_during_an_app_alarm_which_shows_in_metrics_log_and_status(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """APNs refuses the key: the app's alarm is in /metrics, the log and the main process's STATUS=, while
    /readyz stays 200 and webhooks for every app are still accepted (Android's also pushed)."""
    sandbox.apns.fail_all(403, "InvalidProviderToken")
    ops = free_port()
    relay = _start(sandbox, notify, webhook_socket, mode="auto", metrics={"listen": {"host": "127.0.0.1", "port": ops}})
    with relay:
        assert _hook(webhook_socket, sample("message", to=[IOS_TOKEN], id=1740)) == 200
        _wait(lambda: 'parley_relay_app_alarm{app="ios"} 1.0' in _request(f"http://127.0.0.1:{ops}/metrics")[1],
              what="the alarm metric")
        assert _request(_url(webhook_socket, "/readyz"))[0] == 200
        assert _hook(webhook_socket, sample("message", to=[IOS_TOKEN], id=1741)) == 200
        assert _hook(webhook_socket, sample("message", to=[ANDROID_TOKEN], id=1742)) == 200
        _wait(lambda: 1742 in _fcm_ids(sandbox), what="the Android push during the iOS alarm")
        assert "app configuration alarm" in relay.log() and "InvalidProviderToken" in relay.log()
        status = _main_status(notify, relay, "ios ALARM (", timeout=20)[1]
        assert "InvalidProviderToken" in status, status
        assert _request(_url(webhook_socket, "/readyz"))[0] == 200
        relay.stop()
