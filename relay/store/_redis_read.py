"""Read-only queries of the Redis store: tracing (``deliveries``), dead letters, stats.

Nothing here writes: operator commands (``deliveries``, ``dead-letters list``, ``stats``) run these against
the store a live relay is using. The keys are described in :mod:`relay.store._redis_lua`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from typing import Any

from redis.asyncio.client import Redis

from relay.outcome import EndState, WaitReason
from relay.store._redis_lua import TOKEN_CAP, TRACE_CAP
from relay.store.base import DeadLetter, DeliveryRecord, Stats

Do = Callable[[Awaitable[Any]], Awaitable[Any]]  # the store's call wrapper (translates Redis exceptions)

SCAN_BACK = 2000  # without a filter, how many of the newest sequence numbers ``deliveries`` looks at
_RECORD = ("delivery_id", "token", "kind", "app", "state", "attempts", "reason", "wait", "received_at", "next_at",
           "finished_at", "rid", "mid")
_WAITS = frozenset(reason.value for reason in WaitReason)
_LETTER = ("token", "kind", "data", "reason", "received_at", "finished_at", "state")


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _opt(value: bytes | None) -> str | None:
    return None if value is None else _s(value)


def _record(seq: str, row: list[Any]) -> DeliveryRecord:
    (delivery_id, token, kind, app, state, attempts, reason, wait, received, next_at, finished, rid, mid) = [
        _opt(v) for v in row]
    pending = state == "pending"
    return DeliveryRecord(
        id=seq, delivery_id=delivery_id or "", token=token or "", kind=kind or "", app=app or None,
        state=state or "", attempts=int(attempts or 0), reason=reason or "",
        wait_reason=WaitReason(wait) if pending and wait in _WAITS else None,
        received_at=float(received or 0), next_at=float(next_at) if pending and next_at else None,
        finished_at=float(finished) if finished else None, request_id=rid or "", message_id=mid or None,
    )


async def deliveries(client: Redis, do: Do, prefix: str, *, token: str | None, request_id: str | None,
                     message_id: str | None, limit: int) -> list[DeliveryRecord]:
    """Recent deliveries matching every filter given, newest first (see ``Store.deliveries``)."""
    if limit <= 0:
        return []
    if token is not None:
        # The index, and the token's open queue: open deliveries whose index expired (or that predate it).
        async with client.pipeline(transaction=False) as pipe:
            pipe.lrange(f"{prefix}:t:{token}", 0, TOKEN_CAP - 1)
            pipe.lrange(f"{prefix}:q:{token}", 0, -1)
            recent, queued = await do(pipe.execute())
        seqs = sorted({_s(seq) for seq in [*recent, *queued]}, key=int, reverse=True)
    elif request_id:
        seqs = await do(client.zrevrange(f"{prefix}:r:{request_id}", 0, TRACE_CAP - 1))
    elif message_id:
        seqs = await do(client.zrevrange(f"{prefix}:m:{message_id}", 0, TRACE_CAP - 1))
    else:
        last = int(await do(client.get(f"{prefix}:seq")) or 0)
        seqs = [str(n) for n in range(last, max(0, last - SCAN_BACK), -1)]
    found: list[DeliveryRecord] = []
    step = max(limit, 100)
    for start in range(0, len(seqs), step):
        chunk = [_s(seq) for seq in seqs[start:start + step]]
        async with client.pipeline(transaction=False) as pipe:
            for seq in chunk:
                pipe.hmget(f"{prefix}:d:{seq}", _RECORD)
            rows = await do(pipe.execute())
        for seq, row in zip(chunk, rows, strict=True):
            if row[1] is None:
                continue  # expired (a finished delivery past keep_finished)
            record = _record(seq, row)
            if ((token is None or record.token == token) and (request_id is None or record.request_id == request_id)
                    and (message_id is None or record.message_id == message_id)):
                found.append(record)
                if len(found) == limit:
                    return found
    return found


async def dead_letters(client: Redis, do: Do, prefix: str, limit: int) -> list[DeadLetter]:
    """Dead letters, oldest first."""
    if limit <= 0:
        return []
    seqs = await do(client.zrange(f"{prefix}:dead", 0, limit - 1))
    letters = await _letters(client, do, prefix, [_s(seq) for seq in seqs])
    return [letter for letter in letters if letter is not None]


async def dead_letter(client: Redis, do: Do, prefix: str, seq: str) -> DeadLetter | None:
    """One dead letter with its payload, or None (no such delivery, or it did not end dead-lettered)."""
    if not seq.isdigit():
        return None
    (letter,) = await _letters(client, do, prefix, [seq])
    return letter


async def _letters(client: Redis, do: Do, prefix: str, seqs: list[str]) -> list[DeadLetter | None]:
    if not seqs:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for seq in seqs:
            pipe.hmget(f"{prefix}:d:{seq}", _LETTER)
        rows = await do(pipe.execute())
    letters: list[DeadLetter | None] = []
    for seq, (token, kind, data, reason, received, finished, state) in zip(seqs, rows, strict=True):
        if token is None or _opt(state) != EndState.DEAD_LETTER.value:
            letters.append(None)
            continue
        letters.append(DeadLetter(seq, _s(token), _s(kind), bytes(data or b""), _s(reason or b""),
                                  float(received), float(finished or 0)))
    return letters


async def stats(client: Redis, do: Do, prefix: str) -> Stats:
    """Counts by state, read in one transaction."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(f"{prefix}:counters")
        pipe.zcard(f"{prefix}:pending")
        pipe.zcard(f"{prefix}:inflight")
        pipe.hlen(f"{prefix}:deadtok")
        pipe.hlen(f"{prefix}:devices")
        raw, pending, inflight, dead, devices = await do(pipe.execute())
    counters = {_s(name): int(value) for name, value in raw.items()}
    return Stats(
        accepted=counters.get("accepted", 0),
        duplicates=counters.get("duplicates", 0),
        pending=int(pending),
        inflight=int(inflight),
        ended={end: counters.get(end.value, 0) for end in EndState},
        dead_tokens=int(dead),
        devices=int(devices),
        redelivered=counters.get("redelivered", 0),
    )


async def oldest_waiting(client: Redis, do: Do, prefix: str, apps: Collection[str]) -> dict[str, float]:
    """Arrival time of each app's oldest open delivery.

    A token's head is its oldest open delivery, and every head is in exactly one of its app's stream (due),
    schedules (waiting for a reason) or leases (claimed), so the lowest sequence number among them is the
    app's oldest; one round trip for every app's heads (O(waiting tokens)), one for their arrival times.
    """
    apps = list(apps)
    async with client.pipeline(transaction=False) as pipe:
        for app in apps:
            for reason in WaitReason:
                pipe.zrange(f"{prefix}:wait:{reason.value}:{app}", 0, -1)
            pipe.zrange(f"{prefix}:lease:{app}", 0, -1)
            pipe.xrange(f"{prefix}:stream:{app}")
        replies = await do(pipe.execute())
    per_app = len(WaitReason) + 2
    oldest: dict[str, str] = {}
    for n, app in enumerate(apps):
        seqs = [int(_s(m)) for reply in replies[n * per_app:(n + 1) * per_app - 1] for m in reply]
        seqs += [int(_s(fields[b"seq"])) for _entry, fields in replies[(n + 1) * per_app - 1] if b"seq" in fields]
        if seqs:
            oldest[app] = str(min(seqs))
    if not oldest:
        return {}
    async with client.pipeline(transaction=False) as pipe:
        for seq in oldest.values():
            pipe.hget(f"{prefix}:d:{seq}", "received_at")
        times = await do(pipe.execute())
    return {app: float(at) for app, at in zip(oldest, times, strict=True) if at is not None}
