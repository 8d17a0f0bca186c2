"""The node on a real ledger (SQLite and PostgreSQL) with the in-process bus.

These tests reach into timing that real sockets cannot control: a bus message
lost, a live event arriving in the middle of a backfill.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Sequence

import pytest

from channels.broker import MemoryBroker
from channels.client import Client
from channels.metrics import Metrics
from channels.node import Node, NodeConfig
from models.ledger import Ledger, NewEvent
from tests.fakes import Sink
from tests.harness import unique


class LossyBroker(MemoryBroker):
    """Drops the publishes whose 1-based index is in ``lose`` (a lossy bus)."""

    def __init__(self, lose: Iterable[int] = ()) -> None:
        super().__init__()
        self.lose = set(lose)
        self.count = 0
        self.fail_subscribe = False

    async def subscribe(self, channels: Iterable[str]) -> None:
        if self.fail_subscribe:
            raise ConnectionError("bus down")
        await super().subscribe(channels)

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        kept = []
        for m in messages:
            self.count += 1
            if self.count not in self.lose:
                kept.append(m)
        await super().publish_many(kept)


@pytest.fixture
async def broker() -> LossyBroker:
    return LossyBroker()


class Relay(MemoryBroker):
    """The bus as another node sees it: what that node publishes goes to ``to``."""

    def __init__(self, to: MemoryBroker) -> None:
        super().__init__()
        self.to = to

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        await self.to.publish_many(messages)


@pytest.fixture
async def remote(ledger: Ledger, broker: LossyBroker) -> AsyncIterator[Node]:
    """Another node on the same ledger, with no device of its own: what it publishes
    reaches ``node`` only over the bus (a node's own devices get its events directly)."""
    n = Node(NodeConfig(node_id="r", reconcile_seconds=3600), ledger, Relay(broker), Metrics())
    await n.start()
    yield n
    await n.stop()


@pytest.fixture
async def node(ledger: Ledger, broker: LossyBroker) -> AsyncIterator[Node]:
    n = Node(
        NodeConfig(node_id="t", backfill_page=3, reconcile_seconds=3600), ledger, broker, Metrics()
    )
    await n.start()
    yield n
    await n.stop()


def ev(user: str, device: str | None = None) -> NewEvent:
    return NewEvent(id=unique("e"), user=user, kind="k", data="{}", device=device)


async def connect(
    node: Node, user: str, device: str = "d", after: int | None = None
) -> tuple[Client, Sink]:
    sink = Sink()
    client = node.new_client(sink, user, device)
    await node.connect(client, after)
    client.start()
    return client, sink


async def settled(client: Client, sink: Sink, n: int) -> list[int]:
    """Wait for ``n`` events to be written and any catch-up to finish; answers their seqs."""
    await sink.wait_events(n)
    if client.catch_up_task is not None:
        await asyncio.wait_for(asyncio.shield(client.catch_up_task), 5)
    async with asyncio.timeout(5), sink.changed:
        await sink.changed.wait_for(lambda: client.queued == 0)
    assert not client.catching_up
    return [e["seq"] for e in sink.events()]


async def test_backfill_then_live_without_gap_or_duplicate(node: Node) -> None:
    user = unique()
    await node.publish([ev(user) for _ in range(7)])  # more than one backfill page (3)
    client, sink = await connect(node, user)
    # Live events published while the backfill is still being read are buffered, then merged.
    await node.publish([ev(user), ev(user)])
    assert await settled(client, sink, 9) == list(range(1, 10))
    await node.publish([ev(user)])
    assert await settled(client, sink, 10) == list(range(1, 11))
    assert sink.frames()[0]["type"] == "hello"
    node.disconnect(client)


async def test_resume_after_and_acked_cursor(node: Node) -> None:
    user = unique()
    await node.publish([ev(user) for _ in range(5)])
    client, sink = await connect(node, user, after=3)
    assert await settled(client, sink, 2) == [4, 5]
    node.ack(client, 5)
    await node.flush_cursors()
    node.disconnect(client)
    again, sink2 = await connect(node, user)
    assert await settled(again, sink2, 0) == []
    assert sink2.frames()[0]["after"] == 5
    node.disconnect(again)


async def test_lost_bus_message_is_detected_by_the_next_one(
    node: Node, remote: Node, broker: LossyBroker
) -> None:
    user = unique()
    client, sink = await connect(node, user)
    assert await settled(client, sink, 0) == []
    broker.lose = {broker.count + 2}  # the second of the next three publishes vanishes
    for _ in range(3):
        await remote.publish([ev(user)])
    assert await settled(client, sink, 3) == [1, 2, 3]
    node.disconnect(client)


async def test_lost_last_message_is_recovered_by_reconcile(
    node: Node, remote: Node, broker: LossyBroker
) -> None:
    user = unique()
    client, sink = await connect(node, user)
    assert await settled(client, sink, 0) == []
    broker.lose = {broker.count + 1}
    await remote.publish([ev(user)])
    assert await settled(client, sink, 0) == []  # nothing told this node
    await node.reconcile(urgent=True)
    assert await settled(client, sink, 1) == [1]
    node.disconnect(client)


async def test_a_nodes_own_devices_get_its_publishes_without_the_bus(
    node: Node, broker: LossyBroker
) -> None:
    user = unique()
    client, sink = await connect(node, user)
    assert await settled(client, sink, 0) == []
    broker.lose = {broker.count + 1}  # the bus loses the first publish: no matter here
    await node.publish([ev(user)])
    assert [e["seq"] for e in sink.events()] == [1]  # written before publish() returned
    await node.publish([ev(user), ev(user)])  # the bus echoes these back: repeats, dropped
    assert await settled(client, sink, 3) == [1, 2, 3]
    assert node.metrics.catch_ups._value.get() == 0  # no hole, no ledger read
    node.disconnect(client)


async def test_device_targeting_and_acks_clamped(node: Node) -> None:
    user = unique()
    c1, s1 = await connect(node, user, "d1")
    c2, s2 = await connect(node, user, "d2")
    await node.publish([ev(user, "d1"), ev(user, "d2"), ev(user)])
    assert await settled(c1, s1, 2) == [1, 3]
    assert await settled(c2, s2, 2) == [2, 3]
    node.ack(c1, 99)
    async with asyncio.timeout(5), s1.changed:
        await s1.changed.wait_for(lambda: s1.frames()[-1].get("code") == "bad_ack")
    assert c1.acked == 3
    node.disconnect(c1)
    node.disconnect(c2)


async def test_second_connection_of_a_device_replaces_the_first(node: Node) -> None:
    user = unique()
    old, old_sink = await connect(node, user, "d1")
    new, _ = await connect(node, user, "d1")
    await asyncio.wait_for(old_sink.closed_event.wait(), 5)
    assert old_sink.closed is not None and old_sink.closed[0] == 4009
    assert not new.closed
    node.disconnect(old)
    assert node.hub.device(user, "d1") is new
    node.disconnect(new)


async def test_subscribe_failure_rolls_back(node: Node, broker: LossyBroker) -> None:
    user = unique()
    broker.fail_subscribe = True
    client = node.new_client(Sink(), user, "d")
    with pytest.raises(ConnectionError):
        await node.connect(client, None)
    assert len(node.hub) == 0
    broker.fail_subscribe = False
    client2, sink = await connect(node, user)  # the next connection subscribes afresh
    await node.publish([ev(user)])
    assert await settled(client2, sink, 1) == [1]
    node.disconnect(client2)
    await asyncio.sleep(0)  # let the unsubscribe task run
    assert broker.channels == frozenset()


async def test_long_backlog_flows_through_a_small_queue(
    ledger: Ledger, broker: LossyBroker
) -> None:
    small = Node(
        NodeConfig(node_id="s", send_queue_size=8, backfill_page=500, reconcile_seconds=3600),
        ledger,
        broker,
        Metrics(),
    )
    await small.start()
    try:
        user = unique()
        await small.publish([ev(user) for _ in range(50)])
        client, sink = await connect(small, user)
        assert await settled(client, sink, 50) == list(range(1, 51))
        assert not client.closed  # never overflowed: pages waited for the writer
        small.disconnect(client)
    finally:
        await small.stop()


async def test_failed_subscribe_does_not_drop_a_newer_connections_reference(
    ledger: Ledger,
) -> None:
    class FailFirst(MemoryBroker):
        failed = False

        async def subscribe(self, channels: Iterable[str]) -> None:
            if not self.failed:
                self.failed = True
                raise ConnectionError("bus down")
            await super().subscribe(channels)

    broker = FailFirst()
    n = Node(NodeConfig(node_id="r", reconcile_seconds=3600), ledger, broker, Metrics())
    await n.start()
    try:
        user = unique()
        first = asyncio.create_task(n._acquire(user))
        await asyncio.sleep(0)  # A creates the subscription and waits on it
        second = asyncio.create_task(n._acquire(user))
        await asyncio.sleep(0)  # the subscribe fails; C arrives before A sees the failure
        with pytest.raises(ConnectionError):
            await first
        await second
        assert n._subs[user].refs == 1  # C's reference survived A's rollback
        assert broker.channels == {f"courier:u:{{{user}}}"}
    finally:
        await n.stop()


async def test_overtaken_bus_message_needs_no_ledger_read(ledger: Ledger) -> None:
    class Swapping(MemoryBroker):
        """While ``swap`` is set, delivers each pair of publishes in reverse order."""

        swap = False
        held: tuple[str, bytes] | None = None

        async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
            for m in messages:
                if not self.swap:
                    await super().publish_many([m])
                elif self.held is None:
                    self.held = m
                else:
                    held, self.held = self.held, None
                    await super().publish_many([m, held])

    broker = Swapping()
    n = Node(NodeConfig(node_id="s", reconcile_seconds=3600), ledger, broker, Metrics())
    other = Node(NodeConfig(node_id="o", reconcile_seconds=3600), ledger, Relay(broker), Metrics())
    await n.start()
    await other.start()
    try:
        user = unique()
        client, sink = await connect(n, user)
        assert await settled(client, sink, 0) == []
        reads = n.metrics.catch_ups._value.get()
        broker.swap = True
        await other.publish([ev(user)])
        await other.publish([ev(user)])  # seq 2 reaches the node before seq 1
        assert await settled(client, sink, 2) == [1, 2]
        assert n.metrics.catch_ups._value.get() == reads  # resolved within the grace period
        n.disconnect(client)
    finally:
        await other.stop()
        await n.stop()


async def test_newer_connection_answers_an_older_announcement(
    node: Node, broker: LossyBroker
) -> None:
    from channels.broker import user_channel
    from channels.frames import Replace, decode_bus, encode_replace

    user = unique()
    client, sink = await connect(node, user, "d1")
    assert await settled(client, sink, 0) == []
    sent: list[bytes] = []
    original = broker.publish_many

    async def record(messages: Sequence[tuple[str, bytes]]) -> None:
        sent.extend(payload for _, payload in messages)
        await original(messages)

    broker.publish_many = record  # type: ignore[method-assign]
    # Another node's older connection of the same device announces itself late.
    older = Replace(user, "d1", "000000000000001/elsewhere:1")
    node._on_message(user_channel(user), encode_replace(older))
    await asyncio.wait_for(asyncio.gather(*node._tasks), 5)
    assert not client.closed  # the newer one stays
    answers = [decode_bus(p) for p in sent]
    assert answers and isinstance(answers[0], Replace) and answers[0].conn > older.conn


async def test_hello_says_when_retention_deleted_what_the_device_missed(node: Node) -> None:
    user = unique()
    fresh, _ = await connect(node, user, "fresh")
    node.ack(fresh, 0)
    node.disconnect(fresh)
    await node.ledger.record([ev(user), ev(user)], now=1)  # long ago
    await node.ledger.prune(before=2)
    await node.publish([ev(user)])
    away, sink = await connect(node, user, "away")  # acked nothing: it missed 1 and 2
    assert await settled(away, sink, 1) == [3]
    assert sink.frames()[0]["truncated"] is True
    node.disconnect(away)
    current, sink2 = await connect(node, user, "current", after=2)
    assert await settled(current, sink2, 1) == [3]
    assert sink2.frames()[0]["truncated"] is False
    node.disconnect(current)


async def test_a_reconnect_storm_reads_the_ledger_in_batches(node: Node, ledger: Ledger) -> None:
    users = [unique() for _ in range(60)]
    await ledger.record([ev(u) for u in users for _ in range(5)])  # 5 missed events each

    def catch_ups() -> float:
        return node.metrics.registry.get_sample_value("courier_catch_ups_total") or 0.0

    reads_before = catch_ups()
    # Everyone at once, as after a network outage; pages of 3 make each need two reads.
    phones = await asyncio.gather(*(connect(node, u) for u in users))
    got = await asyncio.gather(*(settled(c, s, 5) for c, s in phones))
    assert got == [[1, 2, 3, 4, 5]] * len(users)
    reads = catch_ups() - reads_before
    assert reads == 2 * len(users)  # each device read its two pages...
    assert node._backfill.requests == reads
    assert node._backfill.calls <= 6  # ...in a few shared statements, not 120 transactions


async def test_a_failed_batched_read_fails_its_requests_and_the_next_batch_reads(
    ledger: Ledger,
) -> None:
    from channels.batching import Coalescer

    calls: list[list[int]] = []
    down = True

    async def read(keys: list[int]) -> list[int]:
        calls.append(keys)
        if down:
            raise ConnectionError("ledger down")
        return [k * 10 for k in keys]

    tasks: set[asyncio.Task[None]] = set()

    def spawn(coro: object) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)  # type: ignore[arg-type]
        tasks.add(task)
        return task

    coalesce: Coalescer[int, int] = Coalescer(read, spawn, max_batch=3)
    failed = await asyncio.gather(*(coalesce(k) for k in range(4)), return_exceptions=True)
    assert all(isinstance(f, ConnectionError) for f in failed)
    down = False
    assert await asyncio.gather(*(coalesce(k) for k in range(5))) == [0, 10, 20, 30, 40]
    assert [len(c) for c in calls] == [3, 1, 3, 2]  # batches of at most 3, in order


async def test_sent_cursors_are_read_off_connections_when_cursors_are_written(
    ledger: Ledger, broker: LossyBroker
) -> None:
    # The flush loop is idle here (an hour between rounds): the test drives each flush.
    node = Node(
        NodeConfig(node_id="t", ack_flush_seconds=3600, reconcile_seconds=3600),
        ledger,
        broker,
        Metrics(),
    )
    await node.start()
    try:
        await _sent_cursors(node, ledger)
    finally:
        await node.stop()


async def _sent_cursors(node: Node, ledger: Ledger) -> None:
    user = unique()
    client, sink = await connect(node, user)
    await node.publish([ev(user) for _ in range(3)])
    assert await settled(client, sink, 3) == [1, 2, 3]

    async def sent() -> dict[str, int]:
        return {d.device: d.sent_seq for d in await ledger.devices(user)}

    await node.flush_cursors(include_sent=False)  # an ack round: no sent cursor moved
    assert await sent() == {"d": 0}
    await node.flush_cursors()
    assert await sent() == {"d": 3}
    await node.publish([ev(user)])
    assert await settled(client, sink, 4) == [1, 2, 3, 4]
    node.disconnect(client)  # a connection that ends hands its sent cursor over at once
    await node.flush_cursors(include_sent=False)
    assert await sent() == {"d": 4}


def test_cursor_writes_space_out_only_under_many_moving_devices() -> None:
    from channels.node import FLUSH_BUSY, FLUSH_STRETCH, flush_pause

    assert flush_pause(0.05, 0) == 0.05
    assert flush_pause(0.05, FLUSH_BUSY) == 0.05
    assert flush_pause(0.05, 2 * FLUSH_BUSY) == 0.1
    assert flush_pause(0.05, 1_000_000) == 0.05 * FLUSH_STRETCH
