"""The HTTP/2 side of the APNs provider: aioapns' client protocol with the fixes a long-running relay needs.

Each fix is listed in :mod:`relay.providers.apns` (receive window given back, request bodies that wait for
the server's window, answers resolved on END_STREAM with status, reason and ``retry-after``, no Huffman
coding, answers matched by stream id and a given-up stream reset). Connections of this class are made by the
provider's pools; nothing here knows about apps.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import time
from typing import Any

from aioapns.common import NotificationRequest, NotificationResult
from aioapns.connection import APNsBaseClientProtocol
from aioapns.exceptions import ConnectionClosed
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    RemoteSettingsChanged,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    WindowUpdated,
)
from h2.exceptions import H2Error, NoAvailableStreamIDError
from hpack import Encoder, NeverIndexedHeaderTuple

from relay.providers.retry_after import parse_retry_after


class _Result(NotificationResult):
    __slots__ = ("retry_after",)

    def __init__(self, notification_id: str, status: str, reason: str | None, timestamp: int | None,
                 retry_after: float | None) -> None:
        super().__init__(notification_id, status, reason, timestamp)
        self.retry_after = retry_after


class _PlainEncoder(Encoder):
    """HPACK without Huffman coding: pure-Python Huffman was a tenth of a push's CPU for a few bytes saved."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)


class StreamSlots:
    """The streams a connection may open: the server's ``MAX_CONCURRENT_STREAMS`` less those open, FIFO.

    Replaces aioapns' ``ChannelPool``, an ``asyncio.Semaphore`` whose count went negative when the server lowered
    its limit below the streams open (Apple lowers it to 1 after a refused push): asyncio then let every new
    stream through, past the limit, and a limit raised again was clamped to the lowered one.
    """

    def __init__(self, bound: int) -> None:
        self._bound = bound
        self._open = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._stream_id = -1
        self._error: BaseException | None = None

    @property
    def bound(self) -> int:
        return self._bound

    @bound.setter
    def bound(self, value: int) -> None:  # the server's SETTINGS (aioapns' on_remote_settings_changed)
        self._bound = value
        self._wake()

    @property
    def is_busy(self) -> bool:
        return self._open >= self._bound

    async def acquire(self) -> int:
        """The id of a new stream, once one may be opened (raises what :meth:`destroy` was given)."""
        while self._error is None and (self._open >= self._bound or self._waiters):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                    self._wake()  # woken, then cancelled: the slot it was woken for goes to the next one
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if self._open < self._bound:
                break
        if self._error is not None:
            raise self._error
        self._stream_id += 2
        if self._stream_id > H2Connection.HIGHEST_ALLOWED_STREAM_ID:
            raise NoAvailableStreamIDError()
        self._open += 1
        if self._waiters and self._open < self._bound:
            self._wake()  # a send queued behind this one while it was being woken may have room too
        return self._stream_id

    def release(self) -> None:
        """A stream ended (answered, failed or reset)."""
        self._open = max(0, self._open - 1)
        self._wake()

    def destroy(self, exc: BaseException) -> None:
        """The connection is gone: waiting and later acquires raise ``exc``."""
        self._error = exc
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    def _wake(self) -> None:
        free = self._bound - self._open
        for waiter in self._waiters:
            if free <= 0:
                break
            if not waiter.done():
                waiter.set_result(None)
                free -= 1


class RelayProtocol(APNsBaseClientProtocol):
    """aioapns' protocol with stream-level response handling and flow control in both directions."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._responses: dict[int, dict[str, Any]] = {}
        self._pending: dict[int, asyncio.Future[NotificationResult]] = {}  # by stream id
        self._window_waiters: list[asyncio.Future[None]] = []
        self._flush_pending = False
        self.free_channels = StreamSlots(self.free_channels.bound)  # type: ignore[assignment]
        # Set once the server's first SETTINGS frame is read: its stream limit is known (see ``settings_known``).
        self._settings_known: asyncio.Future[None] = self.loop.create_future()
        # The request headers are built here from validated values, lowercase and trimmed; h2 re-checking and
        # re-normalizing each one on every push was ~10 % and then ~8 % of the dispatcher's CPU in the drain
        # profiles (bench/README.md). What normalizing did that matters is done below: authorization is never
        # indexed, as h2 would have made it.
        self.conn.config.validate_outbound_headers = False
        self.conn.config.normalize_outbound_headers = False
        # Nor are the answers' headers checked one by one (about 5 % of the dispatcher's CPU): only ``:status``,
        # ``apns-id`` and ``retry-after`` are read, and a missing or odd one is handled where it is read.
        self.conn.config.validate_inbound_headers = False
        self.conn.config.normalize_inbound_headers = False
        self.conn.encoder = _PlainEncoder()  # before any header block, so both tables start empty alike

    async def settings_known(self) -> None:
        """Wait for the server's first SETTINGS frame: a stream opened before it may exceed a limit the server
        already enforces (Apple's, or one lowered after a refused push); raises ``ConnectionClosed`` if the
        connection is lost first."""
        await asyncio.shield(self._settings_known)

    async def send_notification(self, request: NotificationRequest) -> NotificationResult:
        """aioapns' request, but waiting for the server's flow-control window instead of raising.

        aioapns writes the body at once and raises FlowControlError when thousands of requests in flight
        exceed the window the server granted, leaving the stream half-open.
        """
        stream_id = await self.free_channels.acquire()
        # Values unique to each push are not added to HPACK's dynamic table: they would only evict the
        # ones that repeat (topic, authorization) and cost an insertion per request.
        headers: list[Any] = [
            (":method", "POST"), (":scheme", "https"),
            NeverIndexedHeaderTuple(":path", f"/3/device/{request.device_token}"),
            ("host", self.APNS_SERVER), NeverIndexedHeaderTuple("apns-id", request.notification_id),
            ("apns-topic", request.apns_topic or self.apns_topic),
        ]
        if request.time_to_live is not None:
            headers.append(NeverIndexedHeaderTuple("apns-expiration", str(int(time.time()) + request.time_to_live)))
        if request.priority is not None:
            headers.append(("apns-priority", str(request.priority)))
        if request.collapse_key is not None:
            headers.append(("apns-collapse-id", request.collapse_key))
        if request.push_type is not None:
            headers.append(("apns-push-type", request.push_type.value))
        if self.auth_provider is not None:
            headers.append(NeverIndexedHeaderTuple("authorization", self.auth_provider.get_header()))
        message: Any = request.message  # the pre-encoded body (bytes) from translate, or a dict
        body = message if isinstance(message, bytes) else json.dumps(message, ensure_ascii=False).encode()
        future: asyncio.Future[NotificationResult] = self.loop.create_future()
        # Answers are matched by stream id, never by apns-id: a retry reuses its notification's apns-id, and on
        # the same connection the given-up stream's late answer would otherwise resolve the retry.
        self._pending[stream_id] = future
        try:
            self.conn.send_headers(stream_id=stream_id, headers=headers)
            while self.conn.local_flow_control_window(stream_id) < len(body):
                self.flush()
                waiter: asyncio.Future[None] = self.loop.create_future()
                self._window_waiters.append(waiter)
                await waiter
            self.conn.send_data(stream_id=stream_id, data=body, end_stream=True)
            self._flush_soon()
            return await future
        except BaseException:  # cancelled (the send timeout), or the connection failed under us
            self._abandon(stream_id)
            raise

    def _abandon(self, stream_id: int) -> None:
        """Given up (the send timeout), before or after the body left: reset the stream (RST_STREAM CANCEL), so
        that APNs stops working on it, its late answer is never read, and its slot is free again."""
        if self._pending.pop(stream_id, None) is None:
            return  # already answered or failed
        self._responses.pop(stream_id, None)
        self.free_channels.release()
        with contextlib.suppress(H2Error):
            self.conn.reset_stream(stream_id, error_code=ErrorCodes.CANCEL)
        if self.transport is not None and not self.transport.is_closing():
            self.flush()

    def _flush_soon(self) -> None:
        """Write what h2 has to send at the end of this loop turn: the pushes a claim round starts in one turn
        leave in one TLS write (and one inactivity-timer reset) instead of one each."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        if self.transport is not None and not self.transport.is_closing():
            self.flush()

    def _window_changed(self, exc: Exception | None = None) -> None:
        waiters, self._window_waiters = self._window_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except H2Error:
            self.close()
            return
        for event in events:
            if isinstance(event, ResponseReceived):
                headers = {k.decode() if isinstance(k, bytes) else k: v.decode() if isinstance(v, bytes) else v
                           for k, v in event.headers or ()}
                self._responses[event.stream_id] = {"headers": headers, "body": bytearray()}
            elif isinstance(event, DataReceived):
                # The fix: give the window back, or ~64 KiB of error bodies stall the connection for good.
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_id in self._responses and event.data:
                    self._responses[event.stream_id]["body"] += event.data
            elif isinstance(event, StreamEnded):
                self._complete(event.stream_id)
            elif isinstance(event, StreamReset):
                self._fail(event.stream_id, ConnectionClosed(f"stream reset: {event.error_code}"))
            elif isinstance(event, WindowUpdated):
                self._window_changed()
            elif isinstance(event, RemoteSettingsChanged):
                self.on_remote_settings_changed(event.changed_settings)  # type: ignore[arg-type]
                self._window_changed()
                if not self._settings_known.done():
                    self._settings_known.set_result(None)
            elif isinstance(event, ConnectionTerminated):
                self.on_connection_terminated(event)
        if self.transport is not None and not self.transport.is_closing():
            self.flush()

    def _complete(self, stream_id: int) -> None:
        response = self._responses.pop(stream_id, None)
        future = self._pending.pop(stream_id, None)
        if future is None:
            return  # a stream we reset (its slot was freed then)
        self.free_channels.release()
        if future.done() or response is None:
            return
        headers = response["headers"]
        reason = timestamp = None
        if response["body"]:
            try:
                doc = json.loads(bytes(response["body"]))
                reason, timestamp = doc.get("reason"), doc.get("timestamp")
            except (ValueError, AttributeError):
                reason = "UnparsableResponse"
        retry_after = parse_retry_after(headers.get("retry-after"))
        future.set_result(_Result(headers.get("apns-id", ""), headers.get(":status", "0"), reason, timestamp,
                                  retry_after))

    def _fail(self, stream_id: int, exc: Exception) -> None:
        self._responses.pop(stream_id, None)
        future = self._pending.pop(stream_id, None)
        if future is None:
            return
        self.free_channels.release()
        if not future.done():
            future.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        for stream_id in list(self._pending):
            self._fail(stream_id, ConnectionClosed(str(exc)))
        self._window_changed(ConnectionClosed(str(exc)))
        if not self._settings_known.done():
            self._settings_known.set_exception(ConnectionClosed(str(exc)))
            self._settings_known.exception()  # read here: nobody may be waiting for it any more
        super().connection_lost(exc)  # aioapns' own request table is unused (empty): it fails nothing twice

    def close(self) -> None:
        if self.inactivity_timer:
            self.inactivity_timer.cancel()
        if self.transport is not None:
            self.transport.close()

