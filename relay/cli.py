"""``parley-relay``: the command line for operators (serve, check, inspect, repair).

Exit codes: 0 success, 1 the command ran and found a problem (bad config, failed send), 2 usage errors.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from relay.config import Config, load_config
from relay.errors import ConfigError, RelayError, StoreError
from relay.observability import setup_logging, short_token
from relay.outcome import EndState, Outcome, WaitReason
from relay.registry.device import Device
from relay.registry.file import load_registry
from relay.registry.routing import Registry
from relay.store import Store, create_store

DEFAULT_CONFIG = "/etc/parley-relay/relay.yaml"


def _load(path: str) -> Config:
    return load_config(path)


async def _with_store(config: Config, work: Callable[[Store], Awaitable[int]]) -> int:
    store = create_store(config.store)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from relay.runtime.service import serve

    config = _load(args.config)
    setup_logging(config.logging.format, config.logging.level)
    _run(serve(config))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    import asyncio as _asyncio

    from relay.providers import create_provider

    config = _load(args.config)
    registry = load_registry(config.registry, config.apps)

    async def check_credentials() -> None:
        for app in config.apps.values():  # the same loading serve does: keys parsed, files read
            provider = await create_provider(app, config.delivery.send_timeout)
            await provider.close()

    _asyncio.run(check_credentials())
    print(f"{config.source}: ok ({len(config.apps)} apps, {len(registry.devices)} devices, "
          f"{len(registry.rules)} routing rules)")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    config = _load(args.config)

    async def work(store: Store) -> int:
        stats = await store.stats()
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
        if args.json:
            print(json.dumps(doc))
        else:
            for key, value in doc.items():
                if isinstance(value, dict):
                    for sub, count in value.items():
                        print(f"{key + '.' + sub:<24} {count}")
                else:
                    print(f"{key:<24} {value}")
        return 0 if stats.balanced else 1

    return int(_run(_with_store(config, work)))


def cmd_devices(args: argparse.Namespace) -> int:
    config = _load(args.config)

    async def work(store: Store) -> int:
        if args.action == "list":
            base = load_registry(config.registry, config.apps)
            overlay = {d.token: d for d in await store.list_devices()}
            dead = await store.dead_tokens()
            for token, (app, _device_token) in sorted(base.devices.items()):
                if token not in overlay:
                    print("\t".join([token, app, "yaml"] + (["dead"] if token in dead else [])))
            for token, device in sorted(overlay.items()):
                print("\t".join([token, device.app, "runtime"] + (["dead"] if token in dead else [])))
            return 0
        if args.action == "add":
            if args.app not in config.apps:
                print(f"unknown app {args.app!r}; known: {', '.join(config.apps)}", file=sys.stderr)
                return 1
            await store.put_device(Device(args.token, args.app, args.device_token or args.token), time.time())
            # Deliveries parked as unroutable for it are due now: a running relay's dispatcher sends them
            # within its poll (it finds the device in the store), before any reload.
            released = await store.wake(time.time(), reasons={WaitReason.UNROUTABLE}, tokens=[args.token])
            print(f"added {short_token(args.token)} -> {args.app}; {released} waiting deliveries released")
            return 0
        removed = await store.remove_device(args.token)
        print(f"removed {short_token(args.token)}" if removed else f"no run-time device {short_token(args.token)}")
        return 0 if removed else 1

    return int(_run(_with_store(config, work)))


def cmd_dead_letters(args: argparse.Namespace) -> int:
    config = _load(args.config)

    async def work(store: Store) -> int:
        if args.action == "list":
            letters = await store.dead_letters(args.limit)
            for letter in letters:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.finished_at))
                print(f"{letter.id}\t{when}\t{short_token(letter.token)}\t{letter.kind}\t{letter.reason}")
            print(f"{len(letters)} dead letter(s)", file=sys.stderr)
            return 0
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

    return int(_run(_with_store(config, work)))


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


def cmd_send_test(args: argparse.Namespace) -> int:
    from relay.delivery.translate import translate
    from relay.inbound.parse import Agent, Message
    from relay.providers import create_provider

    config = _load(args.config)
    registry = Registry(config.apps, load_registry(config.registry, config.apps))

    async def work(store: Store) -> int:
        registry.load_overlay(await store.list_devices(), (await store.dead_tokens()).keys())
        route = registry.lookup(args.token)
        if route is None:
            print(f"no registry entry or routing rule for {short_token(args.token)}", file=sys.stderr)
            return 1
        message = Message(id=int(time.time()), type_id=2, text=args.text, image=None,
                          agent=Agent(None, "parley-relay", None), time=int(time.time()))
        now = time.time()
        push = translate(message, route, str(uuid.uuid4()), now, now + 3600)
        provider = await create_provider(route.app, config.delivery.send_timeout)
        try:
            result = await provider.send(push)
        finally:
            await provider.close()
        print(f"{route.app.platform} app={route.app.name} outcome={result.outcome.value} "
              f"status={result.status} reason={result.reason or '-'}")
        return 0 if result.outcome is Outcome.SENT else 1

    return int(_run(_with_store(config, work)))


def cmd_sign(args: argparse.Namespace) -> int:
    """Print the signature header(s) ``auth.signature`` expects on a body, for testing a setup with curl."""
    from relay.inbound.auth import sign_headers

    config = _load(args.config)
    if config.auth.signature is None:
        print(f"{config.source}: auth.signature is not configured", file=sys.stderr)
        return 1
    try:
        body = sys.stdin.buffer.read() if args.body == "-" else Path(args.body).read_bytes()
        private_key = Path(args.private_key).read_bytes() if args.private_key else None
        headers = sign_headers(config.auth.signature, body, timestamp=args.timestamp, private_key=private_key)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, value in headers:
        print(f"{name}: {value}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from relay.testing.demo import run_demo

    return int(_run(run_demo(port=args.port, keep_running=args.keep_running)))


def _run(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help``)."""
    parser = argparse.ArgumentParser(prog="parley-relay", description="Parley push webhooks -> APNs and FCM.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"main config file (default {DEFAULT_CONFIG})")
        return p

    def leaf_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # Also after the action (`devices list --config X`); SUPPRESS keeps the group's value when absent.
        p.add_argument("--config", "-c", default=argparse.SUPPRESS, help="main config file")
        return p

    with_config(sub.add_parser("serve", help="run the relay")).set_defaults(func=cmd_serve)
    with_config(sub.add_parser("check-config", help="validate config, registry and credentials")).set_defaults(
        func=cmd_check_config)
    stats = with_config(sub.add_parser("stats", help="deliveries by state (exit 1 if the books do not balance)"))
    stats.add_argument("--json", action="store_true")
    stats.set_defaults(func=cmd_stats)

    devices = with_config(sub.add_parser("devices", help="run-time devices (overlay the YAML registry)"))
    dsub = devices.add_subparsers(dest="action", required=True)
    leaf_config(dsub.add_parser("list", help="all devices, YAML and run-time"))
    add = leaf_config(dsub.add_parser("add", help="add or replace a run-time device"))
    add.add_argument("token", help="the Parley push token")
    add.add_argument("--app", required=True)
    add.add_argument("--device-token", help="provider token, when it differs from the Parley token")
    remove = leaf_config(dsub.add_parser("remove", help="remove a run-time device (exit 1 if there was none)"))
    remove.add_argument("token")
    devices.set_defaults(func=cmd_devices)

    letters = with_config(sub.add_parser("dead-letters", help="deliveries refused by a provider"))
    lsub = letters.add_subparsers(dest="action", required=True)
    lst = leaf_config(lsub.add_parser(
        "list", help="ID, time, token, kind and reason of each dead letter, oldest first"))
    lst.add_argument("--limit", type=int, default=100, help="show at most this many (default 100)")
    retry = leaf_config(lsub.add_parser("retry", help="queue dead letters again (exit 1 if none of the IDs was found)"))
    retry.add_argument("ids", nargs="*", help="dead-letter IDs, as printed by: dead-letters list")
    retry.add_argument("--all", action="store_true", help="every dead letter, with progress on stderr")
    letters.set_defaults(func=cmd_dead_letters)

    send = with_config(sub.add_parser("send-test", help="send one alert to a token through the real provider"))
    send.add_argument("--token", required=True)
    send.add_argument("--text", default="Test notification from parley-relay")
    send.set_defaults(func=cmd_send_test)

    sign = with_config(sub.add_parser("sign", help="print the auth.signature header(s) for a request body"))
    sign.add_argument("--body", default="-", help="file with the exact body bytes (default: standard input)")
    sign.add_argument("--private-key", help="PEM private key (rsa/ecdsa/ed25519; HMAC uses the configured secret)")
    sign.add_argument("--timestamp", type=int, help="Unix time for timestamp_header (default: now)")
    sign.set_defaults(func=cmd_sign)

    demo = sub.add_parser("demo", help="run the relay with local fake APNs/FCM and show two notifications")
    demo.add_argument("--port", type=int, default=0)
    demo.add_argument("--keep-running", action="store_true", help="keep serving after the demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``parley-relay`` command."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    except RelayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
