"""The benchmark suite: every figure of issue 7 in one run, as ratios against ceilings measured in that run.

    python bench/run.py                # the whole suite, about 2-3 minutes on 2 cores
    python bench/run.py --million      # also the 1M-device registry row (adds about a minute)
    python bench/run.py --only ingest,drain_apns --seconds 3

See bench/README.md for what each row measures and how.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import floors
import harness
from harness import Fakes, Relay, android_tokens, ios_tokens

DEVICES = 1000  # per platform in the throughput and latency rows
DRAIN = 20_000
REDIS_URL = "redis://127.0.0.1:6379/14"


@dataclass
class Row:
    """One line of the table."""

    figure: str
    value: str
    ceiling: str = ""
    ratio: str = ""
    target: str = ""
    ok: bool | None = None


class Suite:
    """Runs the rows; each one starts and stops what it needs."""

    def __init__(self, root: Path, seconds: float) -> None:
        self.root, self.seconds = root, seconds
        self.fakes = Fakes(root)
        self.base: dict[str, Any] = self.fakes.ask("config")
        self.ios, self.android = ios_tokens(DEVICES), android_tokens(DEVICES)
        self.devices = {t: {"app": "ios"} for t in self.ios} | {t: {"app": "android"} for t in self.android}
        self.rows: list[Row] = []
        self.figures: dict[str, float] = {}
        self.next_id = 1

    processes: str | None = None  # --processes: the suite's process model (None: the multi-process default)

    def relay(self, name: str, processes: str | None = None, **overrides: Any) -> Relay:
        """A relay in the suite's process model, or in ``processes`` (``"1"``: ``serve --processes 1``)."""
        processes = processes or self.processes
        store = overrides.pop("store", {"backend": "sqlite", "path": str(self.root / f"{name}.db")})
        return Relay(self.root, self.base, name, overrides.pop("devices", self.devices), store=store,
                     processes=processes, **overrides).wait_ready()

    def load(self, url: str, tokens: list[str], **spec: Any) -> dict[str, Any]:
        spec.setdefault("duration", self.seconds)
        result = harness.load(url, tokens, first_id=self.next_id, **spec)
        self.next_id = int(result["last_id"]) + 1
        return result

    # -- rows ------------------------------------------------------------------------------------

    def ceiling_http(self) -> None:
        with harness.bare_server() as (url, _):
            result = self.load(url, self.ios + self.android, mode="closed", connections=64)
        self.figures["ceiling_http"] = result["rps"]
        self.rows.append(Row("ceiling_http (bare aiohttp, 64 clients)", f"{result['rps']:,.0f} req/s"))

    def ingest(self) -> None:
        relay = self.relay("ingest")
        try:
            result = self.load(relay.url, self.ios + self.android, mode="closed", connections=64)
            alone = self._without_delivery(relay)
        finally:
            relay.stop()
        self._bad_answers("ingest", result)
        rps = self.figures["ingest"] = result["rps"]
        self._ratio("ingest, SQLite (durable, dispatcher on)", f"{rps:,.0f} webhooks/s", "ceiling_http", rps,
                    ">= 0.5")
        self._bad_answers("ingest, delivery stopped", alone)
        self.figures["ingest_alone"] = alone["rps"]
        self._ratio("same, delivery process stopped (the webhook process alone)", f"{alone['rps']:,.0f} webhooks/s",
                    "ceiling_http", alone["rps"], "")

    def _without_delivery(self, relay: Relay) -> dict[str, Any]:
        """The same closed loop with the delivery processes stopped (``SIGSTOP``): what acknowledging alone
        reaches when it has the cores to itself; they resume before the relay stops."""
        stopped = [pid for name, pid in relay.pids().items() if name.startswith("delivery")]
        for pid in stopped:
            _stop_outside_write_lock(pid)
        try:
            return self.load(relay.url, self.ios + self.android, mode="closed", connections=64)
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)

    def ack_latency(self) -> None:
        rate = max(50.0, self.figures.get("ingest", 1000.0) / 2)
        relay = self.relay("ack")
        try:
            result = self.load(relay.url, self.ios + self.android, mode="open", rate=rate, connections=64)
        finally:
            relay.stop()
        self._bad_answers("ack latency", result)
        p99 = result["p99"] * 1000
        self.rows.append(Row(f"ack latency @ {rate:,.0f}/s open loop, dispatcher delivering (p50 / p99 / max)",
                             f"{result['p50'] * 1000:.1f} / {p99:.1f} / {result['max'] * 1000:.1f} ms",
                             target="p99 <= 10 ms", ok=p99 <= 10))

    def ack_platform(self, platform_: str, rate: float = 500.0) -> None:
        """Ack latency while every acknowledged webhook is also being pushed to one provider."""
        tokens = self.ios if platform_ == "apns" else self.android
        relay = self.relay(f"ack-{platform_}")
        try:
            result = self.load(relay.url, tokens, mode="open", rate=rate, connections=64)
        finally:
            relay.stop()
        self._bad_answers(f"ack {platform_}", result)
        p99 = result["p99"] * 1000
        self.rows.append(Row(f"ack latency @ {rate:,.0f}/s open loop, {platform_} pushes (p50 / p99 / max)",
                             f"{result['p50'] * 1000:.1f} / {p99:.1f} / {result['max'] * 1000:.1f} ms",
                             target="p99 <= 25 ms", ok=p99 <= 25))

    def leaving(self, rate: float = 1500.0) -> None:
        """Pushes that reach APNs while an open-loop load runs, against the webhooks acknowledged meanwhile."""
        relay = self.relay("leaving")
        mark = self.fakes.mark()
        try:
            result = self.load(relay.url, self.ios, mode="open", rate=rate, connections=64, warmup=0,
                               duration=max(5.0, self.seconds))
            left = self.fakes.since(mark)["apns"]["count"]  # at the end of the load, before any catch-up
        finally:
            relay.stop()
        acked = max(1, int(result["ok"]))
        ratio = left / acked
        self.rows.append(Row(f"pushes leaving during {rate:,.0f}/s open-loop APNs load",
                             f"{left:,} of {acked:,} acked", "acked", f"{ratio:.2f}", ">= 0.9", ratio >= 0.9))

    def delivery_ceiling(self) -> None:
        """Issue 18 item 4: APNs pushes leaving while a closed loop of 64 clients is acknowledged as fast as the
        relay can, then an open loop at 1.2 x the rate that left; each against the webhooks acknowledged
        meanwhile (pushes counted at the fake when the load ends, before any catch-up)."""
        relay = self.relay("ceiling-leaving")
        try:
            mark = self.fakes.mark()
            result = self.load(relay.url, self.ios, mode="closed", connections=64, warmup=0)
            left, acked = self.fakes.since(mark)["apns"]["count"], max(1, int(result["ok"]))
            ended = time.monotonic()
            self.fakes.wait_count(mark, "apns", acked, timeout=60)
            catch_up = time.monotonic() - ended
            ratio, sustained = left / acked, result["rps"] * left / acked
            self.figures["leaving_closed"], self.figures["sustained_apns"] = ratio, sustained
            self.rows.append(Row("APNs pushes leaving during a closed loop of 64",
                                 f"{left:,} of {acked:,} acked ({sustained:,.0f}/s left, catch-up {catch_up:.1f} s)",
                                 "acked", f"{ratio:.2f}", ">= 0.95", ratio >= 0.95))
            rate = 1.2 * sustained
            mark = self.fakes.mark()
            result = self.load(relay.url, self.ios, mode="open", rate=rate, connections=64, warmup=0)
            left, acked = self.fakes.since(mark)["apns"]["count"], max(1, int(result["ok"]))
        finally:
            relay.stop()
        ratio = self.figures["leaving_1.2x"] = left / acked
        self.rows.append(Row(f"APNs pushes leaving during an open loop at 1.2 x that ({rate:,.0f}/s)",
                             f"{left:,} of {acked:,} acked", "acked", f"{ratio:.2f}", ">= 0.9", ratio >= 0.9))

    def sustained(self) -> None:
        """Delivered pushes/s under a closed-loop webhook load: the default process model vs one process."""
        rates: dict[str, float] = {}
        for processes, label in (("auto", "multi-process default"), ("1", "--processes 1")):
            relay = self.relay(f"sustained-{processes or 'auto'}", processes=processes)
            mark = self.fakes.mark()
            try:
                self.load(relay.url, self.ios + self.android, mode="closed", connections=64)
                got = self.fakes.since(mark)  # what left while the load ran
            finally:
                relay.stop()
            rates[label] = sum(_rate(got[p]) for p in ("apns", "fcm"))
            self.rows.append(Row(f"sustained delivered/s under closed-loop load, {label}",
                                 f"{rates[label]:,.0f} pushes/s"))
        base = rates["--processes 1"]
        ratio = rates["multi-process default"] / base if base else 0.0
        self.rows.append(Row("sustained delivered/s: multi-process default / --processes 1", f"{ratio:.2f}",
                             target=">= 1.4", ok=ratio >= 1.4))

    def cpu_per_notification(self) -> None:
        """CPU (whole process tree) per notification at everyday rates (200/s, 500/s open loop) and saturated
        (closed loop, 64 clients), on one relay in the same run: issue 18's target is 500/s <= 1.5 x saturated.

        Each figure counts the relay's CPU from the load's start until every acknowledged notification reached
        the fakes (so the delivery work of the last ones is in), divided by the notifications acknowledged.
        """
        relay = self.relay("cpu")
        figures: dict[str, float] = {}
        try:
            for label, spec in (("200/s", {"mode": "open", "rate": 200.0}), ("500/s", {"mode": "open", "rate": 500.0}),
                                ("saturated", {"mode": "closed"})):
                mark = self.fakes.mark()
                before = relay.cpu()[0]
                result = self.load(relay.url, self.ios, connections=64, warmup=0, **spec)
                acked = int(result["ok"])
                self.fakes.wait_count(mark, "apns", acked, timeout=60)
                used = relay.cpu()[0] - before
                figures[label] = used * 1000 / max(1, acked)
                self.figures[f"cpu_ms_{label}"] = figures[label]
                self.rows.append(Row(f"CPU per notification @ {label} (whole process tree, APNs)",
                                     f"{figures[label]:.2f} ms ({acked:,} notifications, {used:.1f} s CPU)"))
        finally:
            relay.stop()
        ratio = figures["500/s"] / figures["saturated"] if figures.get("saturated") else 0.0
        # One wake-up's floor for that ratio on this machine: the same Python work per message, at 500/s and back
        # to back, nothing stored or batched (bench/wakeup_floor.py).
        work_us = figures.get("saturated", 0.3) * 1000 / 2  # per process: the tree's work is in two of them
        floor = harness.run_json("wakeup_floor.py", {"work_us": round(work_us), "rates": [500]})
        self.rows.append(Row(f"same Python work ({work_us:.0f} µs hot), one wake-up each, 500/s ÷ back to back",
                             f"{floor['rates']['500']:.0f} / {floor['saturated']:.0f} µs CPU per message",
                             ratio=f"{floor['ratio_500']:.2f}"))
        self.figures["cpu_floor_ratio_500"] = floor["ratio_500"]
        self._part_floors()
        budget = 1.5 * figures.get("saturated", 0.0) * 1000
        parts = self.figures["cpu_parts_500_us"]
        self.rows.append(Row("CPU per notification: 500/s ÷ saturated",
                             f"{ratio:.2f} (1.5 x saturated: {budget:.0f} µs; the three parts alone: {parts:.0f})",
                             target="<= 1.5", ok=ratio <= 1.5))

    def _part_floors(self) -> None:
        """The same ratio for what every notification passes through, each alone (bench/floors.py): the
        aiohttp handler, the aioapns client, and one durable SQLite row."""
        parts = {"bare aiohttp handler, CPU per request": floors.http(self.ios, self.seconds),
                 "bare aioapns client, CPU per push": floors.apns(self._apns_spec(), self.seconds),
                 "one SQLite row, fsync'd alone / 64 to a commit, CPU per row": floors.durable(self.seconds, self.root)}
        for label, got in parts.items():
            self.rows.append(Row(f"{label}: 500/s ÷ saturated", f"{got[500.0]:.0f} / {got[0.0]:.0f} µs",
                                 ratio=f"{got[500.0] / got[0.0]:.2f}"))
        everyday, saturated = (sum(got[rate] for got in parts.values()) for rate in (500.0, 0.0))
        self.figures["cpu_parts_floor_500"] = everyday / saturated
        self.figures["cpu_parts_500_us"] = everyday
        self.rows.append(Row("the three together, nothing else: 500/s ÷ saturated",
                             f"{everyday:.0f} / {saturated:.0f} µs", ratio=f"{everyday / saturated:.2f}"))

    def ingest_redis(self) -> None:
        if not _redis_available():
            self.rows.append(Row("ingest, Redis store", "n/a (redis backend not available)"))
            return
        prefix = f"bench-{uuid.uuid4().hex[:8]}"
        relay = self.relay("ingest-redis", store={"backend": "redis", "url": REDIS_URL, "prefix": prefix})
        try:
            result = self.load(relay.url, self.ios + self.android, mode="closed", connections=64)
        finally:
            relay.stop()
            _redis_delete(prefix)
        self._bad_answers("ingest redis", result)
        self._ratio("ingest, Redis store (dispatcher on)", f"{result['rps']:,.0f} webhooks/s", "ceiling_http",
                    result["rps"], "")

    def ceiling_apns(self) -> None:
        self._ceiling("apns", {**self._apns_spec(), "count": DRAIN}, "ceiling_apns (bare aioapns, 100 in flight)")

    def _apns_spec(self) -> dict[str, Any]:
        """``bench/ceilings.py``'s APNs spec against the fake, less ``count``."""
        info = self.fakes.info
        host, port = info["apns"].removeprefix("https://").rsplit(":", 1)
        return {"platform": "apns", "tokens": self.ios, "host": host, "port": int(port),
                "ca_file": info["ca_file"], "key_file": str(self.root / "AuthKey.p8"), "key_id": info["key_id"],
                "team_id": info["team_id"], "topic": self.base["apps"]["ios"]["topic"], "concurrency": 100}

    def ceiling_fcm(self) -> None:
        spec = {"platform": "fcm_aiohttp", "count": DRAIN, "tokens": self.android, "url": self.fakes.info["fcm"],
                "service_account_file": str(self.root / "firebase.json"), "connections": 16, "concurrency": 64}
        self._ceiling("fcm", spec, "ceiling_fcm (firebase-admin encoder + bare aiohttp, 64 in flight)")

    def ceiling_fcm_admin(self) -> None:
        """Informational: firebase-admin's own send path (what the relay used before issue 14), 4,000 pushes."""
        spec = {"platform": "fcm", "count": 4000, "tokens": self.android, "url": self.fakes.info["fcm"],
                "service_account_file": str(self.root / "firebase.json"), "batch": 500, "parallel": 1}
        self._ceiling("fcm", spec, "firebase-admin send_each_async x500, 4,000 pushes (for comparison)",
                      figure="ceiling_fcm_admin")

    def _ceiling(self, platform_: str, spec: dict[str, Any], label: str, figure: str = "") -> None:
        mark = self.fakes.mark()
        result = harness.run_json("ceilings.py", spec)
        got = self.fakes.since(mark)[platform_]
        rate = _rate(got)
        figure = figure or f"ceiling_{platform_}"
        self.figures[figure] = rate
        cpu_ms = self.figures[f"{figure}_cpu_ms"] = result["cpu"] * 1000 / max(1, result["sent"])
        failed = f" ({result['failed']} failed)" if result["failed"] else ""
        self.rows.append(Row(label, f"{rate:,.0f} pushes/s, {cpu_ms:.2f} ms CPU/push{failed}"))

    def drain(self, platform_: str) -> None:
        tokens = self.ios if platform_ == "apns" else self.android
        db = self.root / f"drain-{platform_}.db"
        harness.prefill(db, tokens, DRAIN)
        mark = self.fakes.mark()
        relay = self.relay(f"drain-{platform_}", store={"backend": "sqlite", "path": str(db)})
        try:
            # CPU per push: the relay's CPU time from ready to drained, over the pushes delivered meanwhile
            # (start-up imports and the pushes sent before /readyz answered are left out).
            before, at_ready = relay.cpu(), self.fakes.since(mark)[platform_]["count"]
            got = self.fakes.wait_count(mark, platform_, DRAIN, timeout=120)
            after = relay.cpu()
        finally:
            relay.stop()
        rate = self.figures[f"drain_{platform_}"] = _rate(got)
        pushes = max(1, got["count"] - at_ready)
        cpu_ms = self.figures[f"drain_{platform_}_cpu_ms"] = (after[0] - before[0]) * 1000 / pushes
        main_ms = self.figures[f"drain_{platform_}_main_cpu_ms"] = (after[1] - before[1]) * 1000 / pushes
        lost = f" ({DRAIN - got['count']} missing)" if got["count"] < DRAIN else ""
        self._ratio(f"drain_{platform_} (20,000 stored deliveries)",
                    f"{rate:,.0f} pushes/s, {cpu_ms:.2f} ms CPU/push ({main_ms:.2f} loop thread){lost}",
                    f"ceiling_{platform_}", rate, ">= 0.7")

    def fcm_vs_apns(self) -> None:
        """Issue 14's target: the relay drains FCM at least 0.8 times as fast as APNs (same run)."""
        fcm, apns = self.figures.get("drain_fcm"), self.figures.get("drain_apns")
        if not fcm or not apns:
            self.rows.append(Row("drain FCM ÷ drain APNs", "n/a (needs drain_apns and drain_fcm)"))
            return
        cpu = (f", CPU/push FCM ÷ APNs {self.figures['drain_fcm_cpu_ms'] / self.figures['drain_apns_cpu_ms']:.2f}"
               if self.figures.get("drain_apns_cpu_ms") else "")
        self.rows.append(Row("drain FCM ÷ drain APNs (sustained delivered/s)", f"{fcm:,.0f} / {apns:,.0f}{cpu}",
                             "drain_apns", f"{fcm / apns:.2f}", ">= 0.8", fcm / apns >= 0.8))

    def end_to_end(self) -> None:
        relay = self.relay("e2e")
        mark = self.fakes.mark()
        try:
            result = self.load(relay.url, self.ios + self.android, mode="open", rate=200, connections=16,
                               record_sends=True, duration=max(5.0, self.seconds))
            latencies = sorted(self.fakes.latencies(mark, result["sends"], ["apns", "fcm"], timeout=30))
        finally:
            relay.stop()
        p50, p99 = _pct(latencies, 50) * 1000, _pct(latencies, 99) * 1000
        missing = len(result["sends"]) - len(latencies)
        self.rows.append(Row("end-to-end @ 200/s: webhook -> fake provider (p50 / p99)",
                             f"{p50:.1f} / {p99:.1f} ms" + (f" ({missing} missing)" if missing else ""),
                             target="p50 <= 5, p99 <= 25 ms", ok=p50 <= 5 and p99 <= 25 and not missing))

    def registry(self, sizes: list[int]) -> None:
        rss: dict[int, float] = {}
        for size in sizes:
            ios = ios_tokens(size // 2, salt="r")
            android = android_tokens(size - size // 2, salt="r")
            path = self.root / f"devices-{size}.yaml"
            harness.write_registry(path, ios, android)
            relay = Relay(self.root, self.base, f"registry-{size}", None, registry=path,
                          store={"backend": "sqlite", "path": str(self.root / f"registry-{size}.db")})
            try:
                relay.wait_ready(timeout=300)
                rss[size] = relay.rss_mb()
                serves = self._serves(relay, ios[-1], android[-1])
            finally:
                relay.stop()
            path.unlink()
            label = f"registry {_count(size)} devices: time to ready, RSS"
            value = f"{relay.ready_after:.2f} s, {rss[size]:.0f} MB" + ("" if serves else " (did NOT serve)")
            if size == 100_000:
                ok = relay.ready_after <= 2 and rss[size] <= 150 and serves
                self.rows.append(Row(label, value, target="<= 2 s, <= 150 MB", ok=ok))
            else:
                self.rows.append(Row(label, value, target="loads and serves" if size >= 1_000_000 else "",
                                     ok=serves if size >= 1_000_000 else None))
        small, large = min(rss), max(rss)
        if large > small:
            growth = (rss[large] - rss[small]) * 1024 * 1024 / (large - small)
            self.rows.append(Row(f"registry growth per device ({_count(small)} -> {_count(large)})",
                                 f"{growth:,.0f} bytes"))

    def _serves(self, relay: Relay, ios: str, android: str) -> bool:
        mark = self.fakes.mark()
        result = self.load(relay.url, [ios, android], mode="open", rate=20, duration=0.1, warmup=0,
                           connections=2)
        if result["ok"] < 2:
            return False
        got = self.fakes.wait_count(mark, "apns", 1, 10)
        return got["count"] >= 1 and self.fakes.wait_count(mark, "fcm", 1, 10)["count"] >= 1

    # -- helpers ---------------------------------------------------------------------------------

    def _ratio(self, label: str, value: str, ceiling: str, rate: float, target: str) -> None:
        base = self.figures.get(ceiling)
        if not base:
            self.rows.append(Row(label, value, target=target))
            return
        ratio = rate / base
        ok = ratio >= float(target.split()[-1]) if target else None
        self.rows.append(Row(label, value, ceiling, f"{ratio:.2f}", target, ok))

    def _bad_answers(self, what: str, result: dict[str, Any]) -> None:
        bad = {k: v for k, v in result["statuses"].items() if k != "200"}
        if bad:
            print(f"  note: {what}: answers other than 200: {bad}", file=sys.stderr)

    def close(self) -> None:
        self.fakes.close()


def _stop_outside_write_lock(pid: int) -> None:
    """``SIGSTOP`` ``pid`` at a moment it does not hold the store's write lock (its ``flock``, in
    ``/proc/locks``): stopped inside a transaction, it would stop every other writer with it."""
    while True:
        os.kill(pid, signal.SIGSTOP)
        while Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            time.sleep(0.0005)  # the signal is taken asynchronously
        held = any(line.split()[1:2] == ["FLOCK"] and line.split()[4] == str(pid)
                   for line in Path("/proc/locks").read_text().splitlines())
        if not held:
            return
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.001)


def _rate(got: dict[str, Any]) -> float:
    span = got["last"] - got["first"]
    return (got["count"] - 1) / span if got["count"] > 1 and span > 0 else 0.0


def _pct(ordered: list[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] if ordered else float("nan")


def _count(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 else f"{n // 1000}k"


def _redis_available() -> bool:
    try:
        import redis

        import relay.store.redis  # noqa: F401 - the backend must exist and import
    except ImportError:
        return False
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
        client.ping()
        client.close()
    except redis.RedisError:
        return False
    return True


def _redis_delete(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*", count=1000))
    for start in range(0, len(keys), 500):
        client.delete(*keys[start:start + 500])
    client.close()


def render(rows: list[Row], elapsed: float) -> str:
    """The table, as Markdown (it reads fine in a terminal too)."""
    header = ("figure", "value", "vs", "ratio", "target", "")
    lines = [header] + [(r.figure, r.value, r.ceiling, r.ratio, r.target,
                         "" if r.ok is None else ("ok" if r.ok else "MISSED")) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    note = (f"{os.cpu_count()} cores, Python {platform.python_version()}, {platform.machine()}; "
            f"suite ran {elapsed:.0f} s")
    return "\n".join(out) + "\n" + note


ROWS: dict[str, Callable[[Suite, argparse.Namespace], None]] = {
    "ceiling_http": lambda s, a: s.ceiling_http(),
    "ingest": lambda s, a: s.ingest(),
    "ack": lambda s, a: s.ack_latency(),
    "ack_apns": lambda s, a: s.ack_platform("apns"),
    "ack_fcm": lambda s, a: s.ack_platform("fcm"),
    "leaving": lambda s, a: s.leaving(),
    "sustained": lambda s, a: s.sustained(),
    "ceiling_leaving": lambda s, a: s.delivery_ceiling(),
    "ingest_redis": lambda s, a: s.ingest_redis(),
    "ceiling_apns": lambda s, a: s.ceiling_apns(),
    "drain_apns": lambda s, a: s.drain("apns"),
    "ceiling_fcm": lambda s, a: s.ceiling_fcm(),
    "drain_fcm": lambda s, a: s.drain("fcm"),
    "fcm_vs_apns": lambda s, a: s.fcm_vs_apns(),
    "ceiling_fcm_admin": lambda s, a: s.ceiling_fcm_admin(),
    "e2e": lambda s, a: s.end_to_end(),
    "cpu": lambda s, a: s.cpu_per_notification(),
    "registry": lambda s, a: s.registry([10_000, 100_000] + ([1_000_000] if a.million else [])),
}


def main() -> int:
    parser = argparse.ArgumentParser(description="parley-relay benchmark suite (issue 7)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per load row (after 1 s warm-up)")
    parser.add_argument("--million", action="store_true", help="also load a 1M-device registry")
    parser.add_argument("--processes", choices=("1", "auto"), default=None,
                        help="process model of every relay row (default: the relay's, i.e. auto)")
    parser.add_argument("--only", default="", help=f"comma-separated rows: {','.join(ROWS)}")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args()
    if shutil.which("parley-relay", path=str(Path(sys.executable).parent)) is None:
        print("parley-relay is not installed next to this python (pip install -e .)", file=sys.stderr)
        return 2
    chosen = [name for name in ROWS if not args.only or name in args.only.split(",")]
    started = time.monotonic()
    with harness.scratch() as tmp:
        suite = Suite(Path(tmp), args.seconds)
        suite.processes = args.processes
        shown = 0
        try:
            for name in chosen:
                print(f"- {name} ...", file=sys.stderr, flush=True)
                try:
                    ROWS[name](suite, args)
                    for row in suite.rows[shown:]:
                        print(f"  {row.figure}: {row.value}" + (f" (ratio {row.ratio})" if row.ratio else ""),
                              file=sys.stderr, flush=True)
                    shown = len(suite.rows)
                except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
                    print(f"  {name} failed: {exc}", file=sys.stderr)
                    suite.rows.append(Row(name, f"error: {str(exc).splitlines()[0][:80]}", ok=False))
        finally:
            suite.close()
    table = render(suite.rows, time.monotonic() - started)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"figures": suite.figures, "table": table}, indent=2))
    return 0 if all(r.ok is not False for r in suite.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
