"""``Retry-After`` as both providers read it: one parser, so APNs and FCM answers are honoured alike.

RFC 9110 §10.2.3: the value is either ``delay-seconds`` (a non-negative integer) or an ``HTTP-date``. Apple
documents seconds on ``429``; Google's front ends send seconds, and proxies in between may send a date. A value
that is neither (or not finite) is ignored: the dispatcher's own backoff then applies.
"""

from __future__ import annotations

import datetime
import email.utils
import math
import time
from collections.abc import Callable


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from ``now()``, or None when ``value`` is missing or unusable (a date past is 0)."""
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    try:
        seconds = float(text)  # a fraction is tolerated: some servers send "1.5"
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # "-0000": RFC 5322's "UTC, local zone unknown"
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - now()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
