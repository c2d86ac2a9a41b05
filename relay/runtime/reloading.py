"""``parley-relay reload``: ask a running relay to reload, and report whether it took the new files.

systemd before 253 has no ``Type=notify-reload``, and ``ExecReload=kill -HUP $MAINPID`` reports success
whatever the relay thought of the files. This command sends the same ``SIGHUP``, then waits until the
relay records the outcome of a reload later than the last one it had recorded (``reload.json`` in the
service's state directory, see :mod:`relay.runtime.shared`), so ``systemctl reload`` fails when the reload
was rejected.
"""

from __future__ import annotations

import os
import signal
import time

from relay.runtime.shared import SharedState, state_dir

POLL = 0.05


def request_reload(pid: int, timeout: float) -> tuple[bool, str]:
    """``(taken, message)`` for a reload of the relay whose main process is ``pid``."""
    shared = SharedState(state_dir(pid))
    if not shared.root.is_dir():
        return False, f"no running relay with main pid {pid} (no state directory {shared.root})"
    before = shared.last_reload()
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return False, f"cannot signal pid {pid}: {exc.strerror or exc}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = shared.last_reload()
        if outcome is not None and (before is None or outcome.generation > before.generation):
            return outcome.ok, outcome.status
        time.sleep(POLL)
    return False, f"no reload outcome from pid {pid} within {timeout:g}s"
