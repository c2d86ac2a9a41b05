"""The real `parley-relay serve` process under a stand-in for systemd: notify datagrams, watchdog, SIGHUP
reload, SIGTERM drain, socket-activated restarts under load, metrics and logs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from relay.cli import main
from relay.testing.process import NotifySocket, RelayProcess, free_port, listening_socket, relay_command
from relay.testing.sandbox import (
    ANDROID_TOKEN,
    AUTH_HEADER,
    AUTH_VALUE,
    IOS_TOKEN,
    Sandbox,
    sample,
)

HOOK = "/parley/webhook"




def _url(sock: socket.socket, path: str = HOOK) -> str:
    return f"http://127.0.0.1:{sock.getsockname()[1]}{path}"


def _request(url: str, doc: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = None if doc is None else json.dumps(doc).encode()
    all_headers = {AUTH_HEADER: AUTH_VALUE, **(headers or {})}
    request = urllib.request.Request(url, data=data, headers=all_headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode()


def _start(sandbox: Sandbox, notify: NotifySocket, sock: socket.socket, *, env: dict[str, str] | None = None,
           name: str = "relay.yaml", mode: str | None = None, **overrides: Any) -> RelayProcess:
    """A relay under the stand-in for systemd; ``mode`` (serve --processes) None = the test run's (RelayProcess)."""
    config = sandbox.write(name, **overrides)
    start = len(notify.messages)
    relay = RelayProcess(config, notify=notify, activation=[("webhook", sock)], env=env, processes=mode)
    try:
        notify.wait_for("READY=1", timeout=30, start=start)
    except TimeoutError:
        relay.__exit__()
        raise AssertionError(f"relay did not become ready:\n{relay.log()}") from None
    return relay


def _wait(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _fcm_ids(sandbox: Sandbox) -> list[int]:
    """Parley message ids of every push the fake FCM accepted."""
    ids = []
    for request in sandbox.fcm.requests:
        if request.status == 200 and "parley" in request.message.get("data", {}):
            ids.append(int(json.loads(request.message["data"]["parley"])["object"]["id"]))
    return ids


def _stats(config: Path) -> dict[str, Any]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(["stats", "--json", "--config", str(config)])
    return dict(json.loads(out.getvalue()))


# -- start, ready, stop ---------------------------------------------------------------------------


def test_ready_comes_once_store_credentials_and_listener_are_up_and_sigterm_sends_stopping(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """READY=1 (with a STATUS= line) is sent by the main pid only when /readyz already answers 200;
    SIGTERM sends STOPPING=1 and exits 0."""
    relay = _start(sandbox, notify, webhook_socket)
    with relay:
        ready = notify.wait_for("READY=1")
        assert ready.pid == relay.pid  # NotifyAccess=main: the datagram comes from the main process
        assert _request(_url(webhook_socket, "/readyz"))[0] == 200
        assert ready.fields["STATUS"].startswith("ready on ") and "queue 0" in ready.fields["STATUS"]
        assert relay.stop() == 0
        stopping = notify.wait_for("STOPPING=1")
        assert stopping.pid == relay.pid and "draining" in stopping.fields["STATUS"]
        notify.wait_for("STATUS=stopped")


def test_start_failure_reports_status_and_exits_non_zero(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """Unreadable credentials: no READY=1, a STATUS= line and an error naming the key, exit 1 (Restart=on-failure)."""
    config = sandbox.write()
    (sandbox.root / "AuthKey.p8").write_text("not a key\n")
    with RelayProcess(config, notify=notify, activation=[("webhook", webhook_socket)]) as relay:
        assert relay.wait() == 1
        assert "apps.ios.key_file" in relay.log()
    assert not [m for m in notify.messages if "READY=1" in m]
    assert notify.wait_for("STATUS").fields["STATUS"].startswith("failed to start")


_BLOCKING_RELAY = (
    "import asyncio, signal, sys, time\n"
    "from relay.config import load_config\n"
    "from relay.observability import setup_logging\n"
    "from relay.runtime.service import serve\n"
    "async def main() -> None:\n"
    "    # test-only: SIGUSR1 blocks the event loop, as a runaway computation or blocking call would\n"
    "    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, time.sleep, 1.5)\n"
    "    await serve(load_config(sys.argv[1]))\n"
    "setup_logging()\n"
    "asyncio.run(main())\n"
)


def test_watchdog_pings_stop_while_the_event_loop_is_blocked(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """WATCHDOG=1 every WatchdogSec/2 from the loop; a loop blocked for 1.5 s sends none (systemd would restart)."""
    config = sandbox.write()
    command = [sys.executable, "-c", _BLOCKING_RELAY, str(config)]
    with RelayProcess(config, notify=notify, activation=[("webhook", webhook_socket)], command=command,
                      env={"WATCHDOG_USEC": "200000"}) as relay:
        notify.wait_for("READY=1", timeout=15)
        time.sleep(0.5)
        relay.signal(signal.SIGUSR1)
        time.sleep(2.2)
        assert relay.stop() == 0
    pings = [m.at for m in notify.messages if "WATCHDOG=1" in m and m.pid == relay.pid]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 10
    assert max(gaps) >= 1.3  # no ping while blocked
    assert sorted(gaps)[-2] < 0.5  # every other gap is about 0.1 s: pings resumed after the block


# -- reload ---------------------------------------------------------------------------------------


def test_reload_keeps_the_old_config_on_a_bad_file_and_routes_parked_deliveries_on_a_good_one(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """SIGHUP: a bad main file and a bad registry are each rejected with one log line, the relay keeps
    serving; then a good registry with a new device delivers the notification parked as unroutable."""
    newcomer = "eJ9x-new-android-device-token:APA91b_added_by_reload"
    ops = free_port()
    relay = _start(sandbox, notify, webhook_socket, metrics={"listen": {"host": "127.0.0.1", "port": ops}})
    with relay:
        assert _request(_url(webhook_socket), sample("message", to=[newcomer], id=501))[0] == 200
        time.sleep(0.3)
        assert 501 not in _fcm_ids(sandbox)  # no registry entry yet: parked for the unroutable grace period

        good = relay.config.read_text()
        relay.config.write_text(good.replace("delivery:", "delivery:\n  concurency: 5"))  # a typo'd key
        mark = len(notify.messages)
        relay.signal(signal.SIGHUP)
        notify.wait_for("RELOADING=1", start=mark)
        rejected = notify.wait_for("READY=1", start=mark)
        assert rejected.fields["STATUS"].startswith("reload rejected")
        relay.config.write_text(good)
        registry = sandbox.root / "devices.yaml"
        registry.write_text(yaml.safe_dump({"devices": {newcomer: {"app": "no-such-app"}}}))
        mark = len(notify.messages)
        relay.signal(signal.SIGHUP)
        notify.wait_for("READY=1", start=mark)
        assert _request(_url(webhook_socket), sample("message", to=[ANDROID_TOKEN], id=502))[0] == 200
        _wait(lambda: 502 in _fcm_ids(sandbox), what="the old registry to keep routing")

        registry.write_text(yaml.safe_dump({"devices": {**sandbox.devices, newcomer: {"app": "android"}}}))
        mark = len(notify.messages)
        relay.signal(signal.SIGHUP)
        assert not notify.wait_for("READY=1", start=mark).fields["STATUS"].startswith("reload rejected")
        _wait(lambda: 501 in _fcm_ids(sandbox), timeout=5, what="the parked delivery after the reload")
        counted = ('parley_relay_reloads_total{result="rejected"} 2.0', 'parley_relay_reloads_total{result="ok"} 1.0')
        # ingest.0 counts the supervisor's outcomes as it sees them (within a quarter second)
        _wait(lambda: all(line in _request(f"http://127.0.0.1:{ops}/metrics")[1] for line in counted),
              what="one count per reload of the service")
        assert relay.stop() == 0
    # The main process logs each rejection once; with several processes, the bad main file never reaches the
    # others (the main process validates it first) and each of them logs its own rejection of the registry.
    by_process: dict[str, list[str]] = {}
    for line in relay.log().splitlines():
        if "reload rejected" in line:
            process = re.sub(r".*process=(\S+).*", r"\1", line) if "process=" in line else ""
            by_process.setdefault(process, []).append(line)
    main = by_process.pop("")
    assert len(main) == 2, main
    assert "delivery.concurency: unknown key" in main[0]
    assert "devices.yaml: devices.eJ9x" in main[1] and "no-such-app" in main[1]
    for lines in by_process.values():
        assert len(lines) == 1 and "devices.yaml: devices.eJ9x" in lines[0] and "no-such-app" in lines[0], lines


# -- graceful stop --------------------------------------------------------------------------------


def _partial_request(sock: socket.socket, doc: Any) -> tuple[socket.socket, bytes]:
    """Open a connection and send the headers and half the body: a request in flight."""
    body = json.dumps(doc).encode()
    head = (f"POST {HOOK} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
            f"{AUTH_HEADER}: {AUTH_VALUE}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    client = socket.create_connection(sock.getsockname(), timeout=10)
    client.sendall(head + body[: len(body) // 2])
    return client, body[len(body) // 2 :]


def test_sigterm_finishes_in_flight_requests_and_sends_and_exits_0(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """SIGTERM with a half-received request and slow sends in flight: the request is answered 200, the
    sends finish, exit code 0, and after a restart everything acknowledged has been delivered once."""
    sandbox.fcm.set_delay(0.8)
    relay = _start(sandbox, notify, webhook_socket)
    with relay:
        for i in range(5):
            assert _request(_url(webhook_socket), sample("message", to=[ANDROID_TOKEN], id=600 + i))[0] == 200
        _wait(lambda: len(sandbox.fcm.requests) >= 1, what="a send in flight")
        client, rest = _partial_request(webhook_socket, sample("message", to=[IOS_TOKEN], id=700))
        time.sleep(0.1)
        started = time.monotonic()
        relay.signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        time.sleep(0.3)
        client.sendall(rest)
        answer = client.recv(4096).decode()
        client.close()
        assert relay.wait() == 0, relay.log()
        took = time.monotonic() - started
    assert answer.startswith("HTTP/1.1 200"), answer
    assert 600 in _fcm_ids(sandbox)  # the send in flight at SIGTERM finished before the exit
    assert took < 10
    sandbox.fcm.recover()
    relay = _start(sandbox, notify, webhook_socket)
    with relay:
        _wait(lambda: set(_fcm_ids(sandbox)) >= set(range(600, 605)), what="all FCM deliveries")
        sandbox.apns.wait_for_requests(1)
        assert relay.stop() == 0
    stats = _stats(relay.config)
    assert stats["balanced"] and stats["ended"]["sent"] == stats["accepted"] == 6


def test_sigterm_leaves_sends_stored_when_the_provider_hangs_past_shutdown_timeout(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """A provider that never answers: the drain gives up after shutdown_timeout, exits 0 within the bound,
    and the deliveries are sent after the restart."""
    sandbox.apns.hang()
    relay = _start(sandbox, notify, webhook_socket, shutdown_timeout=0.5)
    with relay:
        for i in range(3):
            assert _request(_url(webhook_socket), sample("message", to=[IOS_TOKEN], id=800 + i))[0] == 200
        _wait(lambda: len(sandbox.apns.requests) >= 1, what="a hung send")
        started = time.monotonic()
        assert relay.stop() == 0
        assert time.monotonic() - started < 3  # 0.5 s for requests, 0.5 s for sends, the rest is cleanup
    assert "still in flight" not in relay.log()
    sandbox.apns.recover()
    relay = _start(sandbox, notify, webhook_socket)
    with relay:
        _wait(lambda: len([r for r in sandbox.apns.requests if r.status == 200]) >= 3, what="the stored deliveries")
        assert relay.stop() == 0
    stats = _stats(relay.config)
    assert stats["balanced"] and stats["ended"]["sent"] == 3


# -- socket activation: restart under load ---------------------------------------------------------

LOAD_REQUESTS = 400
LOAD_WORKERS = 8


class _Load:
    """Clients posting numbered messages, one new connection per request, counting what happened."""

    def __init__(self, url: str, tokens: list[str], restart_after: int) -> None:
        self.url, self.tokens = url, tokens
        self.counts = {"sent": 0, "acknowledged": 0, "refused": 0, "failed": 0}
        self.acknowledged: set[int] = set()
        self.latencies: list[float] = []
        self.restart_due = asyncio.Event()
        self._restart_after = restart_after

    async def run(self) -> None:
        connector = aiohttp.TCPConnector(force_close=True)  # a new connection per request, as Parley's retries
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            await asyncio.gather(*(self._client(token, session) for token in self.tokens))

    async def _client(self, token: str, session: aiohttp.ClientSession) -> None:
        while self.counts["sent"] < LOAD_REQUESTS:
            message_id = 10_000 + self.counts["sent"]
            self.counts["sent"] += 1
            if self.counts["sent"] >= self._restart_after:
                self.restart_due.set()
            started = time.monotonic()
            try:
                async with session.post(self.url, json=sample("message", to=[token], id=message_id),
                                        headers={AUTH_HEADER: AUTH_VALUE}) as response:
                    await response.read()
                    ok = response.status == 200
            except aiohttp.ClientConnectorError as exc:
                self.counts["refused" if isinstance(exc.os_error, ConnectionRefusedError) else "failed"] += 1
                continue
            except aiohttp.ClientError:
                self.counts["failed"] += 1
                continue
            self.latencies.append(time.monotonic() - started)
            self.counts["acknowledged" if ok else "failed"] += 1
            if ok:
                self.acknowledged.add(message_id)
            await asyncio.sleep(0.005)


async def test_socket_activated_restart_under_load_refuses_nothing_and_loses_nothing(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """A restart (SIGTERM, exit, start) on a socket the harness holds, with 8 clients posting all along:
    zero refused connections, zero failed requests, and every acknowledged notification delivered."""
    tokens = [f"eJ9x-load-{i}:APA91b_load_test_device" for i in range(LOAD_WORKERS)]
    sandbox.devices.update({t: {"app": "android"} for t in tokens})
    loop = asyncio.get_running_loop()
    first = await loop.run_in_executor(None, lambda: _start(sandbox, notify, webhook_socket))
    load = _Load(_url(webhook_socket), tokens, restart_after=LOAD_REQUESTS // 3)

    async def restart() -> RelayProcess:
        await load.restart_due.wait()
        assert await loop.run_in_executor(None, first.stop) == 0, first.log()
        return await loop.run_in_executor(None, lambda: _start(sandbox, notify, webhook_socket))

    second, _ = await asyncio.gather(restart(), load.run())
    with first, second:
        await sandbox.fcm.wait_for(len(load.acknowledged), timeout=20)
        await loop.run_in_executor(None, lambda: _wait(lambda: load.acknowledged <= set(_fcm_ids(sandbox)),
                                                       timeout=20, what="every acknowledged notification"))
        delivered = _fcm_ids(sandbox)
        assert await loop.run_in_executor(None, second.stop) == 0
    counts = load.counts
    figures = {**counts, "lost": len(load.acknowledged - set(delivered)),
               "duplicates": len(delivered) - len(set(delivered)), "max_latency_s": round(max(load.latencies), 3)}
    print(f"restart under load: {figures}")
    assert counts["sent"] >= LOAD_REQUESTS and counts["refused"] == 0 and counts["failed"] == 0, figures
    assert counts["acknowledged"] == counts["sent"] and figures["lost"] == 0, figures


# -- metrics, health, logs ------------------------------------------------------------------------


def test_metrics_names_and_labels_on_a_separate_listener(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """With metrics.listen, /metrics moves to that port (404 on the webhook port) with every family and
    label set the dashboard uses; /healthz and /readyz answer on both."""
    with listening_socket() as probe:
        port = probe.getsockname()[1]
    relay = _start(sandbox, notify, webhook_socket, metrics={"listen": {"host": "127.0.0.1", "port": port}})
    with relay:
        ops = f"http://127.0.0.1:{port}"
        assert _request(_url(webhook_socket), sample("message", to=[IOS_TOKEN]))[0] == 200
        assert _request(_url(webhook_socket), sample("event", to=[ANDROID_TOKEN]))[0] == 200
        assert _request(_url(webhook_socket), {"data": 1})[0] == 400
        assert _request(_url(webhook_socket), sample("message"), headers={AUTH_HEADER: "wrong"})[0] == 401
        sandbox.apns.wait_for_requests(1)
        sandbox.fcm.wait_for_requests(1)
        time.sleep(0.2)
        assert _request(_url(webhook_socket, "/metrics"))[0] == 404
        for base in (ops, _url(webhook_socket, "")):
            assert _request(base + "/healthz")[0] == 200 and _request(base + "/readyz")[0] == 200
        status, text = _request(ops + "/metrics")
        assert relay.stop() == 0
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    labels = {name: {tuple(sorted(s.labels.items())) for s in f.samples} for name, f in families.items()}
    results = {dict(s)["result"] for s in labels["parley_relay_webhooks"]}
    assert {"accepted", "invalid", "unauthorized"} <= results
    ended = {(d["platform"], d["app"], d["kind"], d["state"])
             for d in map(dict, labels["parley_relay_deliveries_ended"])}
    assert {("apns", "ios", "message", "sent"), ("fcm", "android", "event", "sent")} <= ended
    sends = {tuple(sorted(dict(s))) for s in labels["parley_relay_provider_sends"]}
    assert sends == {("app", "kind", "outcome", "platform")}
    assert families["parley_relay_queue_depth"].type == "gauge"
    for histogram in ("parley_relay_ack_seconds", "parley_relay_delivery_seconds",
                      "parley_relay_provider_request_seconds"):
        assert families[histogram].type == "histogram"
    assert {dict(s).get("platform") for s in labels["parley_relay_delivery_seconds"]} >= {"apns", "fcm"}
    for counter in ("parley_relay_retries", "parley_relay_dead_tokens", "parley_relay_deliveries_accepted",
                    "parley_relay_reloads"):
        assert families[counter].type == "counter"


def test_logs_are_logfmt_with_request_ids_json_on_request_and_journald_friendly(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """logfmt lines with ts= and the caller's X-Request-Id; with logging.format json and JOURNAL_STREAM
    naming stderr, one JSON object per line, without ts, behind a <N> syslog priority prefix."""
    relay = _start(sandbox, notify, webhook_socket)
    with relay:
        _request(_url(webhook_socket), {"data": 1}, headers={"X-Request-Id": "req-abc-123"})
        assert relay.stop() == 0
    lines = relay.log().splitlines()
    refused = [line for line in lines if 'event="webhook refused"' in line]
    assert refused and "request_id=req-abc-123" in refused[0] and "status=400" in refused[0]
    assert lines and all(re.match(r"ts=\S+Z level=(info|warning) event=", line) for line in lines), lines

    config = sandbox.write(logging={"format": "json"})
    log = sandbox.root / "journal.log"
    log.touch()
    st = log.stat()
    mark = len(notify.messages)
    with RelayProcess(config, notify=notify, activation=[("webhook", webhook_socket)], log=log,
                      env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}) as relay:
        notify.wait_for("READY=1", start=mark, timeout=15)
        _request(_url(webhook_socket), {"data": 1}, headers={"X-Request-Id": "req-json-1"})
        assert relay.stop() == 0
    lines = log.read_text().splitlines()
    assert lines and all(re.match(r"<[46]>\{", line) for line in lines), lines
    docs = [json.loads(line[3:]) for line in lines]
    assert any(d.get("request_id") == "req-json-1" and d["event"] == "webhook refused" for d in docs)
    assert lines[0].startswith("<6>") and all("ts" not in d and "level" in d for d in docs)
    assert any(line.startswith("<4>") and '"webhook refused"' in line for line in lines)


def test_grafana_dashboard_queries_only_exported_metrics_and_labels() -> None:
    """contrib/grafana-dashboard.json is valid JSON whose queries name existing metrics and their labels."""
    from relay.observability import Metrics

    exported: dict[str, set[str]] = {}
    for collector in vars(Metrics()).values():
        name = getattr(collector, "_name", None)  # prometheus-client keeps a collector's name and labels private
        if isinstance(name, str):
            labels = {"instance", "le", *getattr(collector, "_labelnames", ())}
            for suffix in ("", "_total", "_bucket", "_sum", "_count"):
                exported[name + suffix] = labels
    dashboard = json.loads((Path(__file__).resolve().parent.parent / "contrib" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    for expr in exprs:
        names = re.findall(r"parley_relay_[a-z_]+", expr)
        assert names, expr
        for name in names:
            assert name in exported, f"{name} is not exported ({expr})"
            for group in re.findall(r"by \(([^)]*)\)", expr):
                used = {label.strip() for label in group.split(",") if label.strip()}
                assert used <= exported[name], f"{expr}: {used - exported[name]}"


# -- processes: a supervisor, webhook (ingest) and delivery processes -------------------------------------


def _reload_command(relay: RelayProcess) -> subprocess.CompletedProcess[str]:
    """What ExecReload= runs: `parley-relay reload --pid $MAINPID`."""
    return subprocess.run([*relay_command(), "reload", "--pid", str(relay.pid), "--timeout", "30"],
                          capture_output=True, text=True, timeout=60)


def test_ready_only_once_every_role_is_up_and_the_main_process_speaks_for_all(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """processes {ingest: 2, delivery: 2}: READY=1 comes from the main pid after each of the four processes
    logged its own readiness; no child's datagram reaches systemd; /metrics counts across processes."""
    ops = free_port()
    relay = _start(sandbox, notify, webhook_socket, mode="auto", processes={"ingest": 2, "delivery": 2},
                   metrics={"listen": {"host": "127.0.0.1", "port": ops}})
    with relay:
        ready = notify.wait_for("READY=1")
        logged = relay.log()  # as it was when READY=1 arrived
        for name in ("ingest.0", "ingest.1", "delivery.0", "delivery.1"):
            assert re.search(rf'event="relay ready".*process={re.escape(name)}', logged), name
        assert {m.pid for m in notify.messages} == {relay.pid} and ready.pid == relay.pid
        assert set(relay.children()) == {"ingest.0", "ingest.1", "delivery.0", "delivery.1"}
        for i in range(20):
            assert _request(_url(webhook_socket), sample("message", to=[ANDROID_TOKEN], id=900 + i))[0] == 200
        _wait(lambda: set(range(900, 920)) <= set(_fcm_ids(sandbox)), what="every push")
        metrics = _request(f"http://127.0.0.1:{ops}/metrics")[1]
        assert 'parley_relay_webhooks_total{result="accepted"} 20.0' in metrics
        assert relay.stop() == 0
    stats = _stats(relay.config)
    assert stats["balanced"] and stats["ended"]["sent"] == stats["accepted"] == 20


def test_sigkill_of_a_delivery_process_loses_nothing_and_it_is_restarted(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """kill -9 of the delivery process with sends in flight: the supervisor starts a new one, which sends
    what the dead one had claimed; every accepted notification is sent, the books balance, READY is not
    sent again."""
    sandbox.fcm.set_delay(0.5)
    relay = _start(sandbox, notify, webhook_socket, mode="auto")
    with relay:
        for i in range(30):
            assert _request(_url(webhook_socket), sample("message", to=[ANDROID_TOKEN], id=1000 + i))[0] == 200
        _wait(lambda: len(sandbox.fcm.requests) >= 1, what="a send in flight")
        first = relay.children()["delivery.0"]
        os.kill(first, signal.SIGKILL)
        _wait(lambda: relay.children().get("delivery.0") not in (None, first), what="a new delivery process")
        sandbox.fcm.recover()
        _wait(lambda: set(range(1000, 1030)) <= set(_fcm_ids(sandbox)), timeout=30, what="every push")
        assert len([m for m in notify.messages if "READY=1" in m]) == 1
        assert relay.stop() == 0
    assert "starting it again" in relay.log()
    stats = _stats(relay.config)
    assert stats["balanced"] and stats["accepted"] == 30 and stats["ended"]["sent"] == 30


def test_sigkill_of_the_supervisor_leaves_no_process_and_loses_nothing(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """kill -9 of the main process with deliveries stored: its children drain and exit by themselves
    (no orphan keeps the port or the store), and the next start sends everything accepted."""
    sandbox.apns.hang()
    relay = _start(sandbox, notify, webhook_socket, mode="auto", shutdown_timeout=0.5)
    with relay:
        for i in range(10):
            assert _request(_url(webhook_socket), sample("message", to=[IOS_TOKEN], id=1100 + i))[0] == 200
        children = list(relay.children().values())
        assert len(children) == 2
        relay.signal(signal.SIGKILL)
        relay.wait()
        _wait(lambda: not any(Path(f"/proc/{pid}").exists() for pid in children), what="the children to exit")
    sandbox.apns.recover()
    relay = _start(sandbox, notify, webhook_socket)
    with relay:
        _wait(lambda: len([r for r in sandbox.apns.requests if r.status == 200]) >= 10, what="the stored pushes")
        assert relay.stop() == 0
    stats = _stats(relay.config)
    assert stats["balanced"] and stats["accepted"] == 10 and stats["ended"]["sent"] == 10


def test_a_hung_child_stops_the_services_watchdog_pings(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket) -> None:
    """WatchdogSec=1s: the main process pings while every child pings; a stopped (hung) delivery process
    withholds the service's pings (systemd would restart it), which resume once the child answers again."""
    relay = _start(sandbox, notify, webhook_socket, mode="auto", env={"WATCHDOG_USEC": "1000000"})
    with relay:
        time.sleep(1.5)
        child = relay.children()["delivery.0"]
        os.kill(child, signal.SIGSTOP)
        time.sleep(3.0)
        os.kill(child, signal.SIGCONT)
        time.sleep(1.5)
        assert relay.stop() == 0
    pings = [m.at for m in notify.messages if "WATCHDOG=1" in m and m.pid == relay.pid]
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 6
    assert max(gaps) >= 1.8  # none while the child was stopped (3 s, minus the 1 s it may be late)
    assert "stopped answering" in relay.log()


@pytest.mark.parametrize("processes", ["1", "auto"])
def test_reload_command_exit_status_is_the_reload_outcome(
        sandbox: Sandbox, notify: NotifySocket, webhook_socket: socket.socket, processes: str) -> None:
    """`parley-relay reload --pid` (ExecReload=) exits 0 when the files were taken and 1, with the reason,
    when they were rejected, in both process models."""
    config = sandbox.write()
    with RelayProcess(config, notify=notify, activation=[("webhook", webhook_socket)], processes=processes) as relay:
        notify.wait_for("READY=1", timeout=30)
        taken = _reload_command(relay)
        assert taken.returncode == 0, taken.stderr
        good = config.read_text()
        config.write_text(good.replace("delivery:", "delivery:\n  concurency: 5"))
        rejected = _reload_command(relay)
        assert rejected.returncode == 1 and "reload rejected" in rejected.stderr, rejected
        config.write_text(good)
        assert _reload_command(relay).returncode == 0
        assert relay.stop() == 0
    assert _reload_command(relay).returncode == 1  # no relay there any more


def test_processes_setting_forms_and_auto_sizing(sandbox: Sandbox) -> None:
    """processes: auto (default) | 1 | {ingest, delivery}; auto gives a quarter of the CPUs (at least one) to
    webhooks and the rest (at least one; at most two on SQLite) to delivery; listen.backlog defaults to 4096."""
    from relay.config import load_config
    from relay.config.model import Processes
    from relay.errors import ConfigError
    from relay.runtime.role_args import Counts, plan_counts

    default = load_config(sandbox.write())
    assert default.processes == Processes() and default.listen.backlog == 4096
    assert load_config(sandbox.write(processes=1)).processes.single
    assert load_config(sandbox.write(processes={"ingest": 2, "delivery": "auto"})).processes == Processes(2, None)
    with pytest.raises(ConfigError, match="processes"):
        load_config(sandbox.write(processes="many"))
    with pytest.raises(ConfigError, match=r"processes\.delivery"):
        load_config(sandbox.write(processes={"delivery": 0}))
    assert plan_counts(Processes(), "sqlite", cpus=2) == Counts(1, 1)
    assert plan_counts(Processes(), "redis", cpus=8) == Counts(2, 6)
    assert plan_counts(Processes(), "sqlite", cpus=8) == Counts(2, 2)
    assert plan_counts(Processes(None, 5), "sqlite", cpus=2) == Counts(1, 5)
    assert load_config(sandbox.write(listen={"host": "127.0.0.1", "port": 8080, "backlog": 64})).listen.backlog == 64


async def test_wake_ups_coalesce_per_loop_turn_and_never_block_on_a_full_receiver() -> None:
    """Many webhooks answered in one loop turn send one datagram per delivery process; a receiver that
    does not read (its buffer full) never blocks or fails the sender; a reading receiver is woken."""
    from relay.runtime.waker import WakeReceiver, WakeSender, wake_address

    base = f"parley-relay-test-{time.monotonic_ns()}"
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # delivery process 1: never reads
    stuck.bind(wake_address(base, 1))
    woken = asyncio.Event()
    receiver = WakeReceiver(base, 0, woken.set)
    sender = WakeSender(base, 3)  # delivery process 2 does not exist (restarting): dropped silently
    try:
        for _ in range(100):
            sender.wake()
        await asyncio.wait_for(woken.wait(), 5)
        stuck.setblocking(False)
        assert stuck.recv(16) == b"w"
        with pytest.raises(BlockingIOError):
            stuck.recv(16)  # 100 wake() calls in one turn: one datagram
        for _ in range(5000):  # one datagram per turn, far beyond the stuck receiver's buffer
            sender.wake()
            await asyncio.sleep(0)
    finally:
        sender.close()
        receiver.close()
        stuck.close()
