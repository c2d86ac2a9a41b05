"""The listening sockets of a multi-process relay: systemd's (socket activation), else bound by the supervisor
before any child starts, so that every webhook process accepts on the same sockets."""

from __future__ import annotations

import socket
import time

from relay.config import Config
from relay.errors import ConfigError, ConfigProblem
from relay.runtime.systemd import ListenSocket, inherited_sockets

METRICS_FD_NAME = "metrics"
BIND_RETRY = 5.0  # EADDRINUSE: processes of a killed predecessor may still be closing the port


def listening(config: Config) -> list[ListenSocket]:
    """systemd's sockets (socket activation), else the sockets ``listen`` and ``metrics.listen`` name."""
    inherited = inherited_sockets()
    webhook = [s for s in inherited if s.name != METRICS_FD_NAME]
    metrics = [s for s in inherited if s.name == METRICS_FD_NAME]
    if not webhook:
        webhook = [ListenSocket("webhook", s) for s in _bind(config, "listen", config.listen.host,
                                                              config.listen.port, config.listen.backlog)]
    if not metrics and config.metrics.listen is not None:
        at = config.metrics.listen
        metrics = [ListenSocket(METRICS_FD_NAME, s) for s in _bind(config, "metrics.listen", at.host, at.port, 128)]
    return webhook + metrics


def _bind(config: Config, key: str, host: str, port: int, backlog: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` resolves to (as aiohttp's TCPSite binds)."""
    deadline = time.monotonic() + BIND_RETRY
    while True:
        bound: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in socket.getaddrinfo(
                    host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
                sock = socket.socket(family, kind, proto)
                bound.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(address)
                sock.listen(backlog)
                sock.setblocking(False)
            return bound
        except OSError as exc:
            for sock in bound:
                sock.close()
            if isinstance(exc, OSError) and exc.errno == 98 and time.monotonic() < deadline:  # EADDRINUSE
                time.sleep(0.1)
                continue
            message = f"cannot listen on {host}:{port}: {exc.strerror or exc}"
            raise ConfigError([ConfigProblem(str(config.source), key, message)]) from exc
