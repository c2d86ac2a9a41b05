"""Egress through an HTTP CONNECT proxy: which proxy a provider uses, and the tunnel APNs connections take.

Which proxy: the app's ``proxy`` setting when given, else the environment's ``HTTPS_PROXY`` (``HTTP_PROXY`` for an
``http://`` endpoint) unless ``NO_PROXY`` exempts the host, read once when the provider is built (the same
variables firebase-admin's and requests' clients honour; :func:`urllib.request.getproxies`/``proxy_bypass``).
FCM hands the URL to aiohttp; APNs (aioapns' own proxy support does not work) opens the tunnel here:
``CONNECT host:443`` to the proxy, then TLS with Apple's host name through it. ``user:password@`` in the proxy URL
becomes a ``Proxy-Authorization: Basic`` header.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from relay.providers.network_errors import ProxyFailure, describe_failure

P = TypeVar("P", bound=asyncio.Protocol)
MAX_PROXY_ANSWER = 16 * 1024  # a CONNECT answer is a status line and a few headers


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy; ``authorization`` is the ``Proxy-Authorization`` value when the URL carries credentials."""

    host: str
    port: int
    authorization: str | None = None

    @property
    def label(self) -> str:
        """``host:port``, for reasons and logs (never the credentials)."""
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, url: str) -> Proxy:
        """``http://[user:password@]host[:port]`` (a bare ``host:port``, as some set HTTPS_PROXY, means http)."""
        parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"an egress proxy must be an http:// URL with a host, not {redact(url)!r}")
        authorization = None
        if parts.username is not None:
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode()
        return cls(parts.hostname, parts.port or 80, authorization)


def redact(url: str) -> str:
    """``url`` without a password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}").geturl()


def proxy_for(url: str, configured: str | None) -> str | None:
    """The proxy URL for requests to ``url``: ``configured`` if set, else the environment's (None: direct)."""
    if configured:
        return configured
    parts = urllib.parse.urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme) or None


class _Handshake(asyncio.Protocol):
    """Reads the proxy's answer to CONNECT; nothing else is spoken on the raw connection."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if self.answer.done():
            return
        if end >= 0:
            # Nothing may follow the header before our TLS ClientHello: extra bytes would be a broken proxy.
            extra = len(self._buffer) - end - 4
            self.answer.set_result(bytes(self._buffer[:end]) if not extra else b"HTTP/1.1 502 extra bytes")
        elif len(self._buffer) > MAX_PROXY_ANSWER:
            self.answer.set_result(b"HTTP/1.1 502 oversized answer")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(exc or ConnectionResetError("the proxy closed the connection"))


async def open_tunnel(proxy: Proxy, host: str, port: int, factory: Callable[[], P],
                      context: ssl.SSLContext) -> P:
    """A TLS connection to ``host:port`` through ``proxy``, speaking ``factory()``'s protocol.

    Raises :class:`ProxyFailure` with the operator's reason (the proxy unreachable, or refusing the tunnel);
    errors of the TLS handshake through the tunnel propagate as they are (they concern ``host``).
    """
    loop = asyncio.get_running_loop()
    try:
        transport, handshake = await loop.create_connection(_Handshake, proxy.host, proxy.port)
    except OSError as exc:
        raise ProxyFailure(f"proxy {describe_failure(exc, proxy.host, proxy.port)}") from exc
    try:
        authority = f"{host}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        try:
            head = await handshake.answer
        except OSError as exc:
            raise ProxyFailure(f"proxy {proxy.label} closed the connection before answering CONNECT") from exc
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        version, _, rest = status_line.partition(" ")
        if not version.startswith("HTTP/") or not rest[:3].isdigit() or not rest.startswith("2"):
            raise ProxyFailure(f"proxy {proxy.label} refused CONNECT to {authority}: {rest.strip()[:80] or '?'}")
        protocol = factory()
        tls = await loop.start_tls(transport, protocol, context, server_hostname=host)
        if tls is None:  # the transport closed during the handshake
            raise ProxyFailure(f"proxy {proxy.label} closed the tunnel to {authority}")
        protocol.connection_made(tls)  # start_tls hands the TLS transport over without announcing it
    except BaseException:
        transport.close()
        raise
    return protocol
