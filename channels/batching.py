"""Coalescing of many small ledger reads into a few large ones.

A reconnect storm is thousands of phones asking the ledger the same kind of question
at once ("what did I miss?"). Asked one by one, each is a transaction and a pooled
connection, and the pool runs dry. A ``Coalescer`` answers them in batches instead:
one batch call at a time, and every request made while it is in flight goes into the
next one. Requests queue, they are never refused.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class Coalescer(Generic[K, V]):
    def __init__(
        self,
        call: Callable[[list[K]], Awaitable[list[V]]],
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        *,
        max_batch: int,
    ) -> None:
        """``call`` answers a list of requests with one answer each, in their order."""
        self._call = call
        self._spawn = spawn
        self.max_batch = max_batch
        self._queue: deque[tuple[K, asyncio.Future[V]]] = deque()
        self._task: asyncio.Task[None] | None = None
        self.calls = 0
        """Batch calls made (with ``requests``, a measure of coalescing)."""
        self.requests = 0

    async def __call__(self, request: K) -> V:
        """The answer to ``request``, or the exception its batch call raised."""
        future: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._queue.append((request, future))
        if self._task is None or self._task.done():
            self._task = self._spawn(self._run())
        return await future

    async def _run(self) -> None:
        while self._queue:
            n = min(len(self._queue), self.max_batch)
            batch = [self._queue.popleft() for _ in range(n)]
            live = [(r, f) for r, f in batch if not f.done()]  # callers still waiting
            if not live:
                continue
            try:
                answers = await self._call([r for r, _ in live])
            except asyncio.CancelledError:
                for _, f in live + list(self._queue):
                    f.cancel()
                self._queue.clear()
                raise
            except Exception as exc:
                for _, f in live:
                    if not f.done():
                        f.set_exception(exc)
                continue
            self.calls += 1
            self.requests += len(live)
            for (_, f), answer in zip(live, answers, strict=True):
                if not f.done():
                    f.set_result(answer)
