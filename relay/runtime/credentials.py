"""Which systemd credentials a configuration reads, and whether a reload found them changed.

systemd copies each ``LoadCredential=`` file into ``$CREDENTIALS_DIRECTORY`` when the service starts; on the
systemd versions distributions ship today (Debian 12: 252) the copy is not refreshed while the service runs, so
a reload re-reads the same bytes even after the operator replaced the source file. Saying so in the reload's
log line turns a silent no-op into an instruction: restart (with the socket unit no connection is refused).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from relay.config import Config
from relay.observability import event

DEFAULT_CREDENTIALS = Path("/run/credentials/parley-relay.service")


def _paths(value: Any, depth: int = 0) -> Iterator[Path]:
    if isinstance(value, Path):
        yield value
    elif depth > 6 or isinstance(value, str | bytes | int | float | bool) or value is None:
        return
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _paths(item, depth + 1)
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _paths(item, depth + 1)
    elif dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _paths(getattr(value, f.name), depth + 1)
    elif hasattr(value, "model_fields"):  # a pydantic model
        for name in type(value).model_fields:
            yield from _paths(getattr(value, name), depth + 1)


def credential_digests(config: Config) -> dict[Path, str]:
    """SHA-256 of every file the configuration names inside the credentials directory (``cred:NAME``)."""
    directory = Path(os.environ.get("CREDENTIALS_DIRECTORY") or DEFAULT_CREDENTIALS)
    digests = {}
    for path in set(_paths(config)):
        if path.parent == directory and path.is_file():
            try:
                digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                continue
    return digests


def report_unchanged(before: Mapping[Path, str], after: Mapping[Path, str]) -> list[str]:
    """Log, once per reload, the credentials a reload re-read byte for byte; returns their names."""
    same = sorted(path.name for path, digest in after.items() if before.get(path) == digest)
    if same:
        event(logging.INFO, "reload re-read credentials unchanged", credentials=",".join(same),
              hint="systemd copies LoadCredential= files at service start: to use a replaced file, restart the "
                   "service (with parley-relay.socket no connection is refused)")
    return same
