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
    parser.add_argument("--token", help="the Parley push token (as in the webhook's \"to\" list)")
    parser.add_argument("--request", metavar="ID", help="the webhook's request id (its X-Request-Id header, or the "
                                                        "one the relay gave it: the request_id of its log lines)")
    parser.add_argument("--message", metavar="ID", help="Parley's message id (data.object.id of a message webhook)")
    parser.add_argument("--limit", type=positive_int, default=DEFAULT_LIMIT,
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
        asked = " ".join(f"--{name} {value}" for name, value in
                         (("token", args.token), ("request", args.request), ("message", args.message))
                         if value is not None)
        kept = (f"finished deliveries are kept store.keep_finished = {config.store.keep_finished:g} s after they "
                "end, dead letters until retried")
        if not records:
            print(f"no deliveries found for {asked} ({kept})", file=sys.stderr)
            return 1
        records = await with_apps(config, store, records)
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

    return int(_run(_with_store(config, work)))


async def with_apps(config: Config, store: Store, records: list[DeliveryRecord]) -> list[DeliveryRecord]:
    """Fill in the app of deliveries the store kept none for (one sent at its first attempt keeps only the app
    hint of its acceptance) with the app the registry routes the token to now, as ``serve`` would."""
    if all(record.app is not None for record in records):
        return records
    try:
        registry = Registry(config.apps, load_registry(config.registry, config.apps))
    except ConfigError as exc:  # the question is about the store: answer it, say why the apps are missing
        print(f"note: registry not loaded, apps not shown: {exc}", file=sys.stderr)
        return records
    registry.load_overlay(await store.list_devices(), (await store.dead_tokens()).keys())
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
