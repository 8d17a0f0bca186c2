"""The node's outgoing bus traffic, coalesced: one ``publish_many`` in flight at a time.

Every message a node puts on the bus (event deliveries after a ledger commit, and
the announcements that enforce one connection per device) goes through one
``Outbox``. Whatever is queued while a publish is in flight goes out in the next
one, as a single pipeline, in the order it was queued. A connect storm of
thousands of phones is therefore a handful of pipelines on one Redis connection,
never thousands of concurrent commands racing for pooled connections.

Guarantees:

* Order: messages leave in the order they were queued, across callers.
* ``send(..., wait=True)`` answers once its messages were written (or raises the
  bus error). Event deliveries use it; the events are durable already, so a failure
  only means devices catch up from the ledger.
* ``retry=True`` messages (device announcements, which nothing else would repeat)
  are kept and re-sent with backoff after a failure, for up to ``retry_seconds``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from channels.broker import Broker

log = logging.getLogger("courier.outbox")

MAX_BATCH = 5000
"""Messages per ``publish_many`` (one pipeline)."""


@dataclass(slots=True)
class _Message:
    channel: str
    payload: bytes
    retry_until: float  # 0: not retried
    done: asyncio.Future[None] | None  # set on the last message of a waiting ``send``


class Outbox:
    def __init__(
        self,
        broker: Broker,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        *,
        retry_seconds: float = 60.0,
        backoff: Callable[[int], float] = lambda attempt: min(5.0, 0.1 * 2**attempt),
    ) -> None:
        self.broker = broker
        self._spawn = spawn
        self.retry_seconds = retry_seconds
        self._backoff = backoff
        self._queue: deque[_Message] = deque()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        """Pipelines written (a measure of coalescing)."""

    def __len__(self) -> int:
        return len(self._queue)

    def send(
        self, messages: Sequence[tuple[str, bytes]], *, retry: bool = False, wait: bool = False
    ) -> asyncio.Future[None] | None:
        """Queue ``messages``; with ``wait`` answers a future resolved once they are written."""
        if not messages:
            return None
        loop = asyncio.get_running_loop()
        until = loop.time() + self.retry_seconds if retry else 0.0
        done = loop.create_future() if wait else None
        for i, (channel, payload) in enumerate(messages):
            last = i == len(messages) - 1
            self._queue.append(_Message(channel, payload, until, done if last else None))
        if self._task is None or self._task.done():
            self._task = self._spawn(self._run())
        return done

    async def _run(self) -> None:
        attempt = 0
        loop = asyncio.get_running_loop()
        while self._queue:
            n = min(len(self._queue), MAX_BATCH)
            batch = [self._queue.popleft() for _ in range(n)]
            try:
                await self.broker.publish_many([(m.channel, m.payload) for m in batch])
            except Exception as exc:
                attempt += 1
                now = loop.time()
                keep = [m for m in batch if m.retry_until > now]
                for m in batch:
                    if m.done is not None and not m.done.done():
                        m.done.set_exception(exc)
                        m.done.exception()  # retrieved: the caller may have gone away
                dropped = len(batch) - len(keep) - sum(1 for m in batch if not m.retry_until)
                log.warning(
                    "bus publish of %d messages failed (%s); %d kept for retry%s",
                    len(batch),
                    exc,
                    len(keep),
                    f", {dropped} announcements given up" if dropped else "",
                )
                if keep:
                    for m in reversed(keep):
                        m.done = None
                        self._queue.appendleft(m)
                    await asyncio.sleep(self._backoff(attempt))
                continue
            attempt = 0
            self.batches += 1
            for m in batch:
                if m.done is not None and not m.done.done():
                    m.done.set_result(None)
