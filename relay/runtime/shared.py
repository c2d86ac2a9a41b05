"""State the processes of one relay service share through small files: app alarms and reload outcomes.

The directory is ``$RUNTIME_DIRECTORY`` under systemd (``RuntimeDirectory=parley-relay``: ``/run/parley-relay``,
private to the service and removed when it stops), else ``$TMPDIR/parley-relay.<main pid>``. The main
process empties it at start. It holds:

* ``alarms/<n>.json``: the configuration alarms of delivery process ``n``, ``{app: reason}`` (the
  supervisor's ``STATUS=`` line and the status endpoint read them all: :meth:`SharedState.alarms`; they never
  make ``/readyz`` fail, SPEC §8);
* ``health/<n>.json``: each app's circuit, alarm, reason and last success as delivery process ``n`` sees them
  (``/status`` and the ``STATUS=`` line merge them, :mod:`relay.delivery.health`);
* ``down.json``: the processes the supervisor could not keep running (restarted
  :data:`~relay.runtime.supervisor.DOWN_AFTER` times in a row without staying up), a JSON list of
  ``{"process": "delivery.0", "role": "delivery", "since": <unix time>, "failures": 3, "error": "..."}``
  (``error``: the child's last ``failed to start: ...`` status, else how it exited); ``[]`` or no file when
  every process runs. Written by the supervisor only, read with :meth:`SharedState.down` (the webhook
  processes turn it into ``parley_relay_role_down{role}``; the status endpoint may show it as it is);
* ``starting``: the processes not yet up, until the service is ready;
* ``config/``: the configuration the supervisor validated, by generation, which the children load
  (:mod:`relay.runtime.snapshot`);
* ``reload.json``: the outcome of the latest reload, numbered, which ``parley-relay reload`` waits for;
* ``metrics/``: prometheus_client's multiprocess files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from relay.delivery import health
from relay.delivery.health import AppHealth

RUNTIME_ENV = "RUNTIME_DIRECTORY"  # systemd.exec(5), set by RuntimeDirectory=


def state_dir(main_pid: int, environ: dict[str, str] | None = None) -> Path:
    """Where the service whose main process is ``main_pid`` keeps its shared state."""
    env = os.environ if environ is None else environ
    runtime = env.get(RUNTIME_ENV, "").split(":")[0]  # several RuntimeDirectory= entries are colon-separated
    if runtime:
        return Path(runtime)
    return Path(tempfile.gettempdir()) / f"parley-relay.{main_pid}"


@dataclass(frozen=True)
class ProcessDown:
    """A role process the supervisor keeps restarting and that does not stay up."""

    process: str  # "delivery.0"
    role: str  # "delivery"
    since: float  # unix time of the failure that made it count as down
    failures: int  # exits in a row, each within a minute of its start
    error: str  # its last "failed to start: ..." status, else how it exited


@dataclass(frozen=True)
class ReloadOutcome:
    """The ``n``-th reload the service finished; ``ok`` False when any process kept its old configuration."""

    generation: int
    ok: bool
    status: str
    counts: dict[str, int] = field(default_factory=dict)  # reloads so far by result: ok, rejected, partial


class SharedState:
    """The files in one service's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root

    @property
    def metrics_dir(self) -> Path:
        return self.root / "metrics"

    def reset(self) -> None:
        """Start of the service: nothing from an earlier run counts (the metrics files least of all)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in ("alarms", "health", "metrics", "config"):
            shutil.rmtree(self.root / name, ignore_errors=True)
            (self.root / name).mkdir(mode=0o700)
        (self.root / "reload.json").unlink(missing_ok=True)
        (self.root / "down.json").unlink(missing_ok=True)

    def remove(self) -> None:
        """End of a service outside systemd (systemd removes its RuntimeDirectory itself)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def write_alarms(self, index: int, alarms: dict[str, str]) -> None:
        """The alarms of delivery process ``index`` (an empty mapping when it has none)."""
        _write_atomic(self.root / "alarms" / f"{index}.json", json.dumps(alarms))

    def alarms(self) -> dict[str, str]:
        """The alarms of every delivery process, by app."""
        found: dict[str, str] = {}
        for path in sorted((self.root / "alarms").glob("*.json")):
            try:
                found.update(json.loads(path.read_text()))
            except (OSError, ValueError):  # removed or replaced while read: the next probe sees it
                continue
        return found

    def write_health(self, index: int, healths: dict[str, AppHealth]) -> None:
        """Delivery process ``index``'s view of its apps (an empty mapping when it stops)."""
        (self.root / "health").mkdir(mode=0o700, exist_ok=True)
        _write_atomic(self.root / "health" / f"{index}.json", json.dumps(health.to_json(healths)))

    def app_health(self) -> dict[str, AppHealth]:
        """Every delivery process's view merged: the worst circuit, any alarm, the latest success."""
        parts = []
        for path in sorted((self.root / "health").glob("*.json")):
            try:
                parts.append(health.from_json(json.loads(path.read_text())))
            except (OSError, ValueError):  # removed or replaced while read: the next look sees it
                continue
        return health.merge(parts)

    def set_starting(self, names: list[str]) -> None:
        """Until the service is ready, ``/readyz`` of a webhook process that is already up says it starts."""
        path = self.root / "starting"
        if names:
            _write_atomic(path, " ".join(names))
        else:
            path.unlink(missing_ok=True)

    def problems(self) -> list[str]:
        """What ``/readyz`` adds for the other processes: the service still starting. Never an app's alarm or
        a delivery process's state (SPEC §8: readiness is "webhooks can be accepted and stored")."""
        try:
            return [f"starting: {(self.root / 'starting').read_text()}"]
        except OSError:
            return []

    def write_down(self, down: list[ProcessDown]) -> None:
        """The processes that are down now (an empty list when none is)."""
        _write_atomic(self.root / "down.json", json.dumps([vars(d) for d in down]))

    def down(self) -> list[ProcessDown]:
        """The processes the supervisor could not keep running (see the module docstring)."""
        try:
            docs = json.loads((self.root / "down.json").read_text())
            return [ProcessDown(str(d["process"]), str(d["role"]), float(d["since"]), int(d["failures"]),
                                str(d["error"])) for d in docs]
        except (OSError, ValueError, KeyError, TypeError):  # none written yet, or replaced while read
            return []

    def last_reload(self) -> ReloadOutcome | None:
        try:
            doc = json.loads((self.root / "reload.json").read_text())
            counts = {str(k): int(v) for k, v in dict(doc.get("counts", {})).items()}
            return ReloadOutcome(int(doc["generation"]), bool(doc["ok"]), str(doc["status"]), counts)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def write_reload(self, ok: bool, status: str, result: str | None = None) -> ReloadOutcome:
        """Record a finished reload under the next generation number; ``result`` (default ``ok`` or
        ``rejected``) is what ``counts`` adds one to (``parley_relay_reloads_total{result}``)."""
        last = self.last_reload()
        counts = dict(last.counts) if last is not None else {}
        key = result or ("ok" if ok else "rejected")
        counts[key] = counts.get(key, 0) + 1
        outcome = ReloadOutcome((last.generation if last else 0) + 1, ok, status, counts)
        _write_atomic(self.root / "reload.json",
                      json.dumps({"generation": outcome.generation, "ok": ok, "status": status, "counts": counts}))
        return outcome


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
