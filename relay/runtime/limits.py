"""The open-file limit: raised to the hard limit at start, and a warning when the apps' connections may not fit.

Every FCM send in flight holds a connection of its own (``apps.NAME.concurrency``), and every Parley keep-alive
connection a descriptor. A soft limit of 1,024 (systemd's default, and most shells') refuses sockets long before
memory or CPU runs short, while the hard limit is usually far higher: like Go's runtime since 1.19, the relay
raises its soft limit to the hard one (capped) before it opens anything, and the processes it forks inherit it.
"""

from __future__ import annotations

import logging
import resource

from relay.config import ApnsApp, Config
from relay.observability import event

OPEN_FILES_CAP = 65536  # what the shipped unit sets (LimitNOFILE=); more buys nothing the relay can use
OTHER_DESCRIPTORS = 256  # the store, logs, listeners, pipes and Parley's keep-alive connections


def descriptors_needed(config: Config) -> int:
    """The most descriptors one process may hold: every FCM slot a connection, two APNs environments of
    ``max_connections`` each, and the rest."""
    connections = 0
    for app in config.apps.values():
        if isinstance(app, ApnsApp):
            connections += 2 * app.max_connections
        else:
            connections += min(app.concurrency, config.delivery.concurrency)
    return connections + OTHER_DESCRIPTORS


def raise_open_files(config: Config) -> tuple[int, int]:
    """Raise the soft open-file limit toward the hard one (at most ``OPEN_FILES_CAP``); (before, after). Logs
    a warning when the result is below :func:`descriptors_needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = OPEN_FILES_CAP if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_CAP)
    raised = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            raised = target
        except (ValueError, OSError):  # a container that forbids it: the warning below says what to do
            pass
    needed = descriptors_needed(config)
    if raised != resource.RLIM_INFINITY and raised < needed:
        event(logging.WARNING, "open-file limit below what the apps' connections may need", limit=raised,
              needed=needed, hint="raise the hard limit (systemd: LimitNOFILE=, the shipped unit sets 65536; "
                                  "a shell: ulimit -Hn) or lower apps.NAME.concurrency of FCM apps")
    return soft, raised
