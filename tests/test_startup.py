"""Starting the relay on a SQLite file: every start becomes ready, or fails with one clear line.

The supervisor opens (creates or migrates) the file once before its children start, each opening takes the
writers' ``flock``, and what SQLite refuses at once at start (a lock it will not wait for) is tried again.
Before, the children switched the journal mode and migrated the same file at the same moment, and one start
in a few failed with ``database is locked``.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from relay.store import sqlite_schema as schema
from relay.testing.process import RelayProcess, free_port
from relay.testing.sandbox import Sandbox
from tests.test_store_sqlite import _VERSION_3


@contextmanager
def cpu_load() -> Iterator[None]:
    """One busy-looping process per core while the block runs (a CI machine running other jobs)."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 1)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def old_file(path: Path) -> None:
    """A store file of schema version 3, with open and finished deliveries and dedupe keys."""
    with closing(sqlite3.connect(path)) as conn:
        conn.executescript(_VERSION_3)
        conn.execute("PRAGMA journal_mode=WAL")


def start(sandbox: Sandbox, name: str, **processes: int) -> tuple[RelayProcess, int]:
    port = free_port()
    config = sandbox.write(f"{name}.yaml", listen={"host": "127.0.0.1", "port": port},
                           store={"backend": "sqlite", "path": str(sandbox.root / f"{name}.db")},
                           **({"processes": processes} if processes else {}))
    return RelayProcess(config, log=sandbox.root / f"{name}.log", processes="auto"), port


def ready_then_stopped(relay: RelayProcess, port: int) -> None:
    relay.wait_ready(f"http://127.0.0.1:{port}/readyz", timeout=180)
    assert relay.stop(60) == 0, relay.log()[-3000:]


@pytest.mark.timeout(400)  # some 16 Python processes starting on a machine whose every core is kept busy
async def test_many_relays_start_at_once_on_fresh_and_old_files_under_cpu_load(sandbox: Sandbox) -> None:
    """Four relays in the multi-process model (two webhook and two delivery processes each, all opening one
    file), two on fresh files and two on files of the previous schema, started together while every core
    is busy: each becomes ready and stops cleanly, and each old file is migrated with its deliveries."""
    for n in range(2):
        old_file(sandbox.root / f"old{n}.db")
    with cpu_load():
        relays = [start(sandbox, f"{kind}{n}", ingest=2, delivery=2) for kind in ("fresh", "old") for n in range(2)]
        try:
            await asyncio.gather(*(asyncio.to_thread(ready_then_stopped, relay, port) for relay, port in relays))
        finally:
            for relay, _ in relays:
                relay.__exit__()
    for relay, _ in relays:
        assert "database is locked" not in relay.log()
    for n in range(2):
        with closing(sqlite3.connect(sandbox.root / f"old{n}.db")) as conn:
            assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
            # The old deliveries are all there (the one finished in 1970 may be pruned already).
            rows = conn.execute("SELECT delivery_id FROM deliveries WHERE delivery_id != 'd1' ORDER BY id").fetchall()
            assert rows == [("d2",), ("d3",), ("d4",), ("d5",)]


async def test_a_start_waits_out_a_write_lock_held_longer_than_the_busy_timeout(sandbox: Sandbox) -> None:
    """Another program holds the old file's write lock for longer than SQLite's busy timeout (5 s) as the
    relay starts and must migrate it: the start waits and becomes ready once the lock is free, instead of
    failing with ``database is locked``."""
    path = sandbox.root / "held.db"
    old_file(path)
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(12.0, holder.execute, ("ROLLBACK",))
    release.start()
    try:
        relay, port = start(sandbox, "held")
        with relay:
            await asyncio.to_thread(ready_then_stopped, relay, port)
    finally:
        release.join()
        holder.close()
    assert "database is locked" not in relay.log()


async def test_a_store_that_cannot_be_opened_fails_the_start_with_one_clear_line(sandbox: Sandbox) -> None:
    """A store path that cannot be a database: the relay logs ``relay failed to start`` naming the store and
    exits 1 before starting its processes, with no stray asyncio error (``exception was never retrieved``)."""
    (sandbox.root / "broken.db").mkdir()
    relay, _port = start(sandbox, "broken")
    with relay:
        assert relay.wait(120) == 1
    log = relay.log()
    assert "relay failed to start" in log and "cannot open SQLite store" in log, log[-3000:]
    assert "never retrieved" not in log and "Traceback" not in log, log[-3000:]


async def test_a_child_that_fails_to_start_ends_the_start_without_a_stray_asyncio_error(sandbox: Sandbox) -> None:
    """When a child cannot start (an unreadable APNs key), the supervisor stops the others and exits 1 with
    ``relay failed to start``; waiting for the children's readiness leaves no ``exception was never
    retrieved`` behind."""
    (sandbox.root / "AuthKey.p8").write_text("not a key\n")
    relay, _port = start(sandbox, "badkey", ingest=2, delivery=2)
    with relay:
        assert relay.wait(120) == 1
    log = relay.log()
    assert "relay failed to start" in log, log[-3000:]
    assert "never retrieved" not in log, log[-3000:]
