"""The delivery side of tracing (SPEC §8): one INFO line per retry or wait and per delivery end.

Each line carries what an operator needs to follow one webhook (its ``request_id``, logged again by the webhook
line that accepted it) through every attempt: app, shortened token, attempt, the provider's status and reason,
and the latency since acceptance. Never a whole token, never a payload. Routine lines (sent, waits) share the
process's line budget (:class:`~relay.observability.LineBudget`); every other end is always written.
"""

from __future__ import annotations

import logging
from typing import Any

from relay.observability import Metrics, event, log, short_token, trace_budget
from relay.outcome import EndState, WaitReason
from relay.store.base import Job, Superseded


def _fields(job: Job, app: str | None, now: float, status: int | None, reason: str) -> dict[str, Any]:
    fields: dict[str, Any] = {"request_id": job.request_id or "-"}
    if job.message_id is not None:
        fields["message_id"] = job.message_id
    fields.update(app=app or "-", token=short_token(job.token), attempt=job.attempts + 1,
                  status=status if status is not None else "-", reason=reason[:200] or "-",
                  latency=round(max(0.0, now - job.received_at), 3))
    return fields


_ROUTINE = {EndState.SENT: "delivery sent", EndState.SUPERSEDED: "delivery superseded"}  # no action called for


def delivery_ended(job: Job, end: EndState, app: str | None, now: float, status: int | None, reason: str) -> None:
    """``delivery ended state=...``: the one line that closes a delivery's trace."""
    # per push: build the fields only when they are written; a routine end (sent, superseded) asks the line budget
    if log.isEnabledFor(logging.INFO) and (end not in _ROUTINE or trace_budget.allow(_ROUTINE[end])):
        event(logging.INFO, "delivery ended", state=end.value, **_fields(job, app, now, status, reason))


def ended_in_store(metrics: Metrics, job: Job, end: EndState, app: str | None, platform: str | None, now: float,
                   status: int | None) -> None:
    """The store ended a delivery it was asked to put back (a later event of its stream arrived while it was in
    flight: ``superseded``): counted and traced like any end."""
    metrics.child(metrics.ended, platform or "none", app or "none", job.kind, end.value).inc()
    delivery_ended(job, end, app, now, status, "superseded by a later event while in flight")


def delivery_superseded(ended: Superseded, now: float, by_request: str) -> None:
    """``delivery ended state=superseded``: a queued event a later one replaced (at acceptance, no provider)."""
    if log.isEnabledFor(logging.INFO) and trace_budget.allow(_ROUTINE[EndState.SUPERSEDED]):
        event(logging.INFO, "delivery ended", state=EndState.SUPERSEDED.value, request_id=ended.request_id or "-",
              app=ended.app or "-", token=short_token(ended.token), attempt=ended.attempts, status="-",
              reason=f"superseded by a later event (request {by_request})",
              latency=round(max(0.0, now - ended.received_at), 3))


def delivery_waits(job: Job, wait: WaitReason, at: float, app: str | None, now: float, status: int | None,
                   reason: str) -> None:
    """``delivery waits wait=retry retry_in=...``: put back until ``at`` for a typed reason."""
    if log.isEnabledFor(logging.INFO) and trace_budget.allow("delivery waits"):
        event(logging.INFO, "delivery waits", wait=wait.value, retry_in=round(max(0.0, at - now), 3),
              **_fields(job, app, now, status, reason))


def delivery_error(job: Job, exc: BaseException, app: str | None, at: float, now: float) -> None:
    """An unexpected exception in delivery: logged with its type, the delivery retried with backoff.

    Only the type: an exception's message may quote a token or a payload, which never reach the log.
    """
    event(logging.ERROR, "delivery failed unexpectedly, retrying", error_type=type(exc).__name__,
          wait=WaitReason.RETRY.value, retry_in=round(max(0.0, at - now), 3),
          **_fields(job, app, now, None, "unexpected error"))
