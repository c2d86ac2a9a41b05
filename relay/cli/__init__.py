"""``parley-relay``: the command line for operators (serve, check, inspect, repair).

Exit codes: 0 success, 1 the command ran and found a problem (bad config, failed send), 2 usage errors,
141 the reader of the output went away (``stats | head``), as for a tool killed by SIGPIPE.
Commands that only read or change the store load the config without credentials (:func:`_load_for_store`).

The commands live by what they need: ``service_commands`` (serve, check-config, send-test, sign, demo: the
credentials), ``store_commands`` (stats, devices, dead-letters: the store only), ``deliveries`` (the store only),
``common`` (config loading, store opening). This module holds the parser and :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from relay import __version__
from relay.cli import backup, config_commands, deliveries
from relay.cli.common import DEFAULT_CONFIG, _load, _load_for_store, _run, _utc, _with_store
from relay.cli.deliveries import cmd_deliveries
from relay.cli.service_commands import cmd_check_config, cmd_demo, cmd_reload, cmd_send_test, cmd_serve, cmd_sign
from relay.cli.store_commands import RETRY_BATCH, cmd_dead_letters, cmd_devices, cmd_stats
from relay.errors import ConfigError, RelayError

__all__ = ["DEFAULT_CONFIG", "RETRY_BATCH", "_load", "_load_for_store", "_run", "_utc", "_with_store",
           "build_parser", "cmd_check_config", "cmd_dead_letters", "cmd_deliveries", "cmd_demo", "cmd_devices",
           "cmd_reload", "cmd_send_test", "cmd_serve", "cmd_sign", "cmd_stats", "main"]

def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to render ``--help``)."""
    parser = argparse.ArgumentParser(prog="parley-relay", description="Parley push webhooks -> APNs and FCM.")
    parser.add_argument("--version", action="version", version=f"parley-relay {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", default=DEFAULT_CONFIG, help=f"main config file (default {DEFAULT_CONFIG})")
        return p

    def leaf_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        # Also after the action (`devices list --config X`); SUPPRESS keeps the group's value when absent.
        p.add_argument("--config", "-c", default=argparse.SUPPRESS, help="main config file")
        return p

    serve = with_config(sub.add_parser("serve", help="run the relay"))
    serve.add_argument("--processes", choices=("1", "auto"), default=None,
                       help="1: one process does everything; auto (or the config's processes:): webhook and "
                            "delivery processes under one supervisor")
    serve.set_defaults(func=cmd_serve)
    reload = sub.add_parser("reload", help="reload a running relay and wait: exit 0 if taken, 1 if rejected")
    reload.add_argument("--pid", type=int, required=True, help="the relay's main pid (systemd: $MAINPID)")
    reload.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the outcome (default 60)")
    reload.set_defaults(func=cmd_reload)
    check = with_config(sub.add_parser("check-config", help="validate config, registry and credentials"))
    check.add_argument("--online", action="store_true",
                       help="also prove each app's path: fetch an FCM token, push APNs/FCM to a test token "
                            "(exit 1 if any app fails)")
    check.set_defaults(func=cmd_check_config)
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
    add.add_argument("--environment", choices=("sandbox", "production"),
                     help="APNs: the host of the device token (sandbox: a development build); default: the app's")
    remove = leaf_config(dsub.add_parser("remove", help="remove a run-time device (exit 1 if there was none)"))
    remove.add_argument("token")
    devices.set_defaults(func=cmd_devices)

    letters = with_config(sub.add_parser("dead-letters", help="deliveries refused by a provider"))
    lsub = letters.add_subparsers(dest="action", required=True)
    lst = leaf_config(lsub.add_parser(
        "list", help="ID, time, token, kind and reason of each dead letter, oldest first"))
    lst.add_argument("--limit", type=int, default=100, help="show at most this many (default 100)")
    show = leaf_config(lsub.add_parser(
        "show", help="one dead letter in full: token, provider reason, times, payload (exit 1 if not found)"))
    show.add_argument("id", help="a dead-letter ID, as printed by: dead-letters list")
    retry = leaf_config(lsub.add_parser("retry", help="queue dead letters again (exit 1 if none of the IDs was found)"))
    retry.add_argument("ids", nargs="*", help="dead-letter IDs, as printed by: dead-letters list")
    retry.add_argument("--all", action="store_true", help="every dead letter, with progress on stderr")
    letters.set_defaults(func=cmd_dead_letters)
    deliveries.add_parser(sub, with_config)
    backup.add_parsers(sub, with_config)

    send = with_config(sub.add_parser("send-test", help="send one alert to a token through the real provider"))
    send.add_argument("--token", required=True)
    send.add_argument("--text", default="Test notification from parley-relay")
    send.set_defaults(func=cmd_send_test)

    sign = with_config(sub.add_parser("sign", help="print the auth.signature header(s) for a request body"))
    sign.add_argument("--body", default="-", help="file with the exact body bytes (default: standard input)")
    sign.add_argument("--private-key", help="PEM private key (rsa/ecdsa/ed25519; HMAC uses the configured secret)")
    sign.add_argument("--timestamp", type=int, help="Unix time for timestamp_header (default: now)")
    sign.set_defaults(func=cmd_sign)

    config_commands.add_parser(sub)

    demo = sub.add_parser("demo", help="run the relay with local fake APNs/FCM and show two notifications")
    demo.add_argument("--port", type=int, default=0)
    demo.add_argument("--keep-running", action="store_true", help="keep serving after the demo")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``parley-relay`` command."""
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args))
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's shutdown
        return code
    except BrokenPipeError:
        # `parley-relay stats | head`: the reader has all it wanted. Point stdout at /dev/null so that the
        # interpreter's final flush does not fail again, and exit like a tool killed by SIGPIPE would.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    except RelayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
