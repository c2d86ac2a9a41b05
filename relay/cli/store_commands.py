"""The commands that only read or change the store: ``stats``, ``devices``, ``dead-letters``.

They load the config without credentials (:func:`~relay.cli.common._load_for_store`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from relay.cli.app_status import app_rows, live_status, print_app_table
from relay.cli.common import _load_for_store, _run, _utc, _with_store
from relay.config import Config
from relay.errors import StoreError
from relay.observability import short_token
from relay.outcome import EndState, WaitReason
from relay.registry.device import Device, as_environment, device_token_problem
from relay.registry.file import load_registry
from relay.registry.routing import Registry
from relay.registry.scope import Removal
from relay.registry.sync import OverlaySync
from relay.store import Store


def cmd_stats(args: argparse.Namespace) -> int:
    config = _load_for_store(args.config)

    async def work(store: Store) -> int:
        stats = await store.stats()
        oldest = await store.oldest_waiting(list(config.apps))
        live, source = live_status(config)
        doc = {
            "accepted": stats.accepted,
            "duplicates": stats.duplicates,
            "pending": stats.pending,
            "inflight": stats.inflight,
            "ended": {end.value: stats.ended.get(end, 0) for end in EndState},
            "dead_tokens": stats.dead_tokens,
            "runtime_devices": stats.devices,
            "redelivered_after_crash": stats.redelivered,
            "balanced": stats.balanced,
        }
        apps = app_rows(config, oldest, live, time.time())
        if args.json:
            print(json.dumps({**doc, "apps": apps, "delivery_state_from": source}))
        else:
            for key, value in doc.items():
                if isinstance(value, dict):
                    for sub, count in value.items():
                        print(f"{key + '.' + sub:<24} {count}")
                else:
                    print(f"{key:<24} {value}")
            print()
            print_app_table(apps, source)
        return 0 if stats.balanced else 1

    return int(_run(_with_store(config, work, read_only=True)))


def cmd_devices(args: argparse.Namespace) -> int:
    config = _load_for_store(args.config)

    async def work(store: Store) -> int:
        if args.action == "list":
            registry = Registry(config.apps, load_registry(config.registry, config.apps))
            await OverlaySync(store, registry).load()
            # The registry file's entries first, then the run-time ones (which overlay any of the same token).
            for token, app in sorted(registry.tokens(), key=lambda entry: (registry.is_runtime(entry[0]), entry[0])):
                source = "runtime" if registry.is_runtime(token) else "yaml"
                print("\t".join([token, app, source] + (["dead"] if registry.is_dead(token) else [])))
            return 0
        if args.action == "add":
            return await _add_device(config, store, args)
        removed = await store.remove_device(args.token) is Removal.REMOVED
        print(f"removed {short_token(args.token)}" if removed else f"no run-time device {short_token(args.token)}")
        return 0 if removed else 1

    return int(_run(_with_store(config, work, read_only=args.action == "list")))


async def _add_device(config: Config, store: Store, args: argparse.Namespace) -> int:
    """``devices add``: the same token checks as the device API's PUT, then the store."""
    app = config.apps.get(args.app)
    if app is None:
        print(f"unknown app {args.app!r}; known: {', '.join(config.apps)}", file=sys.stderr)
        return 1
    device_token = args.device_token or args.token
    problem = device_token_problem(app, device_token)
    if problem is not None:
        print(f"error: {'--device-token' if args.device_token else 'token'} {device_token[:80]!r}: {problem}",
              file=sys.stderr)
        return 1
    if args.environment is not None and app.platform != "apns":
        print(f"error: --environment: app {app.name!r} is FCM: only APNs devices have an environment",
              file=sys.stderr)
        return 1
    await store.put_device(Device(args.token, app.name, device_token, as_environment(args.environment)), time.time())
    # Deliveries parked as unroutable for it are due now: a running relay's dispatcher sends them within its
    # poll; every relay process reads the change at its next claim or request (the store's device epoch).
    released = await store.wake(time.time(), reasons={WaitReason.UNROUTABLE}, tokens=[args.token])
    print(f"added {short_token(args.token)} -> {app.name}; {released} waiting deliveries released")
    return 0


def cmd_dead_letters(args: argparse.Namespace) -> int:
    config = _load_for_store(args.config)

    async def work(store: Store) -> int:
        if args.action == "list":
            letters = await store.dead_letters(args.limit)
            for letter in letters:
                print(f"{letter.id}\t{_utc(letter.finished_at)}\t{short_token(letter.token)}\t{letter.kind}\t{letter.reason}")
            print(f"{len(letters)} dead letter(s)", file=sys.stderr)
            return 0
        if args.action == "show":
            return await _show_dead_letter(store, args.id)
        if args.all == bool(args.ids):
            print("give dead-letter IDs (see: dead-letters list) or --all, not both", file=sys.stderr)
            return 2
        if args.all:
            count = await _retry_all_dead_letters(store)
        else:
            try:
                count = await store.retry_dead_letters(args.ids, time.time())
            except StoreError as exc:  # e.g. an ID of the wrong form for this store
                print(f"error: {exc} (dead-letter IDs are the first column of: dead-letters list)", file=sys.stderr)
                return 1
        print(f"queued {count} dead letter(s) again")
        return 0 if count or args.all else 1

    return int(_run(_with_store(config, work, read_only=args.action in ("list", "show"))))



async def _show_dead_letter(store: Store, letter_id: str) -> int:
    """Everything kept about one dead letter: full token, provider reason, times and the stored payload."""
    # The store lists dead letters oldest first and has no lookup by ID; they are few (a provider's
    # permanent refusals), so reading them all for an operator's one question is cheap enough.
    total = (await store.stats()).ended.get(EndState.DEAD_LETTER, 0)
    found = next((letter for letter in await store.dead_letters(max(total, 1)) if letter.id == letter_id), None)
    if found is None:
        print(f"no dead letter {letter_id!r} (IDs are the first column of: dead-letters list)", file=sys.stderr)
        return 1
    try:
        payload = json.dumps(json.loads(found.data), indent=2, ensure_ascii=False)
    except ValueError:  # kept as received; show it even if it is not JSON
        payload = found.data.decode("utf-8", errors="replace")
    for label, value in (("id", found.id), ("token", found.token), ("kind", found.kind),
                         ("reason", found.reason or "-"), ("received", _utc(found.received_at)),
                         ("dead-lettered", _utc(found.finished_at))):
        print(f"{label + ':':<15} {value}")
    print("payload:")
    print(payload)
    return 0


RETRY_BATCH = 500


async def _retry_all_dead_letters(store: Store) -> int:
    """Queue every dead letter again, in batches, with a progress line on stderr after each batch."""
    total = (await store.stats()).ended.get(EndState.DEAD_LETTER, 0)
    done, seen = 0, set[str]()
    while done < total:
        fresh = [letter.id for letter in await store.dead_letters(RETRY_BATCH) if letter.id not in seen]
        if not fresh:  # the rest failed again meanwhile (a running relay): they are not retried twice
            break
        seen.update(fresh)
        done += await store.retry_dead_letters(fresh, time.time())
        print(f"dead-letters retry: {done}/{total} queued again", file=sys.stderr, flush=True)
    return done
