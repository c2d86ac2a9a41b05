"""Micro-benchmark: the CPU cost of translating one small push (SPEC §5 budget included), in µs per push.

    python bench/translate_cost.py [--seconds 1.0]

Prints the fastest of several timed runs (the least disturbed by other work on a shared machine) for a small
alert (Parley's documented sample message) on APNs and on FCM, and for a typing event. Compare two trees by
running it with each on ``PYTHONPATH``, alternating, in the same session.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from relay.config import ApnsApp, FcmApp
from relay.delivery.translate import translate
from relay.inbound.parse import load_notification, parse_webhook
from relay.registry.device import Route
from relay.testing.sandbox import SAMPLE_EVENT, SAMPLE_MESSAGE


def _cost(notification: object, route: Route, seconds: float) -> float:
    runs = []
    for _ in range(5):
        n, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 5:
            for _ in range(200):
                translate(notification, route, "id-1", 1000.0, 1030.0)  # type: ignore[arg-type]
            n += 200
        runs.append((time.perf_counter() - started) / n * 1e6)
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args()
    apns = ApnsApp(name="ios", topic="com.example", key_file=Path("k.p8"), key_id="ABCDE12345", team_id="ABCDE12345")
    fcm = FcmApp(name="android", service_account_file=Path("sa.json"))
    message = load_notification(parse_webhook(json.dumps(SAMPLE_MESSAGE).encode()).data)
    event = load_notification(parse_webhook(json.dumps(SAMPLE_EVENT).encode()).data)
    for name, notification, route in (("message apns", message, Route(apns, "d" * 64)),
                                      ("message fcm", message, Route(fcm, "fcm-token")),
                                      ("event fcm", event, Route(fcm, "fcm-token"))):
        print(f"{name:14s} {_cost(notification, route, args.seconds):6.2f} µs/push")


if __name__ == "__main__":
    main()
