"""One device connection: a bounded send queue drained by the connection's own writer.

Fan-out calls :meth:`Client.send`, which never awaits: it writes the frame's shared
bytes straight to the socket when it can (see ``FastWriter``), or appends the encoded
frame to this connection's queue. A connection whose queue is full is a slow consumer
and is closed with 4008; it resumes from the ledger when it reconnects, so closing it
loses nothing and never delays other connections.

The writer is a task only while there is something to write: :meth:`Client.send`
starts it when a frame is queued (once :meth:`Client.start` said the connection is
open) and it ends when the queue is empty. An idle connection holds no writer task,
no queue and no future.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Protocol

from channels.disconnect import SLOW, Disconnect
from channels.frames import Delivery, wire_text
from channels.limits import TokenBucket

log = logging.getLogger("courier.client")

CLOSE_TIMEOUT = 5.0
"""Seconds a closing connection may take to flush its close frame before it is dropped."""

WRITE_AT_ONCE = 64 * 1024
"""Bytes of queued frames the writer joins into one write while the socket takes data."""


class Sink(Protocol):
    """Where a connection's frames go: a Starlette ``WebSocket`` in production."""

    async def send_text(self, data: str) -> None: ...

    async def close(self, code: int = 1000, reason: str | None = None) -> None: ...


class FastWriter(Protocol):
    """The transport's door for pre-encoded frames (``courier serve`` provides one per
    connection, see ``server/transport.py``): bytes of a whole WebSocket frame, built once
    per event, written straight into the connection's socket buffer."""

    def fast_ready(self) -> bool:
        """Open, not closing, not paused by flow control, and no extension (deflate) that
        would make this connection's bytes differ from the shared ones."""
        ...

    def fast_write(self, wire: bytes) -> None: ...

    on_text: Callable[[bytes], bool] | None
    """Set by the app: offered every text message from the peer before the ASGI path;
    answers True if it handled the message (then it never reaches ``receive``)."""


SentHook = Callable[["Client", int, int], None]
"""Called after a frame of an event is written: ``(client, seq, created_at_ms or 0)``."""

CloseHook = Callable[["Client", Disconnect], None]
"""Called once when the server decides to close the connection."""


class Client:
    __slots__ = (
        "_abort_timer",
        "_drained",
        "_fast",
        "_inflight",
        "_on_close",
        "_on_sent",
        "_queue",
        "_sink",
        "_started",
        "aborted",
        "acked",
        "budget",
        "catch_up_task",
        "catching_up",
        "closed",
        "conn_id",
        "connected_at",
        "device",
        "disconnect",
        "max_queue",
        "owner",
        "pending",
        "pending_overflow",
        "position",
        "sent_noted",
        "sent_seq",
        "user",
        "writer_task",
    )

    def __init__(
        self,
        sink: Sink,
        user: str,
        device: str,
        conn_id: str,
        *,
        max_queue: int,
        on_sent: SentHook | None = None,
        on_close: CloseHook | None = None,
        rate: float = 50.0,
        rate_burst: int = 200,
        budget: TokenBucket | None = None,
        fast: FastWriter | None = None,
    ) -> None:
        self._sink = sink
        self._fast = fast
        self._inflight = False  # the writer took a frame off the queue and has not written it
        self._started = False  # the sink is open: queued frames may be written
        self.user = user
        self.device = device
        self.conn_id = conn_id
        self.connected_at = time.time_ns() // 1_000_000
        self.max_queue = max_queue
        self._on_sent = on_sent
        self._on_close = on_close
        # Frames waiting for the writer; made when needed and let go once empty (an idle
        # connection holds no deque).
        self._queue: deque[tuple[int, int, str]] | None = None
        # Made only while someone waits (no per-connection Event objects): catch-up's wait
        # for the queue to drain.
        self._drained: asyncio.Future[None] | None = None
        self._abort_timer: asyncio.TimerHandle | None = None
        # Delivery position in the user's stream: every event with seq <= position
        # that this device should get has been queued (or deliberately skipped).
        self.position = 0
        self.acked = 0
        self.sent_seq = 0
        self.sent_noted = 0  # the sent_seq last handed to the node's cursor buffer
        # While catching up from the ledger, live deliveries wait in ``pending``.
        self.catching_up = True
        self.pending: list[Delivery] | None = None
        self.pending_overflow = False
        self.catch_up_task: asyncio.Task[None] | None = None
        self.writer_task: asyncio.Task[None] | None = None  # only while writing
        # The task that serves the connection (reads its frames); cancelled with the writer
        # when the peer does not take even the close frame (``aborted`` is then True).
        self.owner: asyncio.Task[None] | None = None
        self.aborted = False
        self.disconnect: Disconnect | None = None
        self.closed = False
        # Frames from the device; shared with its WebSocket pings when the transport
        # provides the bucket (``courier serve`` does).
        self.budget = budget if budget is not None else TokenBucket(rate, rate_burst)

    @property
    def queued(self) -> int:
        return 0 if self._queue is None else len(self._queue)

    def send(self, frame: str, seq: int = 0, created_at: int = 0, wire: bytes = b"") -> bool:
        """Send a frame without waiting. False if the connection is closing or just overflowed.

        With a fast writer and ``wire`` (the frame's bytes on the wire, shared by every
        connection), a connection with nothing queued whose socket takes data gets the bytes
        at once: no queue, no wake-up of its writer, and ``sent_seq`` is ``seq`` on return;
        the caller accounts for such frames (in bulk), ``on_sent`` is not called. Otherwise
        the frame is queued, in order, and the writer sends it when the socket drains.
        """
        if self.closed:
            return False
        fast = self._fast
        if (
            wire
            and fast is not None
            and not self._queue
            and not self._inflight
            and fast.fast_ready()
        ):
            fast.fast_write(wire)
            if seq:
                self.sent_seq = seq
            return True
        queue = self._queue
        if queue is None:
            queue = self._queue = deque()
        elif len(queue) >= self.max_queue:
            self.close(SLOW)
            return False
        queue.append((seq, created_at, frame))
        self._ensure_writer()
        return True

    def start(self) -> None:
        """The sink is open: write what was queued meanwhile, and from now on whenever
        something is queued (or the connection is closed: then the close frame)."""
        self._started = True
        if self._queue or self.closed:
            self._ensure_writer()

    def _ensure_writer(self) -> None:
        if self.writer_task is None and self._started:
            self.writer_task = asyncio.get_running_loop().create_task(self._write())

    def close(self, disconnect: Disconnect) -> None:
        """Close with ``disconnect``: queued frames are dropped (the ledger has them)."""
        if self.closed:
            return
        self.closed = True
        self.disconnect = disconnect
        if self._queue is not None:
            self._queue.clear()  # the writer may be iterating it: it stops at once
            self._queue = None
        _resolve(self._drained)
        self._abort_timer = asyncio.get_running_loop().call_later(CLOSE_TIMEOUT, self._abort)
        self._ensure_writer()  # for the close frame
        if self._on_close is not None:
            self._on_close(self, disconnect)

    async def wait_drained(self) -> None:
        """Wait until the writer has written everything queued (or the connection closed).

        Catch-up uses this between backfill pages so that a long backlog flows at the
        socket's pace instead of overflowing the queue.
        """
        if self.closed or (not self._queue and not self._inflight):
            return
        if self._drained is None or self._drained.done():
            self._drained = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._drained)  # one waiter cancelled leaves the others waiting

    def _abort(self) -> None:
        # The peer did not take even the close frame (it stopped reading): give up on it.
        log.info("connection %s: peer stopped reading, dropping it", self.conn_id)
        self._drop()

    def _drop(self) -> None:
        """End the connection's tasks (the writer and the one reading it) as a drop."""
        self.aborted = True
        current = asyncio.current_task()
        for task in (self.writer_task, self.owner):
            if task is not None and task is not current and not task.done():
                task.cancel()

    def allow_frame(self) -> bool:
        """Charge one frame from the device to its budget (``rate`` per second, ``rate_burst``
        at once); False when it is spent."""
        return self.budget.take()

    def _sent(self, seq: int, created_at: int) -> None:
        if seq:
            self.sent_seq = seq
            if self._on_sent is not None:
                self._on_sent(self, seq, created_at)

    def _write_at_once(self, fast: FastWriter, queue: deque[tuple[int, int, str]]) -> None:
        """Queued frames, up to ``WRITE_AT_ONCE`` bytes of them, written in one write: a
        device catching up gets its backlog in a few system calls, not one per event."""
        wires: list[bytes] = []
        size = 0
        while queue and size < WRITE_AT_ONCE:
            seq, created_at, frame = queue.popleft()
            wire = wire_text(frame.encode())
            wires.append(wire)
            size += len(wire)
            self._sent(seq, created_at)
        fast.fast_write(wires[0] if len(wires) == 1 else b"".join(wires))

    async def _write(self) -> None:
        """Write queued frames in order until the queue is empty, and the close frame once
        closed. The task ends then; :meth:`send` starts another for the next frame."""
        sink = self._sink
        try:
            fast = self._fast
            queue = self._queue
            while queue:  # ``close`` empties it: the loop stops after the frame in flight
                if fast is not None and fast.fast_ready():
                    # The socket takes data: what is queued goes straight in, many frames
                    # in one write (flow control makes ``fast_ready`` False past the
                    # high-water mark, and the rest waits for the drain below).
                    self._write_at_once(fast, queue)
                    continue
                seq, created_at, frame = queue.popleft()
                self._inflight = True
                await sink.send_text(frame)
                self._inflight = False
                self._sent(seq, created_at)
            _resolve(self._drained)
            if not self.closed:
                self._queue = None  # an idle connection holds no deque
                self.writer_task = None
                return
            assert self.disconnect is not None
            await sink.close(self.disconnect.code, self.disconnect.reason)
            if self._abort_timer is not None:
                self._abort_timer.cancel()
        except Exception as exc:  # the sink is gone under us (the peer went away mid-write)
            log.info("connection %s: write failed (%s), dropping it", self.conn_id, exc)
            self.closed = True
            if self._abort_timer is not None:
                self._abort_timer.cancel()
            self._drop()


def _resolve(waiter: asyncio.Future[None] | None) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(None)
