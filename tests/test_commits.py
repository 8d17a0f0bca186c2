"""Group commit on the real ledgers: shared transactions, each caller answered with its own."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from typing import Any

import pytest

from channels.commits import GroupCommit
from models.ledger import IdConflict, Ledger, LedgerRefused, LedgerUnavailable, NewEvent, Recorded
from tests.harness import unique


def ev(user: str, id: str | None = None, data: str = '{"n":1}') -> NewEvent:
    return NewEvent(id=id or unique("e"), user=user, kind="block.grabbed", data=data)


class Tasks:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        return task


class Counting:
    """The real ledger, with the transactions it was asked for counted (and faults on demand)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.calls: list[int] = []
        self.refuse_kind: str | None = None
        self.outage = False

    async def record(self, batch: Sequence[NewEvent]) -> list[Recorded]:
        self.calls.append(len(batch))
        if self.outage:
            raise LedgerUnavailable("connection refused")
        if self.refuse_kind is not None and any(e.kind == self.refuse_kind for e in batch):
            raise LedgerRefused("value too long")
        return await self.ledger.record(batch)


async def test_concurrent_publishes_share_transactions_in_arrival_order(ledger: Ledger) -> None:
    counting = Counting(ledger)
    committed: list[int] = []
    commits = GroupCommit(counting.record, Tasks().spawn, on_commit=committed.append)
    user = unique()
    batches = [[ev(user)] for _ in range(40)] + [[ev(user), ev(user), ev(user)]]
    answers = await asyncio.gather(*(commits.record(b) for b in batches))

    # Every caller got answers for exactly its own events, numbered in arrival order.
    for batch, mine in zip(batches, answers, strict=True):
        assert [r.id for r in mine] == [e.id for e in batch]
        assert not any(r.duplicate for r in mine)
    assert [r.seq for mine in answers for r in mine] == list(range(1, 44))
    # 41 publishes, far fewer transactions: the ones queued behind a commit shared the next.
    assert commits.batches == sum(committed) == 41
    assert commits.transactions == len(counting.calls) == len(committed) <= 2
    assert (await ledger.heads([user]))[user] == 43


async def test_a_group_is_bounded_but_a_large_batch_stays_whole(ledger: Ledger) -> None:
    counting = Counting(ledger)
    commits = GroupCommit(counting.record, Tasks().spawn, max_events=5)
    user = unique()
    big = [ev(user) for _ in range(8)]
    small = [[ev(user)] for _ in range(6)]
    answers = await asyncio.gather(commits.record(big), *(commits.record(b) for b in small))
    assert [len(a) for a in answers] == [8, 1, 1, 1, 1, 1, 1]
    assert counting.calls == [8, 5, 1]
    assert [r.seq for a in answers for r in a] == list(range(1, 15))


async def test_an_id_conflict_refuses_only_its_own_publish(ledger: Ledger) -> None:
    user = unique()
    taken = unique("grab")
    await ledger.record([ev(user, taken, '{"n":1}')])
    counting = Counting(ledger)
    commits = GroupCommit(counting.record, Tasks().spawn)
    twin = unique("twin")
    results = await asyncio.gather(
        commits.record([ev(user)]),
        commits.record([ev(user), ev(user, taken, '{"n":2}')]),  # reused id, other content
        commits.record([ev(user, twin, '{"a":1}')]),
        commits.record([ev(user, twin, '{"a":2}')]),  # same group, same id, other content
        commits.record([ev(user, twin, '{"a":1}')]),  # same id and content: a duplicate
        return_exceptions=True,
    )
    ok_first, conflict, twin_first, twin_conflict, twin_again = results
    assert isinstance(conflict, IdConflict) and conflict.indexes == [1]
    assert isinstance(twin_conflict, IdConflict) and twin_conflict.indexes == [0]
    assert isinstance(ok_first, list) and isinstance(twin_first, list)
    assert isinstance(twin_again, list)
    assert not ok_first[0].duplicate and not twin_first[0].duplicate
    assert twin_again[0].duplicate and twin_again[0].seq == twin_first[0].seq
    # Nothing of the refused publishes was written; the others were.
    assert (await ledger.heads([user]))[user] == 3
    stored = await ledger.get_event(taken)
    assert stored is not None and stored.data == '{"n":1}'


async def test_refused_data_is_refused_to_its_publisher_alone(ledger: Ledger) -> None:
    counting = Counting(ledger)
    counting.refuse_kind = "poison"
    commits = GroupCommit(counting.record, Tasks().spawn)
    user = unique()
    poison = NewEvent(id=unique("p"), user=user, kind="poison", data="{}")
    results = await asyncio.gather(
        commits.record([ev(user)]),
        commits.record([ev(user)]),
        commits.record([ev(user), poison]),
        commits.record([ev(user)]),
        return_exceptions=True,
    )
    assert isinstance(results[2], LedgerRefused)
    recorded = [r for r in results if isinstance(r, list)]
    assert len(recorded) == 3
    assert sorted(a[0].seq for a in recorded) == [1, 2, 3]
    assert (await ledger.heads([user]))[user] == 3


async def test_an_outage_fails_the_whole_group_and_the_next_one_records(ledger: Ledger) -> None:
    counting = Counting(ledger)
    counting.outage = True
    commits = GroupCommit(counting.record, Tasks().spawn)
    user = unique()
    failed = await asyncio.gather(
        *(commits.record([ev(user)]) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(f, LedgerUnavailable) for f in failed)
    assert user not in await ledger.heads([user])
    counting.outage = False
    again = await commits.record([ev(user)])
    assert again[0].seq == 1


async def test_stopping_cancels_waiting_publishes(ledger: Ledger) -> None:
    entered = asyncio.Event()
    release = asyncio.Event()

    async def slow(batch: Sequence[NewEvent]) -> list[Recorded]:
        entered.set()
        await release.wait()
        return await ledger.record(batch)

    tasks = Tasks()
    commits = GroupCommit(slow, tasks.spawn)
    user = unique()
    first = asyncio.create_task(commits.record([ev(user)]))
    await entered.wait()
    second = asyncio.create_task(commits.record([ev(user)]))
    # Tasks run in the order they are woken: the second publish queues behind the commit
    # in flight before the cancelled commit task runs again.
    for task in tasks.tasks:
        task.cancel()
    for waiting in (first, second):
        with pytest.raises(asyncio.CancelledError):
            await waiting


class Gated:
    """The real ledger behind a gate per transaction: each waits until released."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.entered: list[list[str]] = []  # users of each transaction, as they start
        self.gates: list[asyncio.Event] = []
        self.started = asyncio.Event()

    async def record(self, batch: Sequence[NewEvent]) -> list[Recorded]:
        gate = asyncio.Event()
        self.entered.append(sorted({e.user for e in batch}))
        self.gates.append(gate)
        self.started.set()
        await gate.wait()
        return await self.ledger.record(batch)

    async def next_start(self) -> None:
        await asyncio.wait_for(self.started.wait(), 5)
        self.started.clear()


async def test_two_transactions_in_flight_never_share_a_user(ledger: Ledger) -> None:
    gated = Gated(ledger)
    commits = GroupCommit(gated.record, Tasks().spawn, in_flight=2)
    a, b, c = unique("a"), unique("b"), unique("c")
    first_a = asyncio.create_task(commits.record([ev(a)]))
    await gated.next_start()
    # A transaction for ``a`` is in flight: ``b`` starts one of its own at once.
    first_b = asyncio.create_task(commits.record([ev(b)]))
    await gated.next_start()
    assert gated.entered == [[a], [b]]
    # Two in flight: everything else queues; ``a``'s next batch, and ``c`` behind it,
    # wait even when a slot frees up while ``a``'s transaction is still in flight.
    second_a = asyncio.create_task(commits.record([ev(a), ev(a)]))
    then_c = asyncio.create_task(commits.record([ev(c)]))
    await asyncio.sleep(0)
    gated.gates[1].set()  # ``b`` commits
    assert [r.seq for r in await first_b] == [1]
    # ``b``'s transaction looked for more work as it ended, before its caller woke.
    assert gated.entered == [[a], [b]]
    gated.gates[0].set()  # ``a`` commits: its next batch and ``c`` share the next one
    assert [r.seq for r in await first_a] == [1]
    await gated.next_start()
    assert gated.entered[2] == sorted([a, c])
    gated.gates[2].set()
    assert [r.seq for r in await second_a] == [2, 3]
    assert [r.seq for r in await then_c] == [1]
    assert commits.transactions == 3
