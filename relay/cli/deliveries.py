"""``parley-relay deliveries``: where the pushes for one token, webhook request or Parley message are (SPEC §8).

Answers an operator's "did the push for message 3651 to this phone go out?" from the store alone: state,
attempts, the provider's last answer, why a delivery waits, and when it came in, is due or ended. Read-only,
and needs no credential files (:func:`~relay.cli.common._load_for_store`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from relay.cli.common import _load_for_store, _run, _utc, _with_store
from relay.config import Config
from relay.errors import ConfigError
from relay.observability import short_token
from relay.registry.file import load_registry
from relay.registry.routing import Registry
from relay.registry.sync import OverlaySync
from relay.store import Store
from relay.store.base import DeliveryRecord

DEFAULT_LIMIT = 20
COLUMNS = ("RECEIVED", "STATE", "APP", "ATTEMPTS", "WAIT", "NEXT", "FINISHED", "REQUEST", "MESSAGE", "TOKEN",
           "REASON")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def add_parser(sub: Any, with_config: Any) -> None:
    """The ``deliveries`` command's arguments (``sub``: the top-level subparsers)."""
    parser = with_config(sub.add_parser(
        "deliveries", help="recent deliveries of a token, webhook request or message, newest first (exit 1 if none)",
        description="Recent deliveries matching every filter given (at least one), newest first, from the store. "
                    "Finished deliveries are kept store.keep_finished seconds (default 3600) after they end; "
                    "dead letters until they are retried."))
    parser.add_argument("--token", help="the Parley push token (as in the webhook's \"to\" list), or the phone's "
                                        "APNs/FCM token when the registry maps a Parley token to it")
    parser.add_argument("--request", metavar="ID", help="the webhook's request id (its X-Request-Id header, or the "
                                                        "one the relay gave it: the request_id of its log lines)")
    parser.add_argument("--message", metavar="ID", help="Parley's message id (data.object.id of a message webhook)")
    parser.add_argument("--limit", metavar="N", type=positive_int, default=DEFAULT_LIMIT,
                        help=f"show at most this many (default {DEFAULT_LIMIT})")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--full-token", action="store_true", help="print whole push tokens (default: shortened)")
    parser.set_defaults(func=cmd_deliveries)


def cmd_deliveries(args: argparse.Namespace) -> int:
    """Print the deliveries matching ``--token``/``--request``/``--message``; 1 when there are none."""
    if args.token is None and args.request is None and args.message is None:
        print("give --token, --request or --message (any together narrow the search)", file=sys.stderr)
        return 2
    config = _load_for_store(args.config)

    async def work(store: Store) -> int:
        records = await store.deliveries(token=args.token, request_id=args.request, message_id=args.message,
                                         limit=args.limit)
        shown_token = args.token if args.full_token or args.token is None else short_token(args.token)
        asked = " ".join(f"--{name} {value}" for name, value in
                         (("token", shown_token), ("request", args.request), ("message", args.message))
                         if value is not None)
        kept = (f"finished deliveries are kept store.keep_finished = {config.store.keep_finished:g} s after they "
                "end, dead letters until retried")
        routes = Routes(config, store)
        if not records and args.token is not None:  # perhaps the phone's provider token, not Parley's
            records = await by_device_token(store, await routes.parley_tokens(args.token), args)
        if not records:
            print(f"no deliveries found for {asked} ({kept})", file=sys.stderr)
            return 1
        records = await routes.fill_apps(records)
        now = time.time()
        if args.json:
            for record in records:
                print(json.dumps(as_json(record, full_token=args.full_token), ensure_ascii=False))
        else:
            print_table([as_row(record, now, full_token=args.full_token) for record in records])
        more = "; there may be more (raise --limit)" if len(records) == args.limit else ""
        count = f"{len(records)} deliver{'y' if len(records) == 1 else 'ies'}"
        print(f"{count} for {asked}, newest first ({kept}){more}", file=sys.stderr)
        return 0

    return int(_run(_with_store(config, work, read_only=True)))


async def by_device_token(store: Store, parley_tokens: Sequence[str], args: argparse.Namespace) -> list[DeliveryRecord]:
    """The deliveries of the Parley tokens registered with the provider token ``args.token``, newest first."""
    found: list[DeliveryRecord] = []
    for token in parley_tokens:
        found += await store.deliveries(token=token, request_id=args.request, message_id=args.message,
                                        limit=args.limit)
        shown = token if args.full_token else short_token(token)
        print(f"note: --token is the provider token of the registered Parley token {shown}", file=sys.stderr)
    return sorted(found, key=lambda record: record.received_at, reverse=True)[:args.limit]


class Routes:
    """The registry as ``serve`` sees it (YAML file, run-time devices from the store), loaded once when needed."""

    def __init__(self, config: Config, store: Store) -> None:
        self._config, self._store = config, store
        self._registry: Registry | None = None
        self._loaded = False

    async def registry(self) -> Registry | None:
        """The registry, or None (said on stderr) when its file cannot be loaded: the question is about the
        store, so it is answered anyway."""
        if not self._loaded:
            self._loaded = True
            try:
                self._registry = Registry(self._config.apps, load_registry(self._config.registry, self._config.apps))
            except ConfigError as exc:
                print(f"note: registry not loaded, apps and provider tokens not resolved: {exc}", file=sys.stderr)
                return None
            await OverlaySync(self._store, self._registry).load()
        return self._registry

    async def parley_tokens(self, device_token: str) -> list[str]:
        """The Parley tokens whose registry entry sends to the provider token ``device_token``."""
        registry = await self.registry()
        if registry is None:
            return []
        return sorted(token for token, _app in registry.tokens()
                      if token != device_token and (entry := registry.entry(token)) is not None
                      and entry.device_token == device_token)

    async def fill_apps(self, records: list[DeliveryRecord]) -> list[DeliveryRecord]:
        """Fill in the app of deliveries the store kept none for (one sent at its first attempt keeps only the
        app hint of its acceptance) with the app the registry routes the token to now, as ``serve`` would."""
        if all(record.app is not None for record in records):
            return records
        registry = await self.registry()
        if registry is None:
            return records
        filled = []
        for record in records:
            route = registry.lookup(record.token) if record.app is None else None
            filled.append(record if route is None else replace(record, app=route.app.name))
        return filled


def age(seconds: float) -> str:
    """A duration as an operator reads it at a glance: ``42s``, ``5m07s``, ``3h12m``, ``2d04h``."""
    whole = int(abs(seconds))
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def when(timestamp: float | None, now: float) -> str:
    """ISO 8601 UTC time and how long ago (or how soon) it is; ``-`` for none."""
    if timestamp is None:
        return "-"
    relative = f"in {age(timestamp - now)}" if timestamp > now else f"{age(now - timestamp)} ago"
    return f"{_utc(timestamp)} ({relative})"


def as_row(record: DeliveryRecord, now: float, *, full_token: bool) -> tuple[str, ...]:
    """One delivery as the table's cells (in :data:`COLUMNS` order)."""
    return (
        when(record.received_at, now), record.state, record.app or "-", str(record.attempts),
        record.wait_reason.value if record.wait_reason is not None else "-", when(record.next_at, now),
        when(record.finished_at, now), record.request_id or "-", record.message_id or "-",
        record.token if full_token else short_token(record.token), record.reason or "-",
    )


def print_table(rows: Sequence[tuple[str, ...]]) -> None:
    """Columns padded to their widest cell; the last (free-text reason) is not padded."""
    widths = [max(len(row[i]) for row in (COLUMNS, *rows)) for i in range(len(COLUMNS) - 1)]
    for row in (COLUMNS, *rows):
        print("  ".join([cell.ljust(width) for cell, width in zip(row, widths, strict=False)] + [row[-1]]))


def as_json(record: DeliveryRecord, *, full_token: bool) -> dict[str, Any]:
    """One delivery for scripts: times as ISO 8601 UTC and as Unix seconds, null when none."""
    doc: dict[str, Any] = {
        "id": record.id, "delivery_id": record.delivery_id,
        "token": record.token if full_token else short_token(record.token),
        "kind": record.kind, "app": record.app, "state": record.state, "attempts": record.attempts,
        "reason": record.reason, "wait_reason": record.wait_reason.value if record.wait_reason else None,
        "request_id": record.request_id, "message_id": record.message_id,
    }
    for name, value in (("received", record.received_at), ("next", record.next_at),
                        ("finished", record.finished_at)):
        doc[f"{name}_at"] = _utc(value) if value is not None else None
        doc[f"{name}_unix"] = value
    return doc
