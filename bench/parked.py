"""A parked backlog must not slow another app (issue 18.1): SQLite, the default process model.

    python bench/parked.py                    # N = 150,000 parked, 20 s of iOS webhooks at 100/s
    python bench/parked.py --parked 1000000   # the hour-long outage (prefill alone takes minutes)
    python bench/parked.py --parked 20000 --seconds 5 --drain-timeout 60   # a quick look

1. Baseline: a relay on an empty store drains ``--baseline`` Android deliveries to the fake FCM (pushes/s at
   the fake, first to last arrival): the sustained rate of an empty store.
2. ``--parked`` Android deliveries are stored first (through the relay's own ``SqliteStore.enqueue``, each with
   its app hint, as the webhook stores them; fan-out over 1,000 devices), and the relay starts with the
   Android app's FCM endpoint "hanging" (a socket that accepts and never answers): the app's slots fill with
   hung sends and the rest stays parked.
3. Single iOS webhooks at 100/s, open loop (latency from the scheduled send time): ack p50/p99, and iOS
   webhook -> fake APNs arrival p50/p99.
4. FCM returns (the config points at the fake FCM again; ``SIGHUP``): the drain rate of the parked backlog,
   and its ratio to the baseline of step 1.

Targets (issue 18): ack p99 <= 25 ms, webhook -> APNs p99 <= 100 ms, drain >= 0.8 x baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from harness import Fakes, Relay


def fill(path: Path, tokens: list[str], count: int, app: str) -> float:
    """Store ``count`` message deliveries for ``tokens`` (round-robin) with the app hint; seconds it took."""
    from relay.config import StoreSettings
    from relay.inbound.parse import dedupe_key, parse_webhook
    from relay.store.base import NewDelivery
    from relay.store.sqlite import SqliteStore
    from relay.testing.sandbox import sample

    async def run() -> None:
        store = SqliteStore(StoreSettings(backend="sqlite", path=path))
        await store.open()
        now = time.time()
        for start in range(0, count, 5000):
            items = []
            for n in range(start, min(count, start + 5000)):
                token = tokens[n % len(tokens)]
                hook = parse_webhook(json.dumps(sample("message", to=[token], id=10_000_000 + n)).encode())
                items.append(NewDelivery(token, hook.type, hook.data, dedupe_key(hook, token), now + 86400,
                                         app=app))
            await store.enqueue(items, now, 600.0)
        await store.close()

    started = time.monotonic()
    asyncio.run(run())
    return time.monotonic() - started


def drain_rate(fakes: Fakes, mark: dict[str, int], count: int, timeout: float) -> tuple[float, int]:
    """FCM pushes/s at the fake (first to last arrival) once ``count`` arrived, or what arrived by ``timeout``."""
    got = fakes.wait_count(mark, "fcm", count, timeout)
    span = got["last"] - got["first"]
    return (got["count"] / span if span > 0 else 0.0), int(got["count"])


def ios_at_100(fakes: Fakes, relay: Relay, ios: list[str], seconds: float) -> dict[str, Any]:
    """Single iOS webhooks at 100/s (open loop): ack and webhook -> fake APNs latencies."""
    mark = fakes.mark()
    load = harness.load(relay.url, ios, mode="open", rate=100, connections=8, record_sends=True,
                        duration=seconds, warmup=1.0)
    to_apns = fakes.latencies(mark, load["sends"], ["apns"], timeout=60)
    return {"ack_p50_ms": load["p50"] * 1000, "ack_p99_ms": load["p99"] * 1000,
            "apns_p50_ms": pct(to_apns, 50) * 1000, "apns_p99_ms": pct(to_apns, 99) * 1000,
            "webhooks": load["ok"], "missing": len(load["sends"]) - len(to_apns)}


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parked", type=int, default=150_000)
    parser.add_argument("--baseline", type=int, default=20_000, help="deliveries drained on an empty store")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of iOS webhooks at 100/s")
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    args = parser.parse_args()
    with harness.scratch() as tmp:
        root = Path(tmp)
        fakes = Fakes(root)
        hang = socket.socket()  # "FCM hanging": connections are accepted by the kernel, never answered
        hang.bind(("127.0.0.1", 0))
        hang.listen(4096)
        try:
            run(args, root, fakes, hang.getsockname()[1])
        finally:
            hang.close()
            fakes.close()


def run(args: argparse.Namespace, root: Path, fakes: Fakes, hang_port: int) -> None:
    base: dict[str, Any] = fakes.ask("config")
    ios, android = harness.ios_tokens(1000), harness.android_tokens(1000)
    registry = root / "devices.yaml"
    harness.write_registry(registry, ios, android)
    results: dict[str, Any] = {"parked": args.parked}

    # 1. The empty store's sustained drain rate.
    path = root / "baseline.db"
    fill(path, android, args.baseline, "android")
    mark = fakes.mark()
    relay = Relay(root, base, "baseline", None, registry=registry, store={"backend": "sqlite", "path": str(path)})
    try:
        relay.wait_ready()
        results["baseline_per_s"], _ = drain_rate(fakes, mark, args.baseline, args.drain_timeout)
        empty = ios_at_100(fakes, relay, ios, args.seconds)
    finally:
        relay.stop()
    print(f"baseline: {args.baseline:,} drained at {results['baseline_per_s']:,.0f}/s; iOS @ 100/s on the empty "
          f"store: ack p50/p99 {empty['ack_p50_ms']:.1f} / {empty['ack_p99_ms']:.1f} ms; webhook -> APNs p50/p99 "
          f"{empty['apns_p50_ms']:.1f} / {empty['apns_p99_ms']:.1f} ms", flush=True)
    results["empty"] = empty

    # 2. The parked backlog, FCM hanging.
    path = root / "parked.db"
    seconds = fill(path, android, args.parked, "android")
    print(f"parked {args.parked:,} Android deliveries in {seconds:.0f} s", flush=True)
    hanging = {"android": {**base["apps"]["android"], "endpoint": f"http://127.0.0.1:{hang_port}"}}
    relay = Relay(root, base, "parked", None, registry=registry, store={"backend": "sqlite", "path": str(path)},
                  apps={**base["apps"], **hanging})
    try:
        relay.wait_ready(timeout=600)
        time.sleep(2.0)  # the delivery process has claimed what the hung app's slots take
        # 3. iOS webhooks at 100/s beside the parked backlog.
        results.update(ios_at_100(fakes, relay, ios, args.seconds))
        print(f"iOS @ 100/s beside {args.parked:,} parked: ack p50/p99 {results['ack_p50_ms']:.1f} / "
              f"{results['ack_p99_ms']:.1f} ms; webhook -> APNs p50/p99 {results['apns_p50_ms']:.1f} / "
              f"{results['apns_p99_ms']:.1f} ms ({results['missing']} missing)", flush=True)
        # 4. FCM returns: the same config with the fake FCM again, reloaded.
        config = yaml.safe_load(relay.config.read_text())
        config["apps"]["android"]["endpoint"] = base["apps"]["android"]["endpoint"]
        relay.config.write_text(yaml.safe_dump(config, sort_keys=False))
        mark = fakes.mark()
        relay.proc.send_signal(signal.SIGHUP)
        rate, count = drain_rate(fakes, mark, args.parked, args.drain_timeout)
        results.update(drain_per_s=rate, drained=count)
    finally:
        relay.stop()
    results["drain_ratio"] = results["drain_per_s"] / results["baseline_per_s"] if results["baseline_per_s"] else 0
    print(f"drain after FCM returned: {results['drained']:,} of {args.parked:,} at {results['drain_per_s']:,.0f}/s "
          f"= {results['drain_ratio']:.2f} x the empty store's {results['baseline_per_s']:,.0f}/s", flush=True)
    ok = results["ack_p99_ms"] <= 25 and results["apns_p99_ms"] <= 100 and results["drain_ratio"] >= 0.8
    print(json.dumps({**results, "targets_met": ok}))


if __name__ == "__main__":
    main()
