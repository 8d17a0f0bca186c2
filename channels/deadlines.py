"""Many deadlines on one event-loop timer.

Every open connection has deadlines: its token's expiry, its next heartbeat ping, the
pong it waits for. Each ``loop.call_later`` costs a timer handle, the event loop's own
timer and a copy of the context, about 550 bytes and five objects that every full
garbage collection walks; at 10,000 connections that is megabytes and a longer pause.

``Deadlines`` keeps them in buckets of ``tick`` seconds instead, with ONE loop timer
armed for the earliest bucket. Guarantees:

* A callback never runs before its time, and at most ``tick`` seconds after it (plus
  whatever else the loop is busy with, as with ``call_later``).
* Callbacks due in the same bucket run in the order they were added.
* ``Deadline.cancel()`` removes the entry at once: a cancelled deadline holds no
  reference to its callback or to whatever the callback holds.
* A callback that raises is logged and does not stop the others.

``for_loop()`` gives the one instance of the running event loop.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import weakref
from collections.abc import Callable

log = logging.getLogger("courier.deadlines")

TICK = 0.05
"""Seconds per bucket: how late, at most, a deadline may run."""


class Deadline:
    """One pending callback; ``cancel()`` like an ``asyncio.TimerHandle``."""

    __slots__ = ("_bucket", "callback")

    def __init__(self, callback: Callable[[], object], bucket: dict[Deadline, None]) -> None:
        self.callback: Callable[[], object] | None = callback
        self._bucket: dict[Deadline, None] | None = bucket

    def cancel(self) -> None:
        if self._bucket is not None:
            self._bucket.pop(self, None)
            self._bucket = None
        self.callback = None

    def cancelled(self) -> bool:
        return self.callback is None


class Deadlines:
    def __init__(self, loop: asyncio.AbstractEventLoop, tick: float = TICK) -> None:
        self._loop = loop
        self._tick = tick
        # bucket number -> its deadlines (a dict keeps insertion order and removes in O(1))
        self._buckets: dict[int, dict[Deadline, None]] = {}
        self._keys: list[int] = []  # heap of bucket numbers, some possibly emptied
        self._timer: asyncio.TimerHandle | None = None
        self._armed_for = 0

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def call_later(self, delay: float, callback: Callable[[], object]) -> Deadline:
        return self.call_at(self._loop.time() + max(0.0, delay), callback)

    def call_at(self, when: float, callback: Callable[[], object]) -> Deadline:
        """Run ``callback`` at loop time ``when`` (rounded up to the next tick)."""
        key = math.ceil(when / self._tick)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = {}
            heapq.heappush(self._keys, key)
            if self._timer is None or key < self._armed_for:
                self._arm(key)
        deadline = Deadline(callback, bucket)
        bucket[deadline] = None
        return deadline

    def _arm(self, key: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_for = key
        self._timer = self._loop.call_at(key * self._tick, self._fire)

    def _fire(self) -> None:
        self._timer = None
        now = self._loop.time()
        keys = self._keys
        while keys and keys[0] * self._tick <= now:
            bucket = self._buckets.pop(heapq.heappop(keys), None)
            if not bucket:
                continue
            for deadline in list(bucket):
                callback = deadline.callback
                deadline.callback = deadline._bucket = None
                if callback is None:
                    continue
                try:
                    callback()
                except Exception:
                    log.exception("deadline callback %r failed", callback)
        if keys:
            self._arm(keys[0])


_WHEELS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = (
    weakref.WeakKeyDictionary()
)


def for_loop(loop: asyncio.AbstractEventLoop | None = None) -> Deadlines:
    """The ``Deadlines`` of ``loop`` (default: the running loop), made on first use."""
    loop = loop or asyncio.get_running_loop()
    wheel = _WHEELS.get(loop)
    if wheel is None:
        wheel = _WHEELS[loop] = Deadlines(loop)
    return wheel
