"""``parley-relay backup PATH`` and ``parley-relay restore PATH``: the SQLite store copied safely.

The store holds what exists nowhere else (devices registered through the API, dead marks, learned APNs
environments, deliveries still waiting), in WAL mode, where copying ``relay.db`` alone misses what sits in
``relay.db-wal`` and a copy taken mid-write can be torn. SQLite's online backup API copies one consistent
snapshot while the relay keeps writing (a WAL reader blocks no writer). Restoring goes through the same API,
into the store path, so a stale ``-wal`` file can never be replayed over the restored pages.

Redis keeps its own persistence (RDB snapshots, AOF); see docs/scaling-redis.md.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relay.cli.common import _load_for_store

# Tables whose rows a restore must not lose, with what an operator calls them (the summary line).
_SUMMARY = (("devices", "run-time devices"), ("dead_tokens", "dead tokens"),
            ("apns_environments", "learned APNs environments"), ("deliveries", "deliveries in any state"))


def add_parsers(sub: Any, with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser]) -> None:
    """The ``backup`` and ``restore`` subcommands."""
    backup = with_config(sub.add_parser(
        "backup", help="copy the SQLite store to PATH while the relay runs (a consistent snapshot)"))
    backup.add_argument("path", help="the backup file to write (replaced atomically when complete)")
    backup.set_defaults(func=cmd_backup)
    restore = with_config(sub.add_parser(
        "restore", help="replace the SQLite store with a backup (the relay must be stopped)"))
    restore.add_argument("path", help="a file written by parley-relay backup")
    restore.set_defaults(func=cmd_restore)


def cmd_backup(args: argparse.Namespace) -> int:
    """Write a consistent copy of the store to ``args.path``; exit 1 with the reason when it cannot."""
    store = _sqlite_path(args.config)
    if store is None:
        return 2
    if not store.is_file():
        print(f"parley-relay backup: no store at {store}", file=sys.stderr)
        return 1
    target = Path(args.path)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        with _closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as source, \
                _closing(sqlite3.connect(partial)) as copy:
            source.backup(copy)  # one step: one snapshot, however busy the relay is
            copy.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            problem = _checked(copy)
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        print(f"parley-relay backup: cannot copy {store}: {exc}", file=sys.stderr)
        return 1
    if problem:
        partial.unlink(missing_ok=True)
        print(f"parley-relay backup: the copy of {store} failed its integrity check: {problem}", file=sys.stderr)
        return 1
    _fsync(partial)
    partial.replace(target)
    _fsync(target.parent)
    print(f"backup of {store} written to {target} ({target.stat().st_size} bytes; {_summary(target)})")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Replace the store's contents with the backup at ``args.path``; refuses while a process has it open."""
    store = _sqlite_path(args.config)
    if store is None:
        return 2
    backup = Path(args.path)
    try:
        with _closing(sqlite3.connect(f"file:{backup}?mode=ro", uri=True)) as source:
            problem = _checked(source)
    except sqlite3.Error as exc:
        problem = str(exc)
    if problem:
        print(f"parley-relay restore: {backup} is not a usable backup: {problem}", file=sys.stderr)
        return 1
    holders = _processes_holding(store)
    if holders:
        print(f"parley-relay restore: {store} is open in process {', '.join(map(str, holders))}; stop the relay "
              "first (systemctl stop parley-relay)", file=sys.stderr)
        return 1
    store.parent.mkdir(parents=True, exist_ok=True)
    with _closing(sqlite3.connect(f"file:{backup}?mode=ro", uri=True)) as source, \
            _closing(sqlite3.connect(store)) as target:
        source.backup(target)  # through SQLite: the store's own WAL is reset, never replayed over the copy
        target.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    print(f"restored {store} from {backup} ({_summary(store)}); start the relay to resume delivery")
    return 0


def _sqlite_path(config_path: str) -> Path | None:
    config = _load_for_store(config_path)
    if config.store.backend != "sqlite":
        print("parley-relay: backup and restore copy the SQLite store; a Redis store is backed up by Redis "
              "itself (RDB snapshots or AOF, see docs/scaling-redis.md#backup)", file=sys.stderr)
        return None
    return Path(config.store.path)


class _closing:
    """``with`` for a sqlite3 connection that also closes it (sqlite3's own only ends a transaction)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _checked(conn: sqlite3.Connection) -> str:
    """"" when SQLite's quick check passes, else its first complaint."""
    row = conn.execute("PRAGMA quick_check").fetchone()
    return "" if row and row[0] == "ok" else str(row[0] if row else "no answer")


def _summary(path: Path) -> str:
    with _closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        counts = [f"{conn.execute(f'SELECT COUNT(*) FROM {table}').fetchone()[0]} {label}"
                  for table, label in _SUMMARY if table in tables]
    return ", ".join(counts)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _processes_holding(path: Path) -> list[int]:
    """Pids of the processes (other than this one) with ``path`` open, read from ``/proc``."""
    try:
        wanted = path.resolve()
    except OSError:
        return []
    names = {str(wanted), f"{wanted}-wal", f"{wanted}-shm"}
    holders = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) in names for fd in (entry / "fd").iterdir()):
                holders.append(int(entry.name))
        except OSError:  # gone, or not ours to read
            continue
    return sorted(holders)
