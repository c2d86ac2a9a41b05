"""Why a provider could not be reached, in a few words an operator can act on; used by both providers.

A failed connection surfaces as a chain of foreign exceptions (aiohttp's ``ClientConnectorError`` around an
``OSError``; google-auth's ``TransportError`` around requests' and urllib3's around a ``socket.gaierror``; the
event loop's own ``ssl.SSLCertVerificationError``). Their ``str()`` is a nested repr that says neither which host
was tried nor, once cut to fit a log line, why. :func:`describe_failure` walks the chain to the root cause and
names it with the target: ``DNS lookup of api.push.apple.com failed (Name or service not known)``,
``connection to 127.0.0.1:8443 refused``, ``TLS handshake with 127.0.0.1:8443 failed: certificate verify failed
(...)``. Anything else is shortened to its type and the target.
"""

from __future__ import annotations

import errno
import socket
import ssl
from collections.abc import Iterator
from typing import TypeVar

E = TypeVar("E", bound=BaseException)


class ProxyFailure(OSError):
    """An HTTP CONNECT proxy refused or broke the tunnel; ``str()`` is already the operator's reason."""


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it wraps: causes, contexts, and the ones libraries keep in attributes."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        wrapped = [current.__cause__, current.__context__,
                   getattr(current, "os_error", None),  # aiohttp ClientConnectorError
                   getattr(current, "reason", None),  # urllib3 MaxRetryError
                   *current.args]  # requests' and google-auth's exceptions carry the inner one as an argument
        todo.extend(e for e in wrapped if isinstance(e, BaseException))


def _first(chain: list[BaseException], kind: type[E]) -> E | None:
    return next((error for error in chain if isinstance(error, kind)), None)


def _timed_out(exc: BaseException) -> bool:
    # TimeoutError covers socket.timeout and asyncio's; urllib3/requests/aiohttp name theirs "...Timeout..."
    return isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__


def describe_failure(exc: BaseException, host: str, port: int | None = None, timeout: float | None = None) -> str:
    """A short reason for a connection to ``host:port`` that failed with ``exc`` (its root cause, and the target).

    ``host`` is the host that was looked up and connected to; ``timeout``, when given, is named in a timeout's
    reason. The most telling cause wins: a proxy's refusal, DNS, TLS, refused, timed out, reset, another OS error.
    """
    target = f"{host}:{port}" if port else host
    chain = list(_chain(exc))
    if proxy := _first(chain, ProxyFailure):
        return str(proxy)
    if dns := _first(chain, socket.gaierror):
        return f"DNS lookup of {host} failed" + (f" ({dns.strerror})" if dns.strerror else "")
    if cert := _first(chain, ssl.SSLCertVerificationError):
        message = getattr(cert, "verify_message", None)  # aiohttp's subclass wraps the real one without it
        detail = f" ({message})" if message else ""
        return f"TLS handshake with {target} failed: certificate verify failed{detail}"
    if tls := _first(chain, ssl.SSLError):
        return f"TLS handshake with {target} failed: {tls.reason or type(tls).__name__}"
    if _first(chain, ConnectionRefusedError):
        return f"connection to {target} refused"
    if any(_timed_out(error) for error in chain):
        return f"no answer from {target} within {timeout:g}s" if timeout else f"no answer from {target} in time"
    if _first(chain, ConnectionResetError) or _first(chain, ConnectionAbortedError):
        return f"connection to {target} reset"
    other = next((e for e in chain if isinstance(e, OSError) and e.errno in errno.errorcode), None)
    if other is not None and other.errno is not None:
        return f"connection to {target} failed: {other.strerror or errno.errorcode[other.errno]}"
    return f"connection to {target} failed: {type(exc).__name__}"
