"""The relay's error hierarchy: every failure the relay itself raises is one of these.

    RelayError
    ├── InvalidWebhook      a request the relay refuses (status 400/401/413/429), with the field at fault
    ├── ConfigError         configuration or credential problems, each naming file and key
    └── StoreError          the store cannot do what was asked
        └── StoreUnavailable    the store is unreachable right now (webhooks answer 503)

Errors from client libraries (aioapns, firebase-admin, redis) are translated at the provider/store
boundary and never escape above it.
"""

from __future__ import annotations

from dataclasses import dataclass


class RelayError(Exception):
    """Base of all errors the relay raises on purpose."""

    retry_after: float | None = None


class InvalidWebhook(RelayError):
    """A webhook request that is refused; ``field`` names the JSON path at fault, if any."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status


@dataclass(frozen=True)
class ConfigProblem:
    """One configuration problem: which file, which key, what is wrong, and the file's line when known."""

    file: str
    key: str
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}: {self.key}" if self.key else self.file
        return f"{where}: {self.message}" + (f" (line {self.line})" if self.line else "")


class ConfigError(RelayError):
    """The configuration (or a file it names) is unusable; carries every problem found."""

    def __init__(self, problems: list[ConfigProblem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))


class StoreError(RelayError):
    """The store failed an operation."""


class StoreUnavailable(StoreError):
    """The store cannot be reached; callers answer 503 so that Parley retries."""
