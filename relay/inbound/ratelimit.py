"""Failed-authentication limiter per client address (SPEC §3, issue 4 item 4).

After ``max_failures`` failed authentications within ``window`` seconds, further *failures* from that address
are answered ``429`` with ``Retry-After`` instead of ``401``. A request that authenticates is never limited:
the credentials are always checked first, so Parley keeps getting through even when it shares an address
(a proxy, a NAT) with whoever is guessing. What the limit buys is quiet logs and cheap refusals for
scanners; guessing itself is defeated by long random secrets, which the README asks for.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MAX_ADDRESSES = 10_000  # addresses remembered at once; the least recently failing are forgotten first


@dataclass(frozen=True)
class Verdict:
    """A failure counted: ``retry_after`` is set when the address is over its limit; ``first`` on the first such."""

    retry_after: float | None = None
    first: bool = False


@dataclass
class _Entry:
    times: deque[float]
    limited: bool = False


class FailureLimiter:
    """Sliding-window count of authentication failures per address, bounded in memory."""

    def __init__(self, max_failures: int, window: float, *, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = MAX_ADDRESSES) -> None:
        self.max_failures, self.window = max_failures, window
        self.clock, self.max_addresses = clock, max_addresses
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def configure(self, max_failures: int, window: float) -> None:
        """New limits on reload; with the same ``max_failures`` the failures seen so far are kept."""
        if max_failures != self.max_failures:
            self._entries.clear()  # the deques are sized by the old limit
        self.max_failures, self.window = max_failures, window

    def failed(self, address: str) -> Verdict:
        """Count one failure of ``address``."""
        if self.max_failures <= 0:
            return Verdict()
        now = self.clock()
        entry = self._entries.pop(address, None) or _Entry(deque(maxlen=self.max_failures))
        while entry.times and entry.times[0] <= now - self.window:
            entry.times.popleft()
        limited = len(entry.times) >= self.max_failures
        first, entry.limited = limited and not entry.limited, limited
        entry.times.append(now)  # a full deque drops its oldest: a steady guesser stays limited
        self._entries[address] = entry  # most recent last, so eviction drops the quietest address
        while len(self._entries) > self.max_addresses:
            self._entries.popitem(last=False)
        if not limited:
            return Verdict()
        return Verdict(retry_after=max(1.0, float(math.ceil(entry.times[0] + self.window - now))), first=first)

    def failures(self, address: str) -> int:
        """Failures of ``address`` within the window (for tests and logs)."""
        entry = self._entries.get(address)
        now = self.clock()
        return sum(1 for t in (entry.times if entry else ()) if t > now - self.window)


def client_address(remote: str | None, headers: Mapping[str, str], trusted_proxies: tuple[str, ...]) -> str:
    """The address to count failures against: the peer, or behind trusted proxies the ``X-Forwarded-For`` client.

    ``X-Forwarded-For`` is read right to left and only past proxies listed in ``trusted_proxies``; anyone
    else could write any address into it.
    """
    address = remote or "-"
    if not trusted_proxies or not _in(address, trusted_proxies):
        return address
    forwarded = headers.get("X-Forwarded-For", "")
    for hop in reversed([h.strip() for h in forwarded.split(",") if h.strip()]):
        if not _in(hop, trusted_proxies):
            return hop if _is_ip(hop) else address
    return address


def _in(address: str, networks: tuple[str, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(net) for net in networks)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
