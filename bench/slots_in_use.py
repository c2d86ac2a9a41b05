"""Whether an app's slots are what holds its pushes back under a closed loop of webhooks (SQLite, defaults).

    python bench/slots_in_use.py                 # one run, 64 clients on iOS devices for 6 s
    python bench/slots_in_use.py --seconds 10 --slots 250

A closed loop of 64 webhook clients on APNs devices (``bench/run.py``'s ``ceiling_leaving`` row) while the
relay's ``/metrics`` is read every 0.2 s. It prints the pushes that left during the load against the webhooks
acknowledged, the provider requests' mean time (``parley_relay_provider_request_seconds``), and the app's
slots in use (``parley_relay_delivery_slots_in_use``) over the samples. Slots at their limit mean the app's
``concurrency`` caps the rate (Little's law: slots ÷ answer time); slots idle while pushes lag behind the acks
mean something else does: the claims that refill them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from run import Suite

_LATENCY = "parley_relay_provider_request_seconds"
_SLOTS = 'parley_relay_delivery_slots_in_use{app="ios"'


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def apns_requests(text: str) -> tuple[float, float]:
    """(count, sum of seconds) of the APNs provider requests so far."""
    count = total = 0.0
    for line in text.splitlines():
        if 'platform="apns"' in line and line.startswith(f"{_LATENCY}_count"):
            count += float(line.rsplit(" ", 1)[1])
        elif 'platform="apns"' in line and line.startswith(f"{_LATENCY}_sum"):
            total += float(line.rsplit(" ", 1)[1])
    return count, total


def slots_in_use(text: str) -> float | None:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(_SLOTS)]
    return sum(values) if values else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--slots", type=int, default=100, help="apps' and delivery.concurrency (default: 100)")
    args = parser.parse_args()
    with harness.scratch() as tmp:
        suite = Suite(Path(tmp), args.seconds)
        overrides: dict[str, Any] = {"metrics": {"listen": None}}  # /metrics on the webhook port
        if args.slots != 100:
            overrides["apps"] = {name: {**app, "concurrency": args.slots} for name, app in suite.base["apps"].items()}
            overrides["delivery"] = {**suite.base.get("delivery", {}), "concurrency": args.slots}
        relay = suite.relay("slots", **overrides)
        samples: list[float] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.2):
                value = slots_in_use(scrape(relay.port))
                if value is not None:
                    samples.append(value)

        try:
            before = apns_requests(scrape(relay.port))
            sampler = threading.Thread(target=sample)
            mark = suite.fakes.mark()
            sampler.start()
            result = harness.load(relay.url, suite.ios, mode="closed", connections=64, warmup=0,
                                  duration=args.seconds)
            left = suite.fakes.since(mark)["apns"]["count"]
            stop.set()
            sampler.join()
            after = apns_requests(scrape(relay.port))
        finally:
            relay.stop()
            suite.close()
    acked = max(1, int(result["ok"]))
    requests = after[0] - before[0]
    mean_ms = (after[1] - before[1]) / requests * 1000 if requests else 0.0
    print(f"{args.slots} slots: {left:,} pushes left of {acked:,} acked during the load ({left / acked:.2f}); "
          f"{result['rps'] * left / acked:,.0f} pushes/s; APNs request mean {mean_ms:.1f} ms "
          f"(the slots allow {args.slots / max(mean_ms, 0.001) * 1000:,.0f}/s)")
    while samples and samples[0] == 0:  # before the load generator's first request
        samples.pop(0)
    if samples:
        idle = sum(value < args.slots / 2 for value in samples) / len(samples)
        print(f"slots in use over {len(samples)} samples: min {min(samples):.0f}, median "
              f"{statistics.median(samples):.0f}, max {max(samples):.0f}; under half the slots in "
              f"{100 * idle:.0f} % of them")


if __name__ == "__main__":
    main()
