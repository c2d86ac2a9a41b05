"""``parley-relay demo --keep-running`` as a newcomer runs it (issue 20 item 11): it shows what the fake
providers receive for a curl line sent later, and SIGTERM ends it cleanly, leaving no key-holding files."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path

import aiohttp

from relay.testing.demo import curl_line
from relay.testing.process import free_port, relay_command
from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE


def _read_until(process: subprocess.Popen[str], needle: str, seen: list[str], timeout: float = 30.0) -> None:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        seen.append(line)
        if needle in line:
            return
    raise AssertionError(f"{needle!r} not printed; output so far:\n{''.join(seen)}")


async def test_kept_running_demo_shows_later_pushes_and_cleans_up_on_sigterm() -> None:
    """After the samples, a message posted as the printed curl line does appears as an APNs request in the
    demo's output; SIGTERM then exits 0 and removes the temporary directory (test CA and provider keys)."""
    port = free_port()
    process = subprocess.Popen([*relay_command(), "demo", "--keep-running", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen: list[str] = []
    try:
        _read_until(process, "serving on", seen)
        store = Path(re.search(r"\(store: (\S+)\)", "".join(seen)).group(1))  # type: ignore[union-attr]
        assert store.parent.exists()
        printed = re.search(r"-d '(.+?)' http", curl_line(f"http://127.0.0.1:{port}/x"))
        assert printed is not None
        body = json.loads(printed.group(1))
        async with aiohttp.ClientSession() as session, session.post(
                f"http://127.0.0.1:{port}/parley/webhook", json=body, headers={AUTH_HEADER: AUTH_VALUE}) as answer:
            assert answer.status == 200
        _read_until(process, "Hello from curl", seen)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()
    assert store.parent.name.startswith("parley-relay-demo-") and not store.parent.exists()
