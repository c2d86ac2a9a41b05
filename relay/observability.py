"""Metrics (Prometheus) and logs (one event per line, logfmt or JSON) for the whole relay.

All metrics live here, in one :class:`Metrics` object per process (tests make their own registry). Log
lines carry fields, never message bodies, secrets or whole push tokens (:func:`short_token`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from relay import __version__

LOGGER_NAME = "parley_relay"
log = logging.getLogger(LOGGER_NAME)

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # read by prometheus_client when it is imported
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class RelayRegistry(CollectorRegistry):
    """A registry whose scrape leaves out the ``*_created`` series of counters and histograms.

    Each labelled child would add a creation timestamp that nobody graphs, nearly doubling the scrape.
    prometheus_client can only switch them off process-wide (``disable_created_metrics``), which would
    change every other registry in the process; filtering here keeps the choice to the relay's own.
    """

    def collect(self) -> Iterable[Metric]:
        for metric in super().collect():
            if metric.type in ("counter", "histogram", "summary"):
                created = metric.name + "_created"
                metric.samples = [sample for sample in metric.samples if sample.name != created]
            yield metric


class Metrics:
    """Every metric the relay exports (SPEC §8), registered on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or RelayRegistry()
        r = self.registry
        self.webhooks = Counter("parley_relay_webhooks", "Webhook requests by result", ["result"], registry=r)
        self.accepted = Counter("parley_relay_deliveries_accepted", "Deliveries stored (one per token)",
                                ["kind"], registry=r)
        self.ended = Counter("parley_relay_deliveries_ended", "Deliveries that reached an end state",
                             ["platform", "app", "kind", "state"], registry=r)
        self.sends = Counter("parley_relay_provider_sends", "Provider requests by outcome",
                             ["platform", "app", "kind", "outcome"], registry=r)
        self.retries = Counter("parley_relay_retries", "Deliveries scheduled for another attempt",
                               ["platform", "app", "reason"], registry=r)
        self.dead_tokens = Counter("parley_relay_dead_tokens", "Push tokens newly marked dead", ["platform", "app"],
                                   registry=r)
        # Gauges say how processes combine under a multi-process relay (ignored in one process): the queue
        # depth is read from the store by whichever process answers /metrics, sends add up, an alarm in any
        # delivery process counts, and so do the commits of every process.
        self.queue_depth = Gauge("parley_relay_queue_depth", "Deliveries pending or in flight", registry=r,
                                 multiprocess_mode="livemostrecent")
        self.inflight = Gauge("parley_relay_sends_in_flight", "Provider requests in flight", registry=r,
                              multiprocess_mode="livesum")
        self.alarms = Gauge("parley_relay_app_alarm", "1 while an app has a configuration alarm", ["app"],
                            registry=r, multiprocess_mode="livemax")
        self.ack_latency = Histogram("parley_relay_ack_seconds", "Webhook arrival to answer", registry=r,
                                     buckets=_LATENCY_BUCKETS)
        self.delivery_latency = Histogram("parley_relay_delivery_seconds", "Webhook arrival to provider accept",
                                          ["platform"], registry=r, buckets=_LATENCY_BUCKETS)
        self.provider_latency = Histogram("parley_relay_provider_request_seconds", "One provider request",
                                          ["platform"], registry=r, buckets=_LATENCY_BUCKETS)
        self.store_commits = Gauge("parley_relay_store_commits", "Store transactions committed", registry=r,
                                   multiprocess_mode="livesum")
        self.reloads = Counter("parley_relay_reloads", "Configuration reloads by result", ["result"], registry=r)
        self.api_requests = Counter("parley_relay_api_requests", "Device API requests by operation and status",
                                    ["operation", "status"], registry=r)
        self.circuit_open = Gauge("parley_relay_app_circuit_open",
                                  "1 while an app's circuit is open (deliveries parked, probing)", ["app"], registry=r)
        self.probes = Counter("parley_relay_circuit_probes", "Probes of an open circuit by result", ["app", "result"],
                              registry=r)
        self.delivery_errors = Counter("parley_relay_delivery_errors",
                                       "Unexpected exceptions while delivering (each retried with backoff)",
                                       ["app", "error"], registry=r)
        self.slots_in_use = Gauge("parley_relay_delivery_slots_in_use",
                                  "Deliveries in flight per app (admission pool; 'unrouted' for no app yet)", ["app"],
                                  registry=r)
        self.oldest_waiting = Gauge("parley_relay_app_oldest_waiting_seconds",
                                    "Age of the app's oldest delivery still waiting to leave (0: none), read from "
                                    "the store at each scrape", ["app"], registry=r, multiprocess_mode="livemostrecent")
        # Constant 1; the label says which release runs (alerts and dashboards join on it across an upgrade).
        self.build_info = Gauge("parley_relay_build_info", "The running release: always 1, version in the label",
                                ["version"], registry=r, multiprocess_mode="livemax")
        self.build_info.labels(__version__).set(1)
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def exposition(self) -> bytes:
        """The Prometheus text of this process, or of every process of the relay when it runs several.

        prometheus_client's multiprocess mode: each process writes its values to files in
        ``$PROMETHEUS_MULTIPROC_DIR`` (set by the supervisor before any child starts), and whichever
        process answers ``/metrics`` reads and merges them all.
        """
        path = os.environ.get(MULTIPROC_ENV)
        if not path:
            return bytes(generate_latest(self.registry))
        merged = CollectorRegistry()
        collected = MultiProcessCollector(merged, path=path)  # type: ignore[no-untyped-call]
        # Families no process has a sample of yet (a labelled counter nobody incremented) are missing from the
        # files; this process's empty family keeps them listed, as in one process.
        seen = {family.name for family in collected.collect()}  # type: ignore[no-untyped-call]
        merged.register(_Missing([f for f in self.registry.collect() if f.name not in seen]))
        return bytes(generate_latest(merged))

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: the delivery path asks for the same few children per push."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found


class _Missing(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def short_token(token: str) -> str:
    """A push token safe for logs: ``0801fc…5945``."""
    return token if len(token) <= 12 else f"{token[:6]}…{token[-4:]}"


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\\\n\t'):
        return json.dumps(text, ensure_ascii=False)
    return text


# sd-daemon(3): a "<N>" line prefix gives journald the syslog priority (journalctl -p works).
_SYSLOG_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def journald_reads(fd: int = 2, environ: MutableMapping[str, str] | None = None) -> bool:
    """True when ``fd`` is the journald stream systemd connected (``$JOURNAL_STREAM`` = ``DEV:INODE``).

    Comparing device and inode (systemd.exec(5)) keeps timestamps when the variable was merely inherited
    by a process whose stderr goes somewhere else.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


class _Formatter(logging.Formatter):
    def __init__(self, fmt: str, timestamps: bool, priority_prefix: bool = False) -> None:
        super().__init__()
        self.fmt, self.timestamps, self.priority_prefix = fmt, timestamps, priority_prefix

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {}
        if self.timestamps:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            fields["ts"] = f"{stamp}.{int(record.msecs):03d}Z"
        fields["level"] = record.levelname.lower()
        fields["event"] = record.getMessage()
        if record.name != LOGGER_NAME:
            fields["logger"] = record.name  # a library's record (aiohttp, asyncio), same one-line shape
        extra = getattr(record, "fields", None)
        if isinstance(extra, Mapping):
            fields.update(extra)
        if record.exc_info and record.exc_info[1] is not None:
            fields["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        if self.fmt == "json":
            line = json.dumps(fields, ensure_ascii=False, default=str)
        else:
            line = " ".join(f"{k}={_logfmt_value(v)}" for k, v in fields.items())
        if self.priority_prefix:
            return f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>{line}"
        return line


def setup_logging(fmt: str = "logfmt", level: str = "INFO") -> None:
    """Logs to stderr, one event per line.

    When ``$JOURNAL_STREAM`` names our stderr, journald is the reader: it adds its own timestamps, so the
    lines carry none, and a ``<N>`` prefix gives it each line's priority. Libraries' warnings (aiohttp,
    asyncio) go through the same formatter, so that a traceback never spreads over several lines.
    """
    try:
        journald = journald_reads(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # stderr replaced by something without a descriptor
        journald = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(fmt, timestamps=not journald, priority_prefix=journald))
    ours = logging.getLogger(LOGGER_NAME)
    ours.handlers[:] = [handler]
    ours.setLevel(level)
    ours.propagate = False
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a host's (or pytest's) handlers are left alone
        root.addHandler(handler)


def event(level: int, name: str, **fields: Any) -> None:
    """Log one event with fields (``log`` helper used across the relay)."""
    log.log(level, name, extra={"fields": fields})
