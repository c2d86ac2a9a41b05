"""The event loop every relay process and command runs on: uvloop where it is installed, else asyncio's.

uvloop is imported with this module, not at the first run: the supervisor imports it before it forks the
role processes, which then share it.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

try:
    from uvloop import run as _run
except ImportError:  # pragma: no cover - installed with the relay wherever it builds
    from asyncio import run as _run  # type: ignore[assignment]

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion on a new loop (``asyncio.run`` semantics) and return its result."""
    return _run(coro)
