"""The open-file limit: raised at start (every FCM slot is a connection), and a warning when it cannot be."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from relay.testing.process import RelayProcess, free_port
from relay.testing.sandbox import Sandbox

# Run in a child: a test must not change the test process's own limits.
_CHILD = """
import resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), int(sys.argv[3]) if sys.argv[3] != "-" else hard))
from relay.config import load_config
from relay.observability import setup_logging
from relay.runtime.limits import raise_open_files
setup_logging("logfmt", "INFO")
before, after = raise_open_files(load_config(sys.argv[1], credentials=False))
print(before, after, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _child(config: Path, soft: int, hard: int | None) -> tuple[list[int], str]:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(config), str(soft), str(hard or "-")],
                          capture_output=True, text=True, timeout=60, check=True)
    return [int(n) for n in done.stdout.split()], done.stderr


def test_serve_raises_the_soft_open_file_limit_toward_the_hard_one(sandbox: Sandbox) -> None:
    """A soft limit of 512 (a shell's or systemd's default is 1,024) is raised to the hard limit, at most
    65,536, before anything is opened; nothing is logged when the apps' connections fit."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    expected = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    (before, after, now), stderr = _child(sandbox.write(), 512, None)
    assert (before, after, now) == (512, expected, expected)
    assert "open-file limit" not in stderr


def test_a_hard_limit_below_the_fcm_slots_is_a_warning_naming_the_fix(sandbox: Sandbox) -> None:
    """An FCM app with 1,000 slots (each a connection) under a hard limit of 600: the soft limit goes to 600
    and a warning says what is needed and how to raise it."""
    config = sandbox.write(apps={"android": {"concurrency": 1000}}, delivery={"concurrency": 1000})
    (before, after, now), stderr = _child(config, 512, 600)
    assert (before, after, now) == (512, 600, 600)
    assert "open-file limit below what the apps' connections may need" in stderr
    assert "needed=1264" in stderr and "LimitNOFILE=" in stderr  # 1,000 FCM + 2 x 4 APNs + 256


def _soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-file limit in /proc/{pid}/limits")


def test_every_process_of_a_started_relay_runs_with_the_raised_limit(sandbox: Sandbox, tmp_path: Path) -> None:
    """``parley-relay serve`` started under a soft limit of 1,024 (systemd's default): the supervisor and the
    webhook and delivery processes it forks all run with the raised one."""
    port = free_port()
    config = sandbox.write(listen={"host": "127.0.0.1", "port": port})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, soft), hard))  # what the child inherits
    try:
        relay = RelayProcess(config, log=tmp_path / "relay.log")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with relay:
        relay.wait_ready(f"http://127.0.0.1:{port}/readyz")
        pids = {"main": relay.proc.pid, **relay.children()}
        assert any(name.startswith("delivery") for name in pids) and any(n.startswith("ingest") for n in pids)
        assert {name: _soft_open_files(pid) for name, pid in pids.items()} == dict.fromkeys(pids, expected)
