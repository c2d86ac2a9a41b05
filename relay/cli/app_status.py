"""``stats``' per-app part: each app's delivery state, read from the running relay's ``/status``.

The circuits live in the relay's delivery processes, not in the store, so ``stats`` asks the relay (its
operations listener, ``metrics.listen``, or the webhook listener when that is ``null``). The oldest waiting
delivery comes from the store, so it is shown even when no relay answers.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from relay.config import Config

STATUS_TIMEOUT = 3.0
_ANY_ADDRESS = {"", "0.0.0.0", "::", "*"}  # noqa: S104 - recognised in the config, to connect to localhost


def status_url(config: Config) -> str | None:
    """Where this config's relay answers ``/status`` (None when it listens on a port chosen at start)."""
    at = config.metrics.listen or config.listen
    if at.port == 0:
        return None
    host = "127.0.0.1" if at.host in _ANY_ADDRESS else at.host
    return f"http://{f'[{host}]' if ':' in host else host}:{at.port}/status"


def live_status(config: Config) -> tuple[dict[str, Any] | None, str]:
    """The relay's ``/status`` document, and where it came from (or why there is none)."""
    url = status_url(config)
    if url is None:
        return None, "unknown: the relay's status listener has no fixed port"
    try:
        with urllib.request.urlopen(url, timeout=STATUS_TIMEOUT) as response:  # noqa: S310 - http:// built above
            doc = json.loads(response.read())
    except (OSError, ValueError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return None, f"unknown: no relay answered at {url} ({reason})"
    if not isinstance(doc, dict) or not isinstance(doc.get("apps"), dict):
        return None, f"unknown: {url} did not answer a status document"
    return doc, url


def app_rows(config: Config, oldest: dict[str, float], live: dict[str, Any] | None,
             now: float) -> dict[str, dict[str, Any]]:
    """One entry per configured app: the relay's view (when it answered) and the store's oldest waiting."""
    rows: dict[str, dict[str, Any]] = {}
    for app in sorted(config.apps):
        seen = (live or {}).get("apps", {}).get(app) or {}
        at = oldest.get(app)
        rows[app] = {
            "delivering": seen.get("delivering"),
            "circuit": seen.get("circuit", "unknown"),
            "alarm": seen.get("alarm"),
            "reason": seen.get("reason"),
            "last_success_age_seconds": seen.get("last_success_age_seconds"),
            "oldest_waiting_age_seconds": None if at is None else round(max(0.0, now - at), 3),
        }
    return rows


def print_app_table(rows: dict[str, dict[str, Any]], source: str) -> None:
    """The human form: one line per app, why nothing leaves in the last column."""
    print(f"delivery state from {source}")
    print(f"{'app':<16} {'circuit':<10} {'oldest waiting':>14} {'last success':>13}  reason")
    for app, row in rows.items():
        circuit = "ALARM" if row["alarm"] else row["circuit"]
        print(f"{app:<16} {circuit:<10} {_ago(row['oldest_waiting_age_seconds']):>14} "
              f"{_ago(row['last_success_age_seconds']):>13}  {row['alarm'] or row['reason'] or '-'}")


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"
