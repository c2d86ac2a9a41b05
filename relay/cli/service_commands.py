"""The commands that run the relay or talk to APNs/FCM and so need the credentials: ``serve``,
``check-config``, ``send-test``, ``sign``, ``demo``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid
from pathlib import Path

from relay.cli.common import _load, _run, _with_store
from relay.errors import ConfigError, ConfigProblem
from relay.observability import setup_logging, short_token
from relay.outcome import Outcome
from relay.registry.file import load_registry, token_problems
from relay.registry.routing import Registry
from relay.registry.sync import OverlaySync
from relay.store import Store


def cmd_serve(args: argparse.Namespace) -> int:
    """One process (``--processes 1`` or ``processes: 1``), or the supervisor that forks the role processes."""
    config = _load(args.config)
    setup_logging(config.logging.format, config.logging.level)
    from relay.runtime.limits import raise_open_files

    raise_open_files(config)  # before any socket; forked role processes inherit it
    if args.processes == "1" or (args.processes is None and config.processes.single):
        from relay.runtime.service import serve

        _run(serve(config))
        return 0
    from relay.runtime.role_args import plan_counts
    from relay.runtime.supervisor import supervise

    # The supervisor only waits on children and sockets: the plain asyncio loop serves it.
    return int(asyncio.run(supervise(config, plan_counts(config.processes, config.store.backend))))


def cmd_reload(args: argparse.Namespace) -> int:
    """``systemctl reload``'s ``ExecReload=``: SIGHUP to the relay, then its outcome as the exit status."""
    from relay.runtime.reloading import request_reload

    ok, message = request_reload(args.pid, args.timeout)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def cmd_check_config(args: argparse.Namespace) -> int:
    import asyncio as _asyncio

    from relay.delivery.fits import check_fits
    from relay.providers import create_provider

    config = _load(args.config)
    problems: list[ConfigProblem] = check_fits(config.apps, config.source)
    try:
        registry = load_registry(config.registry, config.apps)
        # What the device API refuses, and Apple or Google would: the same check, for every entry of the file.
        problems.extend(token_problems(registry, config.registry, config.apps))
    except ConfigError as exc:
        problems.extend(exc.problems)

    async def check_credentials() -> None:
        for app in config.apps.values():  # the same loading serve does: keys parsed, files read
            try:
                provider = await create_provider(app, config.delivery.send_timeout)
            except ConfigError as exc:  # every app's credentials are checked, not only up to the first bad one
                problems.extend(exc.problems)
                continue
            await provider.close()

    _asyncio.run(check_credentials())
    if problems:
        raise ConfigError(problems)
    print(f"{config.source}: ok ({len(config.apps)} apps, {len(registry.devices)} devices, "
          f"{len(registry.rules)} routing rules)")
    if not args.online:
        return 0
    from relay.cli.online import check_online

    results = _asyncio.run(check_online(config))
    for result in results:
        print(f"online: app {result.app}: {'ok' if result.ok else 'FAILED'}: {result.detail}",
              file=sys.stdout if result.ok else sys.stderr)
    return 0 if all(result.ok for result in results) else 1


def cmd_send_test(args: argparse.Namespace) -> int:
    from relay.delivery.translate import translate
    from relay.inbound.parse import Agent, Message
    from relay.providers import create_provider

    config = _load(args.config)
    registry = Registry(config.apps, load_registry(config.registry, config.apps))

    async def work(store: Store) -> int:
        await OverlaySync(store, registry).load()
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
