"""Consecutive starts of the default process model on SQLite, under CPU load: how many become ready (issue 17.8).

    python bench/starts.py                 # 200 starts, alternating fresh files and files of schema version 3
    python bench/starts.py --starts 20     # a quick look
    python bench/starts.py --no-load       # without the busy-looping processes

Each start: ``parley-relay serve`` (the supervisor, its webhook and delivery processes) on a fresh store file,
or on a copy of a version-3 file with deliveries in it (migrated at start); ready = ``/readyz`` answered 200
within ``--timeout``; then ``SIGTERM`` and exit 0. One busy-looping process per core runs throughout. Prints
each failure's last log lines, then ``READY n / N`` and the start-to-ready times (p50, max).
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import harness
from harness import Fakes, Relay

from tests.test_store_sqlite import _VERSION_3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a start may take to be ready")
    parser.add_argument("--no-load", action="store_true", help="no busy-looping processes")
    args = parser.parse_args()
    hogs = [] if args.no_load else [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                                    for _ in range(os.cpu_count() or 1)]
    ready: list[float] = []
    failed: list[str] = []
    try:
        with harness.scratch() as tmp:
            root = Path(tmp)
            fakes = Fakes(root)
            try:
                base = fakes.ask("config")
                for n in range(args.starts):
                    path = root / f"start-{n}.db"
                    kind = "old" if n % 2 else "fresh"
                    if kind == "old":
                        with closing(sqlite3.connect(path)) as conn:
                            conn.executescript(_VERSION_3)
                            conn.execute("PRAGMA journal_mode=WAL")
                    relay = Relay(root, base, f"start-{n}", {}, store={"backend": "sqlite", "path": str(path)})
                    try:
                        relay.wait_ready(timeout=args.timeout)
                        ready.append(relay.ready_after)
                        relay.stop()
                        if relay.proc.returncode != 0:
                            failed.append(f"start {n} ({kind}): exit {relay.proc.returncode} after SIGTERM")
                    except (RuntimeError, TimeoutError) as exc:
                        failed.append(f"start {n} ({kind}): {str(exc)[-1500:]}")
                        relay.stop()
                    path.unlink(missing_ok=True)
                    print(f"{n + 1}/{args.starts}: ready {len(ready)}, failed {len(failed)}", flush=True)
            finally:
                fakes.close()
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    for line in failed:
        print(line)
    times = sorted(ready)
    p50 = times[len(times) // 2] if times else 0.0
    print(f"READY {len(ready)} / {args.starts} (CPU load: {'none' if args.no_load else f'{len(hogs)} busy loops'}); "
          f"start to ready p50 {p50:.2f} s, max {max(times, default=0.0):.2f} s")
    sys.exit(0 if len(ready) == args.starts and not failed else 1)


if __name__ == "__main__":
    main()
