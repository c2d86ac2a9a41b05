"""The benchmark's fake APNs and FCM, in their own process, driven over stdin/stdout (one JSON line each way).

    python bench/fakes.py ROOT

It starts :class:`relay.testing.sandbox.Sandbox` (both fakes, each on its own thread, credentials under
ROOT), prints ``{"ready": true, ...}`` and then answers commands:

* ``{"cmd": "config"}`` -> the relay config dict for these fakes (the harness writes it to disk);
* ``{"cmd": "mark"}`` -> the number of requests each fake has recorded so far (a position to count from);
* ``{"cmd": "since", "apns": N, "fcm": M, "ids": bool}`` -> per platform, the successful requests after
  that position: count, first/last arrival time, and with ``ids`` every ``[object id, arrival time]``;
* ``{"cmd": "pauses"}`` -> the garbage collections of this process that took 10 ms or more, as ``[wall-clock
  start, seconds, generation]``: every thread of the fakes stops meanwhile, so a push arriving then is
  recorded late (a gap the relay did not make; what the fakes recorded is frozen out of collections every
  second, so that few remain);
* ``{"cmd": "delay", "platform": "apns"|"fcm", "seconds": S}`` -> that fake answers every request S seconds
  late from now on (a provider further away);
* ``{"cmd": "quit"}``.
"""

from __future__ import annotations

import gc
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

from relay.testing.sandbox import Sandbox


def _object_id(parley: str | None) -> int:
    try:
        return int(json.loads(parley or "{}")["object"]["id"])
    except (ValueError, KeyError, TypeError):
        return -1


class _Tally:
    """One fake's successful requests from a position on, counted as they arrive. A row polls ``since`` five
    times a second; reading every record at each poll made the fakes' process spend more CPU (and hold the
    lock its servers record under longer) the further a drain got: quadratic over a drain of a million."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, start: int = 0) -> None:
        """Count from ``start`` anew (the fakes forgot their records, or a poller asks from elsewhere)."""
        self.start = self.read = start
        self.count, self.first, self.last = 0, 0.0, 0.0

    def update(self, fake: Any, start: int) -> dict[str, Any]:
        if start != self.start:
            self.reset(start)
        new = fake.requests_since(self.read)
        self.read += len(new)
        for r in new:
            if r.status == 200:
                self.count += 1
                self.first = r.received_at if self.count == 1 else min(self.first, r.received_at)
                self.last = max(self.last, r.received_at)
        return {"count": self.count, "first": self.first, "last": self.last}


_tallies = {"apns": _Tally(), "fcm": _Tally()}


def _since(box: Sandbox, apns_from: int, fcm_from: int, ids: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"apns": _tallies["apns"].update(box.apns, apns_from),
                           "fcm": _tallies["fcm"].update(box.fcm, fcm_from)}
    if ids:
        apns = [r for r in box.apns.requests_since(apns_from) if r.status == 200]
        fcm = [r for r in box.fcm.requests_since(fcm_from) if r.status == 200]
        out["apns"]["ids"] = [[_object_id(r.payload.get("parley")), r.received_at] for r in apns]
        out["fcm"]["ids"] = [[_object_id((r.message.get("data") or {}).get("parley")), r.received_at] for r in fcm]
    return out


PAUSE_MIN = 0.010
_pauses: list[list[float]] = []
_collecting: list[float] = []


def _time_collections(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _collecting[:] = [time.time(), time.perf_counter()]
    elif _collecting:
        took = time.perf_counter() - _collecting[1]
        if took >= PAUSE_MIN:
            _pauses.append([_collecting[0], took, info["generation"]])


def _freeze_records() -> None:
    """Every second, move what the fakes hold (each recorded push and its payload) out of the collector's
    view: left in it, a full collection of a long run's records stops both fakes for 100 ms or more, a gap at
    the "provider" that the relay did not make. Records still go when cleared; cycles among them are never
    made."""
    while True:
        time.sleep(1.0)
        gc.freeze()


def main() -> None:
    gc.callbacks.append(_time_collections)
    threading.Thread(target=_freeze_records, name="freeze-records", daemon=True).start()
    box = Sandbox.start(Path(sys.argv[1]))
    print(json.dumps({"ready": True, "apns": box.apns.url, "fcm": box.fcm.url, "ca_file": box.apns.ca_file,
                      "key_id": box.apns_key.key_id, "team_id": box.apns_key.team_id}), flush=True)
    try:
        for line in sys.stdin:
            command = json.loads(line)
            name = command.get("cmd")
            if name == "config":
                answer: Any = box.config_dict()
            elif name == "mark":
                # Rows run one after another: forget the previous rows' records (and count anew), so that the
                # fakes' lists stay the size of one row.
                box.apns.clear()
                box.fcm.clear()
                for tally in _tallies.values():
                    tally.reset()
                answer = {"apns": 0, "fcm": 0}
            elif name == "since":
                answer = _since(box, int(command.get("apns", 0)), int(command.get("fcm", 0)),
                                bool(command.get("ids")))
            elif name == "pauses":
                answer = _pauses
            elif name == "delay":  # every answer of this platform's fake comes this many seconds late
                fake = box.apns if command.get("platform") == "apns" else box.fcm
                fake.set_delay(float(command.get("seconds", 0.0)))
                answer = {"platform": command.get("platform"), "delay": float(command.get("seconds", 0.0))}
            elif name == "quit":
                break
            else:
                answer = {"error": f"unknown command {name!r}"}
            print(json.dumps(answer), flush=True)
    finally:
        box.stop()


if __name__ == "__main__":
    main()
