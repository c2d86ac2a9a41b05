"""What an app's backlog drain costs another app, by the size of the apps' slots (SQLite, default process model).

    python bench/drain_isolation.py                        # slots 100 and 500, two rounds each
    python bench/drain_isolation.py --slots 100,250,500 --rounds 1 --backlog 20000

For each slot count (``apps.*.concurrency`` and ``delivery.concurrency``), alternating so that each value sees
the machine in the same state:

1. ``--backlog`` APNs deliveries are stored first (with their app hint, as the webhook stores them; 1,000
   devices), as an outage leaves them, and the fake APNs answers ``--delay`` seconds late (a provider that far
   away; on loopback it answers in well under a millisecond).
2. The relay starts on that store and drains it. Meanwhile single Android webhooks arrive at ``--rate`` per
   second (open loop, latency from the scheduled send time): their ack p50/p99, and webhook -> fake FCM
   arrival p50/p99.
3. The drain rate: APNs pushes/s at the fake while the Android load ran.

More slots let a provider that is far away be sent to faster (Little's law: an app never sends faster than
its slots ÷ the provider's answer time); when the relay's own CPU is what limits the drain, they only make
the delivery loop's queue longer, and the other app's pushes wait in it. docs/delivery.md has the figures.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from harness import Fakes, Relay
from parked import fill, pct


def android_beside_a_drain(fakes: Fakes, relay: Relay, android: list[str], rate: float,
                           seconds: float) -> dict[str, Any]:
    """Single Android webhooks at ``rate`` while APNs drains: ack and webhook -> fake FCM latencies, and the
    APNs pushes/s meanwhile."""
    mark = fakes.mark()
    load = harness.load(relay.url, android, mode="open", rate=rate, connections=8, record_sends=True,
                        duration=seconds, warmup=0.0)
    apns = fakes.since(mark)["apns"]
    to_fcm = fakes.latencies(mark, load["sends"], ["fcm"], timeout=60)
    return {"ack_p50_ms": load["p50"] * 1000, "ack_p99_ms": load["p99"] * 1000,
            "fcm_p50_ms": pct(to_fcm, 50) * 1000, "fcm_p99_ms": pct(to_fcm, 99) * 1000,
            "drain_per_s": apns["count"] / seconds, "missing": len(load["sends"]) - len(to_fcm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slots", default="100,500", help="comma-separated apps' concurrency values to compare")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--backlog", type=int, default=30_000, help="APNs deliveries stored before the start")
    parser.add_argument("--delay", type=float, default=0.02, help="seconds the fake APNs takes to answer")
    parser.add_argument("--rate", type=float, default=50.0, help="Android webhooks per second during the drain")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of Android webhooks")
    args = parser.parse_args()
    slots = [int(s) for s in args.slots.split(",")]
    with harness.scratch() as tmp:
        root = Path(tmp)
        fakes = Fakes(root)
        try:
            base: dict[str, Any] = fakes.ask("config")
            fakes.ask("delay", platform="apns", seconds=args.delay)
            ios, android = harness.ios_tokens(1000), harness.android_tokens(1000)
            registry = root / "devices.yaml"
            harness.write_registry(registry, ios, android)
            print(f"{args.backlog:,} APNs deliveries stored, the fake APNs answering {1000 * args.delay:.0f} ms "
                  f"late; Android webhooks at {args.rate:g}/s for {args.seconds:g} s from the relay's start")
            for round_ in range(args.rounds):
                for n in slots:
                    path = root / f"drain-{n}-{round_}.db"
                    fill(path, ios, args.backlog, "ios")
                    apps = {name: {**app, "concurrency": n} for name, app in base["apps"].items()}
                    delivery = {**base.get("delivery", {}), "concurrency": n}
                    relay = Relay(root, {**base, "apps": apps, "delivery": delivery}, f"drain-{n}-{round_}", None,
                                  registry=registry, store={"backend": "sqlite", "path": str(path)})
                    try:
                        relay.wait_ready()
                        got = android_beside_a_drain(fakes, relay, android, args.rate, args.seconds)
                    finally:
                        relay.stop()
                    missing = f", {got['missing']} missing" if got["missing"] else ""
                    print(f"slots {n:>5}: APNs drain {got['drain_per_s']:,.0f}/s; Android ack p50/p99 "
                          f"{got['ack_p50_ms']:.1f} / {got['ack_p99_ms']:.1f} ms; Android webhook -> FCM p50/p99 "
                          f"{got['fcm_p50_ms']:.1f} / {got['fcm_p99_ms']:.1f} ms{missing}", flush=True)
        finally:
            fakes.close()


if __name__ == "__main__":
    main()
