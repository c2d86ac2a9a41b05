"""Metrics (Prometheus) and logs (one event per line, logfmt or JSON, rendered by structlog) for the whole relay.

All metrics live here, in one :class:`Metrics` object per process (tests make their own registry). Log
lines carry fields, never message bodies, secrets or whole push tokens (:func:`short_token`).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from structlog.typing import EventDict, Processor

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
        self.alarm_reason = Gauge("parley_relay_app_alarm_reason",
                                  "1 while an app's configuration alarm has this reason (the provider's code)",
                                  ["app", "reason"], registry=r, multiprocess_mode="livemax")
        self.mismatches = Counter("parley_relay_token_mismatches",
                                  "Topic/sender mismatch answers (APNs DeviceTokenNotForTopic, FCM SENDER_ID_MISMATCH)"
                                  " by what they were judged: held, token_dead, app_alarm",
                                  ["platform", "app", "judged"], registry=r)
        self.refits = Counter("parley_relay_payload_refits",
                              "Pushes the provider counted too big, fitted again to a smaller budget and resent",
                              ["platform", "app"], registry=r)
        self.ack_latency = Histogram("parley_relay_ack_seconds", "Webhook arrival to answer", registry=r,
                                     buckets=_LATENCY_BUCKETS)
        self.delivery_latency = Histogram("parley_relay_delivery_seconds", "Webhook arrival to provider accept",
                                          ["platform"], registry=r, buckets=_LATENCY_BUCKETS)
        self.provider_latency = Histogram("parley_relay_provider_request_seconds", "One provider request",
                                          ["platform"], registry=r, buckets=_LATENCY_BUCKETS)
        self.role_down = Gauge("parley_relay_role_down",
                               "Processes of a role the supervisor cannot keep running (restarted 3 times in a row)",
                               ["role"], registry=r, multiprocess_mode="livemax")
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
        self.claimed_ahead = Gauge("parley_relay_delivery_claimed_ahead",
                                   "Deliveries claimed and waiting for a free slot of their app (claimed ahead while "
                                   "the app has the delivery process to itself)", ["app"], registry=r)
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
    """A push token safe for logs: ``0801fc…b2c4``."""
    return token if len(token) <= 12 else f"{token[:6]}…{token[-4:]}"


# Characters that could end a line, rewrite the terminal or reorder what a reader sees: C0/C1 controls (newline,
# carriage return, ESC...), DEL, lone surrogates, the Unicode line/paragraph separators and the bidi overrides,
# and Unicode spaces (a reader splitting logfmt on whitespace would see a new key where the renderer quoted none).
# Anyone who can reach the webhook controls some logged text (an unknown ``data.type``, X-Request-Id), so every
# value is cleaned before rendering: a log line can never be forged or split.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\xa0\u1680\u2000-\u200a\u2028-\u202f\u205f\u2066-\u2069\u3000"
                     "\ud800-\udfff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def clean(value: Any) -> Any:
    """``value`` with every unsafe character of its text escaped (``\\x1b``); numbers and booleans as they are."""
    if isinstance(value, bool | int | float) or value is None:
        return value
    text = value if isinstance(value, str) else str(value)
    return _UNSAFE.sub(_escape, text) if _UNSAFE.search(text) else text


# sd-daemon(3): a "<N>" line prefix gives journald the syslog priority (journalctl -p works).
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}
_RESERVED = ("ts", "level", "event", "logger")  # the line's own keys: a field of the same name is renamed
_process_name: str | None = None


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


def name_process(name: str | None) -> None:
    """Every later log line of this process says which process wrote it (``process=delivery.0``).

    A process-wide value, not a context variable: lines written from executor threads (the store's) must
    carry it too, and ``run_in_executor`` does not copy the caller's context.
    """
    global _process_name
    _process_name = name


def bound_request(request_id: str) -> AbstractContextManager[None]:
    """While open, every line logged in this context (one aiohttp request) carries ``request_id``."""
    return structlog.contextvars.bound_contextvars(request_id=request_id)


def _from_record(_: Any, __: str, event_dict: EventDict) -> EventDict:
    """A stdlib record (the relay's :func:`event`, aiohttp's, aioapns') as this relay's fields."""
    record: logging.LogRecord = event_dict["_record"]
    fields = getattr(record, "fields", None)
    if record.name != LOGGER_NAME:
        event_dict["logger"] = record.name  # a library's record, same one-line shape
    if isinstance(fields, Mapping):
        for key, value in fields.items():
            event_dict[f"{key}_" if key in _RESERVED else key] = value
    if _process_name is not None:
        event_dict.setdefault("process", _process_name)
    if record.exc_info and record.exc_info[1] is not None:  # one line: the exception's type and words
        event_dict["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    return event_dict


def _stamped(_: Any, __: str, event_dict: EventDict) -> EventDict:
    created = event_dict["_record"].created
    event_dict["ts"] = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(created))}.{int(created % 1 * 1000):03d}Z"
    return event_dict


def _cleaned(_: Any, __: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("exc_info", None)
    head = {key: clean(event_dict.pop(key)) for key in _RESERVED if key in event_dict}  # today's key order
    return head | {key: clean(value) for key, value in event_dict.items()}


class _Prefixed:
    """A renderer that puts journald's ``<N>`` priority in front of each line."""

    def __init__(self, render: Callable[[Any, str, EventDict], str | bytes]) -> None:
        self.render = render

    def __call__(self, logger: Any, name: str, event_dict: EventDict) -> str:
        priority = _SYSLOG_PRIORITY.get(str(event_dict.get("level")), 6)
        line = self.render(logger, name, event_dict)
        return f"<{priority}>{line.decode() if isinstance(line, bytes) else line}"


def _renderer(fmt: str, journald: bool) -> Callable[[Any, str, EventDict], str | bytes]:
    render: Callable[[Any, str, EventDict], str | bytes]
    if fmt == "json":
        render = structlog.processors.JSONRenderer(ensure_ascii=False, default=str)
    else:
        render = structlog.processors.LogfmtRenderer(key_order=["ts", *_RESERVED[1:]], drop_missing=True,
                                                     bool_as_flag=False)
    return _Prefixed(render) if journald else render


def formatter(fmt: str = "logfmt", *, journald: bool = False) -> logging.Formatter:
    """The formatter of every line: structlog renders the relay's records and every library's alike."""
    chain: list[Processor] = [structlog.contextvars.merge_contextvars, structlog.stdlib.add_log_level,
                              _from_record]
    if not journald:  # journald stamps lines itself
        chain.append(_stamped)
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=chain,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _cleaned, _renderer(fmt, journald)],
        pass_foreign_args=False,
    )


class _Demoted(logging.Filter):
    """A chatty library's records at DEBUG: the relay's own line says the cause once, with the app and host."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(LOGGER_NAME).isEnabledFor(logging.DEBUG)


# aioapns logs every failed connection attempt at ERROR with neither app nor host (about 18 a minute during an
# outage); the relay's retry and circuit lines carry the cause instead.
_DEMOTED_LIBRARIES = ("aioapns",)


def setup_logging(fmt: str = "logfmt", level: str = "INFO") -> None:
    """Logs to stderr, one event per line.

    When ``$JOURNAL_STREAM`` names our stderr, journald is the reader: it adds its own timestamps, so the
    lines carry none, and a ``<N>`` prefix gives it each line's priority. Libraries' records (aiohttp,
    asyncio) go through the same formatter, so that a traceback never spreads over several lines.
    """
    try:
        journald = journald_reads(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # stderr replaced by something without a descriptor
        journald = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(fmt, journald=journald))
    ours = logging.getLogger(LOGGER_NAME)
    ours.handlers[:] = [handler]
    ours.setLevel(level)
    ours.propagate = False
    for name in _DEMOTED_LIBRARIES:
        library = logging.getLogger(name)
        if not any(isinstance(f, _Demoted) for f in library.filters):
            library.addFilter(_Demoted())
    root = logging.getLogger()
    if not root.handlers:  # as logging.basicConfig: a host's (or pytest's) handlers are left alone
        root.addHandler(handler)


def event(level: int, name: str, **fields: Any) -> None:
    """Log one event with fields (``log`` helper used across the relay)."""
    log.log(level, name, extra={"fields": fields})


class LineBudget:
    """How many routine trace lines (accepted, sent, waits) this process writes per second, the rest counted.

    At volume one line per webhook and per push would outrun journald's rate limit (10,000 lines per 30 s per
    service by default), which then drops lines silently, the important ones too. Routine lines pass while the
    budget lasts (a token bucket: ``per_second``, bursts of as many); past it they are counted, and one summary
    line every ``SUMMARY_EVERY`` seconds says how many of each were left out. Lines that call for action
    (failures, dead tokens, expiries, dead letters) never ask the budget. 0 writes every line.
    """

    SUMMARY_EVERY = 10.0

    def __init__(self, per_second: float = 50.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.per_second, self.clock = per_second, clock
        self.tokens, self.stamp = per_second, clock()
        self.skipped: dict[str, int] = {}
        self.summarized = self.stamp

    def allow(self, name: str) -> bool:
        """True when a routine line ``name`` may be written now; else it is counted for the next summary."""
        if self.per_second <= 0:
            return True
        now = self.clock()
        self.tokens = min(self.per_second, self.tokens + (now - self.stamp) * self.per_second)
        self.stamp = now
        if self.skipped and now - self.summarized >= self.SUMMARY_EVERY:
            self._summarize(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.skipped[name] = self.skipped.get(name, 0) + 1
        return False

    def _summarize(self, now: float) -> None:
        skipped, self.skipped, self.summarized = self.skipped, {}, now
        event(logging.INFO, "trace lines sampled", budget_per_second=self.per_second,
              **{name.replace(" ", "_"): count for name, count in sorted(skipped.items())},
              hint="parley-relay deliveries shows every delivery")


trace_budget = LineBudget()


def configure_trace(per_second: float, *, fresh: bool = False) -> None:
    """Set this process's routine-line budget (``logging.trace_lines_per_second``); ``fresh``: a full bucket."""
    trace_budget.per_second = per_second
    trace_budget.tokens = per_second if fresh else min(trace_budget.tokens, per_second)
