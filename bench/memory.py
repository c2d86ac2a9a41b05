"""Memory of the relay's process tree at defaults: the sum of every process's Pss, in MiB.

    python bench/memory.py                 # 1,000 devices (half iOS, half Android), 400 webhooks
    python bench/memory.py --devices 1000 --webhooks 400 --processes auto

Starts the fakes (``bench/fakes.py``) and ``parley-relay serve`` with the default process model (``processes:
auto``: the supervisor, the webhook processes and the delivery processes), sends ``--webhooks`` webhooks
spread over both platforms so that every provider is built and connected, waits until they were pushed, and
then reads ``Pss`` from ``/proc/PID/smaps_rollup`` of each process. Pss (proportional set size) counts a page
shared by N processes as 1/N in each, so the sum is what the tree costs the machine: the shared interpreter and
libraries once, each process's own heap in full. Prints one line per process and the total; the issue's target
is a total at or below 110 MiB.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Fakes, Relay, android_tokens, ios_tokens, scratch
from relay.testing.sandbox import AUTH_HEADER, AUTH_VALUE, sample

TARGET_MIB = 110.0


def pss_mib(pid: int) -> float:
    """``Pss`` of ``pid`` in MiB (``/proc/PID/smaps_rollup``, Linux 4.14+)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def post(url: str, doc: object) -> int:
    request = urllib.request.Request(url, data=json.dumps(doc).encode(),
                                     headers={AUTH_HEADER: AUTH_VALUE, "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return int(response.status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--webhooks", type=int, default=400)
    parser.add_argument("--processes", default=None, help="serve --processes (default: the config's, auto)")
    args = parser.parse_args()
    ios, android = ios_tokens(args.devices // 2), android_tokens(args.devices - args.devices // 2)
    devices = {t: {"app": "ios"} for t in ios} | {t: {"app": "android"} for t in android}
    with scratch() as tmp:
        root = Path(tmp)
        fakes = Fakes(root)
        try:
            base = fakes.ask("config")
            relay = Relay(root, base, "memory", devices, processes=args.processes).wait_ready()
            try:
                mark = fakes.mark()
                tokens = [t for pair in zip(ios, android, strict=False) for t in pair]
                for n in range(args.webhooks):
                    post(relay.url, sample("message", to=[tokens[n % len(tokens)]], id=n + 1))
                half = args.webhooks // 2
                fakes.wait_count(mark, "apns", half, 60)
                fakes.wait_count(mark, "fcm", args.webhooks - half, 60)
                time.sleep(1.0)  # the last outcomes recorded, caches settled
                pids = relay.pids()
                figures = {name: pss_mib(pid) for name, pid in pids.items()}
            finally:
                relay.stop()
        finally:
            fakes.close()
    for name, mib in figures.items():
        print(f"{name:12s} {mib:7.1f} MiB Pss")
    total = sum(figures.values())
    verdict = "ok" if total <= TARGET_MIB else "MISSED"
    print(f"{'total':12s} {total:7.1f} MiB Pss  (target <= {TARGET_MIB:g} MiB: {verdict}; "
          f"{len(figures)} processes, {args.devices} devices)")
    return 0 if total <= TARGET_MIB else 1


if __name__ == "__main__":
    sys.exit(main())
