"""relay.runtime.systemd and the shipped units: the notify protocol, watchdog, socket activation, journald detection,
and the hardened unit's exposure score."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config import FcmApp, Listen
from relay.errors import ConfigError
from relay.observability import journald_reads
from relay.runtime.systemd import Notifier, inherited_sockets
from relay.testing.process import (
    NotifySocket,
    RelayProcess,
    listening_socket,
    relay_command,
)
from relay.testing.sandbox import (
    ANDROID_TOKEN,
    AUTH_HEADER,
    AUTH_VALUE,
    IOS_TOKEN,
    Sandbox,
    sample,
)

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "parley-relay.service"
SOCKET_UNIT = ROOT / "systemd" / "parley-relay.socket"
MAX_EXPOSURE = 2.0


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    with NotifySocket() as sock:
        monkeypatch.setenv("NOTIFY_SOCKET", sock.address)
        yield sock


# -- the notify protocol ------------------------------------------------------------------------


def test_notifier_is_silent_outside_systemd() -> None:
    """Without NOTIFY_SOCKET the notifier is off and sends nothing (a terminal or test run)."""
    notifier = Notifier({})
    notifier.ready("x")
    notifier.close()
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None


def test_notifier_lines_reach_an_abstract_notify_socket(notify: NotifySocket) -> None:
    """READY/RELOADING/STOPPING datagrams carry STATUS=, RELOADING carries MONOTONIC_USEC, sent by our pid."""
    notifier = Notifier()
    notifier.ready("ready on 127.0.0.1:1")
    notifier.reloading()
    notifier.reloaded("queue 0")
    notifier.stopping("draining")
    notifier.close()
    ready = notify.wait_for("READY=1")
    assert ready.fields["STATUS"] == "ready on 127.0.0.1:1" and ready.pid == os.getpid()
    reloading = notify.wait_for("RELOADING=1")
    assert int(reloading.fields["MONOTONIC_USEC"]) <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.wait_for("READY=1", start=2).fields["STATUS"] == "queue 0"
    assert notify.wait_for("STOPPING=1").fields["STATUS"] == "draining"


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_our_pid(notify: NotifySocket) -> None:
    """sd_watchdog_enabled semantics: half of WATCHDOG_USEC; off when WATCHDOG_PID names another process."""
    def interval(env: dict[str, str]) -> float | None:
        notifier = Notifier({"NOTIFY_SOCKET": notify.address, **env})
        notifier.close()
        return notifier.watchdog_interval()

    assert interval({"WATCHDOG_USEC": "30000000"}) == 15
    assert interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 1
    assert interval({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert interval({"WATCHDOG_USEC": "0"}) is None


async def test_watchdog_and_status_loops_ping_on_schedule(notify: NotifySocket) -> None:
    """WATCHDOG=1 at half the watchdog period and a STATUS= line at each status interval."""
    notifier = Notifier({"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": "100000"})

    async def status() -> str:
        return "queue 7"

    tasks = [asyncio.create_task(notifier.watchdog_loop()), asyncio.create_task(notifier.status_loop(status, 0.1))]
    await asyncio.sleep(0.35)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    notifier.close()
    await asyncio.sleep(0.05)
    pings = [m for m in notify.messages if "WATCHDOG=1" in m]
    statuses = [m for m in notify.messages if m.fields.get("STATUS") == "queue 7"]
    assert 5 <= len(pings) <= 9
    assert 2 <= len(statuses) <= 4


# -- socket activation --------------------------------------------------------------------------

_SHOW_INHERITED = (
    "import os, json\n"
    "from relay.runtime.systemd import inherited_sockets\n"
    "try:\n"
    "    found = inherited_sockets()\n"
    "    print(json.dumps({'sockets': [[s.name, s.sock.fileno(), s.sock.getsockname()[1]] for s in found],\n"
    "                      'left': [v for v in os.environ if v.startswith('LISTEN_')],\n"
    "                      'cloexec': [not os.get_inheritable(s.sock.fileno()) for s in found]}))\n"
    "except Exception as exc:\n"
    "    print(json.dumps({'error': str(exc)}))\n"
)


def _activated(names: str, fds: list[int], env: dict[str, str] | None = None) -> dict[str, object]:
    args = [sys.executable, "-m", "relay.testing.process", names, *map(str, fds), "--",
            sys.executable, "-c", _SHOW_INHERITED]
    out = subprocess.run(args, pass_fds=fds, capture_output=True, text=True, check=True, timeout=30,
                         env={**os.environ, **(env or {})}).stdout
    return dict(json.loads(out))


def test_inherited_sockets_are_taken_from_fd_3_with_their_names() -> None:
    """LISTEN_FDS/LISTEN_PID/LISTEN_FDNAMES: fds 3.. become named sockets, the variables are cleared."""
    with listening_socket() as web, listening_socket() as metrics:
        shown = _activated("webhook:metrics", [web.fileno(), metrics.fileno()])
        ports = [web.getsockname()[1], metrics.getsockname()[1]]
    assert shown["sockets"] == [["webhook", 3, ports[0]], ["metrics", 4, ports[1]]]
    assert shown["left"] == [] and shown["cloexec"] == [True, True]


def test_inherited_sockets_ignore_another_process_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    """LISTEN_FDS meant for another pid (e.g. inherited from a parent) is ignored and cleared."""
    env = {"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid() + 1)}
    assert inherited_sockets(env) == [] and env == {}


def test_inherited_descriptor_that_is_not_a_listening_socket_is_a_clear_error() -> None:
    """A .socket unit passing a non-socket (or a datagram socket) fails with an error naming LISTEN_FDS."""
    read_end, write_end = os.pipe()
    try:
        shown = _activated("webhook", [read_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert "LISTEN_FDS" in str(shown["error"]) and "not a socket" in str(shown["error"])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dgram:
        shown = _activated("webhook", [dgram.fileno()])
    assert "ListenStream" in str(shown["error"])
    with pytest.raises(ConfigError, match="must be a number"):
        inherited_sockets({"LISTEN_FDS": "x", "LISTEN_PID": str(os.getpid())})


# -- journald -----------------------------------------------------------------------------------


def test_journald_is_the_reader_only_when_journal_stream_names_our_stderr() -> None:
    """JOURNAL_STREAM=DEV:INODE must match the descriptor: an inherited value for another stream is ignored."""
    with tempfile.TemporaryFile() as ours, tempfile.TemporaryFile() as other:
        st = os.fstat(ours.fileno())
        value = f"{st.st_dev}:{st.st_ino}"
        assert journald_reads(ours.fileno(), {"JOURNAL_STREAM": value})
        assert not journald_reads(other.fileno(), {"JOURNAL_STREAM": value})
        assert not journald_reads(ours.fileno(), {})
        assert not journald_reads(ours.fileno(), {"JOURNAL_STREAM": "garbage"})


# -- the units ----------------------------------------------------------------------------------


def _unit_settings(path: Path) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_service_unit_declares_notify_watchdog_reload_directories_and_credentials() -> None:
    """The unit is Type=notify with a watchdog, a reload whose exit status is the outcome, SIGTERM to the main
    process only (it drains its children), state/runtime/config directories and credentials."""
    unit = _unit_settings(UNIT)
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == ["/usr/local/bin/parley-relay serve --config /etc/parley-relay/relay.yaml"]
    assert unit["ExecReload"] == ["/usr/local/bin/parley-relay reload --pid $MAINPID"]
    assert unit["Restart"] == ["on-failure"] and unit["KillMode"] == ["mixed"]
    assert unit["WatchdogSec"] and unit["StateDirectory"] == ["parley-relay"]
    assert unit["RuntimeDirectory"] == ["parley-relay"]
    assert unit["ConfigurationDirectory"] == ["parley-relay"]
    assert {c.split(":")[0] for c in unit["LoadCredential"]} == {"apns.p8", "firebase.json"}
    assert unit["MemoryDenyWriteExecute"] == ["yes"] and unit["CapabilityBoundingSet"] == [""]
    sock = _unit_settings(SOCKET_UNIT)
    assert sock["ListenStream"] and "PartOf" not in sock  # a service restart must keep the socket


def test_service_unit_allows_the_descriptors_of_raised_fcm_slots_and_a_full_accept_queue() -> None:
    """Each FCM slot is a connection: a delivery process with four FCM apps raised to 1,000 slots each
    (docs/delivery.md: sizing), or a webhook process with its whole accept queue, fits under the unit's
    LimitNOFILE; systemd's default soft limit (1,024) holds neither."""
    limit = int(_unit_settings(UNIT)["LimitNOFILE"][0])
    assert Listen().backlog == 4096 and FcmApp.__pydantic_fields__["concurrency"].default <= 1000
    assert limit >= 4 * 1000 + Listen().backlog + 1024  # + the store, logs, pipes and the rest


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    return found


def test_hardened_unit_exposure_is_at_most_2() -> None:
    """`systemd-analyze security --offline=true` rates the shipped unit's exposure 2.0 or lower."""
    result = subprocess.run([_systemd_analyze(), "security", "--offline=true", "--no-pager", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for parley-relay\.service:\s*([0-9.]+)", result.stdout)
    assert match, result.stdout + result.stderr
    exposure = float(match.group(1))
    print(f"exposure {exposure}")
    assert exposure <= MAX_EXPOSURE


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` is clean for both units (ExecStart pointed at the installed entry point)."""
    analyze = _systemd_analyze()
    command = " ".join(relay_command())
    text = UNIT.read_text().replace("/usr/local/bin/parley-relay", command)
    (tmp_path / UNIT.name).write_text(text)
    shutil.copy(SOCKET_UNIT, tmp_path / SOCKET_UNIT.name)
    result = subprocess.run([analyze, "verify", str(tmp_path / UNIT.name), str(tmp_path / SOCKET_UNIT.name)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


# -- MemoryDenyWriteExecute=yes -----------------------------------------------------------------

# PR_SET_MDWE (Linux >= 6.3) is what systemd applies for MemoryDenyWriteExecute=yes where the kernel has it.
_UNDER_MDWE = (
    "import ctypes, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"
    "    sys.exit(77)\n"
    "from relay.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def _post(url: str, doc: object) -> int:
    request = urllib.request.Request(url, data=json.dumps(doc).encode(), headers={AUTH_HEADER: AUTH_VALUE})
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def test_relay_delivers_under_memory_deny_write_execute(sandbox: Sandbox) -> None:
    """The unit's MemoryDenyWriteExecute=yes does not break Python, cffi, cryptography, uvloop, aioapns or FCM."""
    with listening_socket() as sock, NotifySocket() as notify:
        config = sandbox.write()
        command = [sys.executable, "-c", _UNDER_MDWE, "serve", "--config", str(config)]
        with RelayProcess(config, notify=notify, activation=[("webhook", sock)], command=command) as relay:
            try:
                notify.wait_for("READY=1", timeout=15)
            except TimeoutError:
                if relay.proc.poll() == 77:
                    pytest.skip("this kernel has no PR_SET_MDWE")
                raise
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/parley/webhook"
            assert _post(url, sample("message", to=[IOS_TOKEN])) == 200
            assert _post(url, sample("message", to=[ANDROID_TOKEN])) == 200
            sandbox.apns.wait_for_requests(1)
            sandbox.fcm.wait_for_requests(1)
            assert relay.stop() == 0, relay.log()
