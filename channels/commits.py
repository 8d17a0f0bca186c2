"""Group commit: publishes that arrive while a ledger commit is in flight share the next one.

A single-event ``POST /v1/events`` costs the ledger a transaction of a few round trips
and a commit (a disk flush on PostgreSQL). Under concurrent publishers that per-request
transaction, not the events, is the limit. ``GroupCommit`` queues each caller's batch;
one transaction at a time records everything queued meanwhile, and each caller is
answered with its own slice once that transaction has committed. Nothing is answered
before it is durable, and a caller's batch stays atomic (its events are in one
transaction, all or none).

A fault that belongs to one caller's input stays that caller's:

* ``IdConflict``: the batches holding the conflicting events get it (with their own
  indexes), the others are recorded again without them.
* any other ``LedgerRefused`` of a shared transaction: each batch is recorded alone,
  so only the batch with the bad data is refused.
* ``LedgerUnavailable`` (an outage) fails every batch of the transaction: nothing of
  them was written, and each caller answers 503 as it would alone.

Batches are taken in arrival order, so events of one user are numbered in the order
their publishes arrived, as with one transaction per publish.

Up to ``in_flight`` transactions run at once (PostgreSQL: 2; SQLite has one writer).
While one commits, the server's loop and the database both have other work to do, so a
second fills the wait; a group never holds a user whose events are in a transaction
still in flight (the batch waits, and every batch behind it), so one user's events are
still numbered, committed and published in arrival order.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from models.ledger import IdConflict, LedgerRefused, NewEvent, Recorded

log = logging.getLogger("courier.commits")

MAX_GROUP_EVENTS = 5000
"""Events per shared transaction; a single larger batch is still recorded whole."""

Record = Callable[[Sequence[NewEvent]], Awaitable[list[Recorded]]]


class _Pending:
    __slots__ = ("batch", "future", "users")

    def __init__(self, batch: Sequence[NewEvent], future: asyncio.Future[list[Recorded]]) -> None:
        self.batch = batch
        self.future = future
        self.users = {e.user for e in batch}


class GroupCommit:
    def __init__(
        self,
        record: Record,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        *,
        max_events: int = MAX_GROUP_EVENTS,
        in_flight: int = 1,
        on_commit: Callable[[int], None] | None = None,
    ) -> None:
        """``on_commit(publishes)``: called after each shared transaction commits."""
        self._record = record
        self._spawn = spawn
        self._on_commit = on_commit
        self.max_events = max_events
        self.in_flight = max(1, in_flight)
        self._queue: deque[_Pending] = deque()
        self._running = 0  # transactions in flight
        self._busy: set[str] = set()  # users with events in them (no two share one)
        self.transactions = 0
        """Transactions committed (with ``batches``, a measure of sharing)."""
        self.batches = 0
        """Batches answered by those transactions."""

    async def record(self, batch: Sequence[NewEvent]) -> list[Recorded]:
        """Record ``batch`` atomically; answers once it is committed (as ``Ledger.record``).

        A caller that stops waiting (a client that hung up) does not take its batch out of
        a transaction already under way: like a publish cut off mid-commit, it may be
        recorded, and a retry with the same ids is then answered as a duplicate.
        """
        if not batch:
            return []
        future: asyncio.Future[list[Recorded]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(batch, future))
        self._start()
        return await future

    def _start(self) -> None:
        """Start transactions for what is queued, as many as may be in flight."""
        while self._queue and self._running < self.in_flight:
            group = self._take()
            if not group:
                return  # the next batch waits for a transaction that holds one of its users
            users = set().union(*(pending.users for pending in group))
            self._running += 1
            self._busy |= users
            self._spawn(self._run(group, users))

    async def _run(self, group: list[_Pending], users: set[str]) -> None:
        try:
            await self._commit(group)
        except asyncio.CancelledError:  # the node stops: nobody is left waiting
            for pending in group + list(self._queue):
                pending.future.cancel()
            self._queue.clear()
            raise
        except Exception as exc:  # a bug here must not leave callers waiting forever
            log.exception("group commit failed")
            _fail(group, exc)
        finally:
            self._running -= 1
            self._busy -= users
        self._start()

    def _take(self) -> list[_Pending]:
        """The next group: queued batches in order, up to ``max_events`` (a larger first
        batch alone), stopping at the first batch that holds a user of a transaction in
        flight. Empty when the first batch does."""
        group: list[_Pending] = []
        size = 0
        busy = self._busy
        while self._queue:
            head = self._queue[0]
            if group and size + len(head.batch) > self.max_events:
                break
            if not head.users.isdisjoint(busy):
                break
            group.append(self._queue.popleft())
            size += len(head.batch)
        return group

    async def _commit(self, group: list[_Pending]) -> None:
        while group:
            merged = [e for p in group for e in p.batch]
            try:
                answers = await self._record(merged)
            except IdConflict as exc:
                rest = _refuse_conflicts(group, exc.indexes)
                if len(rest) == len(group):  # no batch to blame: refuse them all
                    _fail(group, exc)
                    return
                group = rest
                continue
            except LedgerRefused as exc:
                if len(group) == 1:
                    _fail(group, exc)
                    return
                for pending in group:  # whose data was refused? each alone says
                    await self._commit([pending])
                return
            except Exception as exc:
                _fail(group, exc)
                return
            self.transactions += 1
            self.batches += len(group)
            if self._on_commit is not None:
                self._on_commit(len(group))
            start = 0
            for pending in group:
                end = start + len(pending.batch)
                if not pending.future.done():
                    pending.future.set_result(answers[start:end])
                start = end
            return


def _refuse_conflicts(group: list[_Pending], indexes: list[int]) -> list[_Pending]:
    """Fail the batches that hold the conflicting events; answers the others."""
    keep: list[_Pending] = []
    start = 0
    bad = sorted(indexes)
    for pending in group:
        end = start + len(pending.batch)
        mine = [i - start for i in bad if start <= i < end]
        if mine:
            if not pending.future.done():
                pending.future.set_exception(IdConflict(mine))
        else:
            keep.append(pending)
        start = end
    return keep


def _fail(group: list[_Pending], exc: BaseException) -> None:
    for pending in group:
        if not pending.future.done():
            pending.future.set_exception(exc)
