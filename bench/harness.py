"""Process plumbing for ``bench/run.py``: the fakes process, relay processes, the load generator, store prefill.

Every measured component is its own OS process: the fakes (``bench/fakes.py``), the server under test
(``parley-relay serve`` or ``bench/bare_server.py``), the load (``bench/loadgen.py``) and the bare provider
clients (``bench/ceilings.py``). This module only starts them, waits for them and reads their answers.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from relay.testing.process import RelayProcess, free_port

BENCH = Path(__file__).resolve().parent
PYTHON = sys.executable



def ios_tokens(n: int, salt: str = "") -> list[str]:
    """``n`` APNs-shaped (64 hex) push tokens."""
    return [hashlib.sha256(f"ios-{salt}{i}".encode()).hexdigest() for i in range(n)]


def android_tokens(n: int, salt: str = "") -> list[str]:
    """``n`` FCM-registration-token-shaped push tokens."""
    return [f"fcm-{salt}{i}:APA91bH_bench_android_device_{i:07d}" for i in range(n)]


class Fakes:
    """``bench/fakes.py`` as a child process; one JSON line per command."""

    def __init__(self, root: Path) -> None:
        self.proc = subprocess.Popen([PYTHON, str(BENCH / "fakes.py"), str(root)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.info: dict[str, Any] = self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fakes process died")
        return json.loads(line)

    def ask(self, cmd: str, **fields: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **fields}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def mark(self) -> dict[str, int]:
        return dict(self.ask("mark"))

    def since(self, mark: Mapping[str, int], ids: bool = False) -> dict[str, Any]:
        return dict(self.ask("since", apns=mark["apns"], fcm=mark["fcm"], ids=ids))

    def wait_count(self, mark: Mapping[str, int], platform: str, n: int, timeout: float) -> dict[str, Any]:
        """Poll until ``n`` successful pushes to ``platform`` arrived after ``mark`` (or ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            got = self.since(mark)[platform]
            if got["count"] >= n or time.monotonic() > deadline:
                return dict(got)
            time.sleep(0.2)

    def latencies(self, mark: Mapping[str, int], sends: Sequence[Sequence[float]], platforms: Sequence[str],
                  timeout: float) -> list[float]:
        """Seconds from each webhook's send (the load generator's ``[object id, send time]`` pairs) to its push's
        arrival at a fake of ``platforms``, once every one arrived after ``mark`` (or ``timeout``): the missing
        ones are left out."""
        sent = {int(i): t for i, t in sends}
        deadline = time.monotonic() + timeout
        while True:
            got = self.since(mark, ids=True)
            arrived = {int(i): t for p in platforms for i, t in got[p]["ids"]}
            if all(i in arrived for i in sent) or time.monotonic() > deadline:
                return [arrived[i] - t for i, t in sent.items() if i in arrived]
            time.sleep(0.2)

    def close(self) -> None:
        try:
            self.ask("quit")
        except (OSError, RuntimeError, ValueError):
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (Linux ``/proc``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU time (user + system) of process ``pid``, or of its thread ``thread`` (Linux ``/proc``)."""
    path = f"/proc/{pid}/task/{thread}/stat" if thread is not None else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14 and 15)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path | None = None) -> None:
    """Poll ``url`` (``/readyz``) every 5 ms until 200; the child dying or ``timeout`` is an error."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise RuntimeError(f"server exited with {proc.returncode} before it was ready\n{tail}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready within {timeout}s")
        time.sleep(0.005)


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """SIGTERM (the relay drains) and wait; kill after ``timeout``."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Relay:
    """One ``parley-relay serve`` child on a free loopback port, its log in ``root``."""

    def __init__(self, root: Path, base: Mapping[str, Any], name: str, devices: Mapping[str, Mapping[str, str]] | None,
                 registry: Path | None = None, processes: str | None = None, **overrides: Any) -> None:
        self.port = free_port()
        config = {**base, **overrides, "listen": {"host": "127.0.0.1", "port": self.port},
                  "logging": {"level": "WARNING"}}
        if registry is None:
            registry = root / f"{name}-devices.yaml"
            registry.write_text(yaml.safe_dump({"devices": dict(devices or {})}))
        config["registry"] = str(registry)
        self.config = root / f"{name}.yaml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = root / f"{name}.log"
        self.log.unlink(missing_ok=True)
        self.started = time.monotonic()
        # The launcher the tests use; processes "1" = serve --processes 1, None = the multi-process default.
        self.launched = RelayProcess(self.config, log=self.log, processes=processes)
        self.proc = self.launched.proc
        self.ready_after = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/parley/webhook"

    def wait_ready(self, timeout: float = 120.0) -> Relay:
        wait_ready(f"http://127.0.0.1:{self.port}/readyz", self.proc, timeout, self.log)
        self.ready_after = time.monotonic() - self.started
        return self

    def rss_mb(self) -> float:
        """The relay's resident memory: the main process and every role process."""
        return sum(rss_mb(pid) for pid in (self.proc.pid, *self.launched.children().values()))

    def pids(self) -> dict[str, int]:
        """``main`` and the role processes (``ingest.0``, ``delivery.0``...), for profiling."""
        return {"main": self.proc.pid, **self.launched.children()}

    def cpu(self) -> tuple[float, float]:
        """CPU seconds so far: every process of the relay, and the main thread of the one that delivers (the
        only process in ``--processes 1``, where its event loop also acknowledges webhooks)."""
        children = self.launched.children()
        pids = [self.proc.pid, *children.values()]
        deliverer = next((pid for name, pid in children.items() if name.startswith("delivery")), self.proc.pid)
        return sum(cpu_seconds(pid) for pid in pids), cpu_seconds(deliverer, deliverer)

    def stop(self) -> None:
        stop(self.proc)



@contextmanager
def bare_server() -> Iterator[tuple[str, int]]:
    """``bench/bare_server.py`` on a free port; yields its webhook URL and its pid."""
    port = free_port()
    proc = subprocess.Popen([PYTHON, str(BENCH / "bare_server.py"), str(port)])
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz", proc, 30)
        yield f"http://127.0.0.1:{port}/parley/webhook", proc.pid
    finally:
        proc.kill()
        proc.wait()


def run_json(script: str, spec: Mapping[str, Any], timeout: float = 300.0) -> dict[str, Any]:
    """Run ``bench/<script>`` with one JSON argument; its last stdout line is the JSON result."""
    try:
        done = subprocess.run([PYTHON, str(BENCH / script), json.dumps(spec)], capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{script} ran longer than {timeout:g} s") from None  # a failed row, not a crash
    if done.returncode != 0:
        raise RuntimeError(f"{script} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def load(url: str, tokens: Sequence[str], **spec: Any) -> dict[str, Any]:
    """One load-generator run against ``url`` with the sandbox's auth header."""
    from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE

    return run_json("loadgen.py", {"url": url, "tokens": list(tokens), "headers": {AUTH_HEADER: AUTH_VALUE},
                                   **spec})


def prefill(path: Path, tokens: Sequence[str], count: int) -> None:
    """Store ``count`` accepted deliveries (round-robin over ``tokens``) through the relay's own store code."""
    from relay.config import StoreSettings
    from relay.inbound.parse import dedupe_key, parse_webhook
    from relay.store.base import NewDelivery
    from relay.store.sqlite import SqliteStore
    from relay.testing.sandbox import sample

    async def fill() -> None:
        store = SqliteStore(StoreSettings(backend="sqlite", path=path))
        await store.open()
        now = time.time()
        items = []
        for n in range(count):
            token = tokens[n % len(tokens)]
            hook = parse_webhook(json.dumps(sample("message", to=[token], id=n + 1)).encode())
            items.append(NewDelivery(token, hook.type, hook.data, dedupe_key(hook, token), now + 86400))
        for start in range(0, count, 2000):
            await store.enqueue(items[start:start + 2000], now, 600.0)
        await store.close()

    asyncio.run(fill())


def write_registry(path: Path, ios: Sequence[str], android: Sequence[str]) -> None:
    """A registry YAML in the documented one-line-per-device shape (written directly: fast for 1M)."""
    with path.open("w") as fh:
        fh.write("devices:\n")
        fh.writelines(f"  {token}: {{app: ios}}\n" for token in ios)
        fh.writelines(f"  '{token}': {{app: android}}\n" for token in android)


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="parley-bench-")
