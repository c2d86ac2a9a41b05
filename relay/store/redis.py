"""Redis store (scale-out): N relay instances share one queue, device overlay and dedupe keys.

The queue is one Redis Stream per app hint (plus one for deliveries without a hint), all with the consumer
group ``relay``; every delivering process is a consumer. Only each push token's oldest open delivery (its
*head*) is ever in a stream or in a schedule, so no two instances can hold two deliveries of one device:
per-device order holds across instances without partition leases (see :mod:`relay.store._redis_lua` for the
keys and the scripts). A claim reads each app's stream apart, so an app at its limit (``app_limits``) is
skipped without holding any of its entries, and its backlog never fills a claim another app needs.

A claimed entry stays in this consumer's pending list until a script records its end state or its retry
(``XACK`` and that record are one atomic step). While a delivery is in flight, a heartbeat renews the
entry's idle time; an instance that dies stops renewing, and after ``store.claim_idle`` seconds another
instance takes the entry over (``XAUTOCLAIM`` in its claims, or all at once in ``recover`` when it starts).
Fencing: finish/retry/heartbeat only act while this consumer still holds the entry, so a stalled instance
that wakes up late cannot disturb the new owner. ``open`` only connects: a store opened by an operator
command never becomes a consumer, never heartbeats and never takes anything over.

Every redis exception is translated here: unreachable -> :class:`StoreUnavailable`, else :class:`StoreError`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relay.config import StoreSettings
from relay.errors import StoreError, StoreUnavailable
from relay.observability import event
from relay.outcome import EndState, WaitReason
from relay.store import _redis_devices as devices
from relay.store import _redis_lua as lua
from relay.store import _redis_lua_admin as admin
from relay.store import _redis_read as read
from relay.store._redis_devices import RedisDevices
from relay.store.base import DeadLetter, DeliveryRecord, Enqueued, Job, NewDelivery, Pruned, Stats, Superseded

SOCKET_TIMEOUT = 5.0  # a webhook waits at most this long for Redis before it is answered 503
CONNECT_TIMEOUT = 2.0
MAX_CONNECTIONS = 64
REAP_AFTER = 3600.0  # a consumer with nothing pending, silent this long, is a dead instance: forget it
BATCH = 1000  # wake, recovery and migration work in atomic steps of this many deliveries
_SCRIPTS = {"ENQUEUE": lua, "CLAIM": lua, "FINISH": lua, "RETRY": lua, "WAKE": admin, "RETRY_DEAD": admin,
            "HEARTBEAT": admin, "RELEASE": admin, "RECOVER": admin, "LAPSED": admin, "REAP": admin,
            "MIGRATE": admin, **{name: devices for name in devices.SCRIPTS}}


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisStore(RedisDevices):
    """The scale-out store; see the module docstring for the model."""

    def __init__(self, settings: StoreSettings) -> None:
        self._url = settings.url
        self._prefix = settings.prefix
        self._idle = settings.claim_idle
        self._keep = settings.keep_finished
        # Unique per process: a restarted instance never mistakes a dead one's entries for its own.
        self.consumer = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._redis: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._held: dict[str, str] = {}  # seq -> stream entry of the deliveries this instance has in flight
        self._lease_ends: dict[str, float] = {}  # seq -> monotonic time after which its claim is not renewed
        self._beat: asyncio.Task[None] | None = None  # runs once this store delivers (recover or claim)

    def _key(self, name: str) -> str:
        return f"{self._prefix}:{name}"

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def _client(self) -> Redis:
        if self._redis is None:
            raise StoreUnavailable("redis store is closed")
        return self._redis

    async def _do(self, call: Any) -> Any:
        """Await a redis call, translating its exceptions (the store's one boundary)."""
        try:
            return await call
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis unreachable: {exc}") from exc
        except RedisError as exc:
            raise StoreError(f"redis: {exc}") from exc

    async def _script(self, name: str, *args: Any) -> Any:
        """Run a registered script; recreate the consumer groups once if Redis lost one."""
        script = self._scripts[name]
        try:
            return await self._do(script(args=[self._prefix, *args], client=self._client))
        except StoreError as exc:
            if not isinstance(exc.__cause__, ResponseError) or "NOGROUP" not in str(exc):
                raise
        await self._ensure_groups()
        return await self._do(script(args=[self._prefix, *args], client=self._client))

    async def _apps(self) -> list[str]:
        """The app hints that have a stream ("" = deliveries without a hint)."""
        return sorted(_s(app) for app in await self._do(self._client.smembers(self._key("apps"))))

    def _stream(self, app: str) -> str:
        return self._key("stream") + (f":{app}" if app else "")

    async def _ensure_groups(self) -> None:
        for app in {"", *await self._apps()}:
            try:
                await self._do(self._client.xgroup_create(self._stream(app), lua.GROUP, id="0", mkstream=True))
            except StoreError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and check that Redis answers; changes nothing (operator commands open the store too)."""
        # One retry on a broken connection (a pooled socket that died with a Redis restart); no retry on
        # timeouts, whose command may have run. Every script is safe to repeat (dedupe keys, fencing).
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url, max_connections=MAX_CONNECTIONS, timeout=SOCKET_TIMEOUT, socket_timeout=SOCKET_TIMEOUT,
            socket_connect_timeout=CONNECT_TIMEOUT, retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
            health_check_interval=30,
        )
        self._redis = Redis(connection_pool=pool)
        self._scripts = {name: self._redis.register_script(getattr(module, name)) for name, module in _SCRIPTS.items()}
        try:
            await self.ping()
        except StoreError:
            await self._disconnect()
            raise

    async def recover(self, now: float) -> int:
        """Take back what gone processes held; returns how many deliveries went back into their streams.

        Gone = its claims were not renewed for ``claim_idle`` (a live process heartbeats every third of
        it), or they are past their lease by ``now``; a live process's work is never touched. Also moves
        data of the one-stream layout (earlier versions) to this one, and forgets gone consumers that hold
        nothing.
        """
        self._delivering()
        while int(await self._script("MIGRATE", BATCH)):
            pass
        count = 0
        for app in await self._apps():
            cursor = "0-0"
            while True:
                cursor, moved = await self._script("RECOVER", self.consumer, int(self._idle * 1000), app, cursor,
                                                   BATCH)
                count += int(moved)
                cursor = _s(cursor)
                if cursor == "0-0":
                    break
            while (moved := int(await self._script("LAPSED", repr(now), app, BATCH))):
                count += moved
        await self._script("REAP", self.consumer, int(self._idle * 1000))
        return count

    def _delivering(self) -> None:
        """This store claims: start renewing its claims (operator stores never get here)."""
        if self._beat is None:
            self._beat = asyncio.get_running_loop().create_task(self._heartbeat_loop(), name="redis-store-heartbeat")

    async def close(self) -> None:
        if self._redis is None:
            return
        if self._beat is not None:
            self._beat.cancel()
            await asyncio.gather(self._beat, return_exceptions=True)
            self._beat = None
            held, self._held = self._held, {}
            self._lease_ends.clear()
            try:
                # Whatever the dispatcher abandoned goes back to the stream now, not after claim_idle.
                await self._script("RELEASE", self.consumer, *_pairs(held))
            except StoreError as exc:
                event(logging.WARNING, "redis store: in-flight work left for reclaim", error=str(exc),
                      count=len(held))
        await self._disconnect()

    async def _disconnect(self) -> None:
        client, self._redis = self._redis, None
        if client is not None:
            await client.aclose()
            await client.connection_pool.disconnect()

    async def ping(self) -> None:
        await self._do(self._client.ping())

    async def _heartbeat_loop(self) -> None:
        interval = max(self._idle / 3, 0.05)
        last_reap = 0.0
        failing = False
        while True:
            await asyncio.sleep(interval)
            try:
                await self.heartbeat()
                if time.monotonic() - last_reap > max(interval, 60.0):
                    last_reap = time.monotonic()
                    await self.prune(time.time())
                if failing:
                    event(logging.INFO, "redis store: heartbeat resumed")
                failing = False
            except StoreError as exc:
                if not failing:
                    event(logging.WARNING, "redis store: heartbeat failed", error=str(exc))
                failing = True

    async def heartbeat(self) -> None:
        """Renew the idle time of this instance's in-flight entries; forget those another instance took.

        A claim older than the dispatcher's ``lease`` is no longer renewed: a delivery that a bug left
        unrecorded becomes reclaimable instead of staying in flight for the life of the process.
        """
        now = time.monotonic()
        held = {seq: entry for seq, entry in self._held.items() if self._lease_ends.get(seq, now) >= now}
        if not held:
            return
        lost = await self._script("HEARTBEAT", self.consumer, repr(time.time()), *_pairs(held))
        for seq in lost:
            key = _s(seq)
            if self._held.get(key) == held.get(key):
                self._held.pop(key, None)
                self._lease_ends.pop(key, None)

    # -- the queue -------------------------------------------------------------------------------

    async def enqueue(self, items: Sequence[NewDelivery], now: float, dedupe_window: float) -> Enqueued:
        if not items:
            return Enqueued()
        args: list[Any] = [repr(now), repr(float(dedupe_window)), repr(float(self._keep))]
        for item in items:
            s = item.stream  # an event's stream, or three empty strings
            args += [item.dedupe_key, item.token, item.kind, item.data, repr(item.expires_at), str(uuid.uuid4()),
                     item.app or "", item.request_id, item.message_id or "",
                     *((s.key, s.fingerprint, repr(float(s.window))) if s else ("", "", ""))]
        flags, gone = await self._script("ENQUEUE", *args)
        return Enqueued([bool(flag) for flag in flags], [
            Superseded(_s(seq), _s(token), _s(app) or None, _s(rid), float(received), int(attempts))
            for seq, token, app, rid, received, attempts in gone])

    async def claim(self, limit: int, now: float, lease: float, *,
                    app_limits: Mapping[str, int] | None = None) -> list[Job]:
        # Two ways a claim is taken over: past its ``lease`` (by the callers' clock ``now``, as in SQLite),
        # or once its holder stopped renewing it for ``claim_idle`` (the heartbeat renews it for at most
        # ``lease`` seconds): the delay after a crash is bounded by claim_idle, not by the lease.
        if limit <= 0:
            return []
        self._delivering()
        caps = [item for app, cap in (app_limits or {}).items() for item in (app, max(0, int(cap)))]
        rows = await self._script("CLAIM", self.consumer, repr(now), limit, int(self._idle * 1000),
                                  repr(time.time()), repr(float(lease)), *caps)
        jobs = []
        lease_end = time.monotonic() + lease
        for seq, entry, delivery_id, token, kind, data, received, expires, attempts, app, rid, mid in rows:
            job = Job(_s(seq), _s(delivery_id), _s(token), _s(kind), bytes(data), float(received), float(expires),
                      int(attempts), app=_s(app) if app else None, request_id=_s(rid) if rid else "",
                      message_id=_s(mid) if mid else None)
            self._held[job.id] = _s(entry)
            self._lease_ends[job.id] = lease_end
            jobs.append(job)
        return sorted(jobs, key=lambda j: int(j.id))

    async def finish(self, job: Job, end: EndState, reason: str, now: float) -> None:
        entry = self._forget(job.id)
        if entry is None:
            return  # not (or no longer) ours: another instance reclaimed it, or it was recorded already
        await self._script("FINISH", self.consumer, job.id, entry, end.value, reason[:500], repr(now),
                           repr(float(self._keep)))

    async def retry(self, job: Job, at: float, reason: WaitReason, detail: str = "", *, app: str | None = None,
                    count_attempt: bool = True, now: float | None = None) -> EndState | None:
        """Put a claimed delivery back on its reason's schedule (``app`` None keeps the stored hint)."""
        wait = WaitReason(reason)  # a typed reason, never free text: the provider's words go in ``detail``
        entry = self._forget(job.id)
        if entry is None:
            return None
        done = await self._script("RETRY", self.consumer, job.id, entry, repr(at), wait.value, detail[:500],
                                  1 if count_attempt else 0, "0" if app is None else "1", app or "",
                                  repr(time.time() if now is None else now), repr(float(self._keep)))
        return EndState.SUPERSEDED if int(done) == 2 else None

    def _forget(self, seq: str) -> str | None:
        self._lease_ends.pop(seq, None)
        return self._held.pop(seq, None)

    async def wake(self, now: float, *, reasons: Collection[WaitReason] | None = None,
                   tokens: Collection[str] | None = None, apps: Collection[str] | None = None) -> int:
        """Move waiting heads straight into their streams (claimable at once); in atomic steps of BATCH."""
        chosen = [r.value for r in WaitReason] if reasons is None else sorted({WaitReason(r).value for r in reasons})
        if not chosen or (tokens is not None and not tokens) or (apps is not None and not apps):
            return 0
        args: list[Any] = [repr(now), BATCH, len(chosen), *chosen]
        args += [-1] if apps is None else [len(apps), *apps]
        woken = 0
        if tokens is not None:
            listed = list(tokens)
            for start in range(0, len(listed), BATCH):
                chunk = listed[start:start + BATCH]
                woken += int(await self._script("WAKE", *args, len(chunk), *chunk))
            return woken
        while True:
            count = int(await self._script("WAKE", *args, -1))
            woken += count
            if count < BATCH:
                return woken

    async def prune(self, now: float) -> Pruned:
        """Forget consumers of gone processes that hold nothing (one script: one slice, nothing more to do).

        Everything else bounds itself: a finished delivery's hash expires ``keep_finished`` after its end
        (a dead letter's stays until it is retried), dedupe keys expire with their window, tracing indexes
        are capped and expire, and stream entries are deleted when acknowledged.
        """
        reaped = int(await self._script("REAP", self.consumer, int(max(REAP_AFTER, self._idle * 10) * 1000)))
        return Pruned(reaped, more=False)

    async def next_due(self) -> float | None:
        """Earliest due time of a pending delivery; also when another instance's stalled work is reclaimable."""
        client = self._client
        async with client.pipeline(transaction=True) as pipe:
            pipe.zrange(self._key("pending"), 0, 0, withscores=True)
            pipe.zrange(self._key("inflight"), 0, len(self._held), withscores=True)
            pending, inflight = await self._do(pipe.execute())
        due = [float(score) for _, score in pending]
        # In-flight entries that are not ours belong to live instances (renewed) or dead ones (reclaimable
        # after claim_idle): waking then makes a survivor pick up a crashed instance's work promptly.
        foreign = [float(score) + self._idle for seq, score in inflight if _s(seq) not in self._held]
        return min(due + foreign[:1]) if due or foreign else None

    # -- tracing ---------------------------------------------------------------------------------

    async def deliveries(self, *, token: str | None = None, request_id: str | None = None,
                         message_id: str | None = None, limit: int = 50) -> list[DeliveryRecord]:
        return await read.deliveries(self._client, self._do, self._prefix, token=token, request_id=request_id,
                                     message_id=message_id, limit=limit)

    async def dead_letter(self, id: str) -> DeadLetter | None:
        return await read.dead_letter(self._client, self._do, self._prefix, id)

    # -- dead letters and stats --------------------------------------------------------------------

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await read.dead_letters(self._client, self._do, self._prefix, limit)

    async def retry_dead_letters(self, ids: Sequence[str] | None, now: float) -> int:
        if ids is None:
            return int(await self._script("RETRY_DEAD", repr(now), repr(float(self._keep)), "1"))
        bad = [i for i in ids if not str(i).isdigit()]
        if bad:
            raise StoreError(f"not a dead-letter id: {bad[0]!r}")
        if not ids:
            return 0
        return int(await self._script("RETRY_DEAD", repr(now), repr(float(self._keep)), "0", *ids))

    async def oldest_waiting(self, apps: Collection[str]) -> dict[str, float]:
        return await read.oldest_waiting(self._client, self._do, self._prefix, apps)

    async def stats(self) -> Stats:
        return await read.stats(self._client, self._do, self._prefix)

    async def summary(self) -> Stats:
        return await self.stats()  # every count is a set's cardinality: constant time already


def _pairs(held: dict[str, str]) -> list[str]:
    return [item for seq, entry in held.items() for item in (seq, entry)]
