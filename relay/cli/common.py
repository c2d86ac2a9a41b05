"""What every ``parley-relay`` command shares: loading the config (with or without credentials), opening the
store for one piece of work, running a coroutine, printing a time."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from relay.config import Config, load_config
from relay.runtime.loop import run
from relay.store import Store, create_store

DEFAULT_CONFIG = "/etc/parley-relay/relay.yaml"


def _load(path: str) -> Config:
    """The whole configuration, credentials read and checked: for commands that talk to APNs/FCM or Parley."""
    return load_config(path)


def _load_for_store(path: str) -> Config:
    """Store and registry settings without the credentials: what commands that only read or change the
    store need, so that they work where systemd hands the credentials to the running service alone."""
    return load_config(path, credentials=False)


async def _with_store(config: Config, work: Callable[[Store], Awaitable[int]], *, read_only: bool = False) -> int:
    """Open the store for ``work`` and close it after; ``read_only`` for commands that only read (a mistyped
    path then exits 1 with "no store at PATH" instead of creating an empty store and reporting zeros)."""
    store = create_store(config.store, read_only=read_only)
    await store.open()
    try:
        return await work(store)
    finally:
        await store.close()

def _run(coro: Awaitable[Any]) -> Any:
    return run(coro)  # type: ignore[arg-type]


def _utc(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))

