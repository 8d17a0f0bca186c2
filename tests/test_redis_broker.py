"""The broker contract, on the in-process broker and on real Redis; Redis reconnects; presence."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from channels.broker import Broker, BrokerUnavailable, MemoryBroker
from channels.client import Client
from channels.hub import Hub
from channels.redis import (
    NODES_KEY,
    RedisBroker,
    RedisPresence,
    node_devices_key,
    node_key,
    presence_key,
)
from tests.harness import free_port

WAIT = 10.0  # seconds: upper bound of any wait below (they end as soon as the event is there)


class Inbox:
    """Collects bus messages; tests await conditions on it instead of sleeping."""

    def __init__(self) -> None:
        self.messages: dict[str, list[bytes]] = defaultdict(list)
        self.reconnects = 0
        self._changed = asyncio.Condition()
        self._reconnected = asyncio.Event()

    def on_message(self, channel: str, payload: bytes) -> None:
        self.messages[channel].append(payload)
        asyncio.get_running_loop().create_task(self._notify())

    def on_reconnect(self) -> None:
        self.reconnects += 1
        self._reconnected.set()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, channel: str, count: int) -> list[bytes]:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.messages[channel]) >= count)

        await asyncio.wait_for(wait(), WAIT)
        return self.messages[channel]

    async def reconnected(self) -> None:
        await asyncio.wait_for(self._reconnected.wait(), WAIT)
        self._reconnected.clear()


def channel() -> str:
    return f"courier:test:{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["memory", "redis"])
async def bus(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Broker, Inbox]]:
    broker: Broker
    if request.param == "memory":
        broker = MemoryBroker()
    else:
        broker = RedisBroker(
            request.getfixturevalue("redis_url"), name=f"courier-test-{uuid.uuid4().hex[:8]}"
        )
    inbox = Inbox()
    await broker.start(inbox.on_message, inbox.on_reconnect)
    yield broker, inbox
    await broker.close()


# -- the contract, on every broker ----------------------------------------------------------


async def test_subscribe_then_publish_delivers(bus: tuple[Broker, Inbox]) -> None:
    broker, inbox = bus
    ch = channel()
    await broker.subscribe([ch])
    await broker.publish_many([(ch, b"hello")])
    assert await inbox.until(ch, 1) == [b"hello"]


async def test_unsubscribe_stops_delivery(bus: tuple[Broker, Inbox]) -> None:
    broker, inbox = bus
    gone, kept = channel(), channel()
    await broker.subscribe([gone, kept])
    await broker.publish_many([(gone, b"1"), (kept, b"1")])
    await inbox.until(kept, 1)
    await inbox.until(gone, 1)
    await broker.unsubscribe([gone])
    await broker.unsubscribe([gone])  # idempotent
    # Published in this order on one connection: once ``kept`` has its message,
    # ``gone`` would have had its own already.
    await broker.publish_many([(gone, b"2"), (kept, b"2")])
    assert await inbox.until(kept, 2) == [b"1", b"2"]
    assert inbox.messages[gone] == [b"1"]


async def test_order_is_preserved_per_channel(bus: tuple[Broker, Inbox]) -> None:
    broker, inbox = bus
    a, b = channel(), channel()
    await broker.subscribe([a, b])
    await broker.subscribe([a])  # idempotent
    expected = [str(i).encode() for i in range(300)]
    for i in range(0, 300, 50):
        await broker.publish_many([(ch, m) for m in expected[i : i + 50] for ch in (a, b)])
    assert await inbox.until(a, 300) == expected
    assert await inbox.until(b, 300) == expected


async def test_many_channels_in_one_call(bus: tuple[Broker, Inbox]) -> None:
    broker, inbox = bus
    prefix = channel()
    channels = [f"{prefix}:{i}" for i in range(2500)]
    await broker.subscribe(channels)
    await broker.publish_many([(ch, ch.encode()) for ch in channels])
    for ch in channels:
        assert await inbox.until(ch, 1) == [ch.encode()]
    if isinstance(broker, RedisBroker):
        # 2500 channels in batches of 1000: three SUBSCRIBE commands, not 2500.
        assert broker.commands_written <= 3


async def test_subscribers_of_one_call_wait_for_each_other(bus: tuple[Broker, Inbox]) -> None:
    broker, inbox = bus
    chs = [channel() for _ in range(50)]
    await asyncio.gather(*(broker.subscribe([ch]) for ch in chs))
    await broker.publish_many([(ch, b"x") for ch in chs])
    for ch in chs:
        await inbox.until(ch, 1)


# -- Redis only -----------------------------------------------------------------------------


async def _bus_connection_id(admin: aioredis.Redis, name: str) -> int:
    clients = await admin.client_list(_type="pubsub")
    ids = [int(c["id"]) for c in clients if c.get("name") == f"{name}:bus"]
    assert len(ids) == 1, clients
    return ids[0]


async def test_redis_reconnect_resubscribes_then_calls_on_reconnect(redis_url: str) -> None:
    name = f"courier-test-{uuid.uuid4().hex[:8]}"
    broker = RedisBroker(redis_url, name=name)
    inbox = Inbox()
    admin = aioredis.Redis.from_url(redis_url)
    await broker.start(inbox.on_message, inbox.on_reconnect)
    try:
        chs = [channel() for _ in range(20)]
        await broker.subscribe(chs)
        await broker.publish_many([(chs[0], b"before")])
        await inbox.until(chs[0], 1)

        for round_ in range(2):  # twice: the listener survives repeated failures
            conn_id = await _bus_connection_id(admin, name)
            killed = await admin.execute_command(
                "CLIENT", "KILL", "TYPE", "pubsub", "ID", str(conn_id)
            )
            assert killed == 1
            await inbox.reconnected()
            assert inbox.reconnects == round_ + 1
            assert await _bus_connection_id(admin, name) != conn_id
            # on_reconnect comes after the re-subscription was confirmed, so a message
            # published now must arrive on every channel.
            await broker.publish_many([(ch, f"after-{round_}".encode()) for ch in chs])
            for ch in chs:
                got = await inbox.until(ch, round_ + 1 + (ch == chs[0]))
                assert got[-1] == f"after-{round_}".encode()
        await broker.ping()
        assert broker.reconnects == 2
    finally:
        await broker.close()
        await admin.aclose()


async def test_redis_subscribe_while_down_fails_in_bounded_time() -> None:
    broker = RedisBroker(
        f"redis://127.0.0.1:{free_port()}/0", subscribe_timeout=0.5, connect_timeout=0.5
    )
    inbox = Inbox()
    await broker.start(inbox.on_message, inbox.on_reconnect)  # does not fail: keeps retrying
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(BrokerUnavailable):
            await broker.subscribe([channel()])
        assert loop.time() - started < 3.0
        assert broker.desired == set()  # rolled back
        with pytest.raises(BrokerUnavailable):
            await broker.ping()
        with pytest.raises(BrokerUnavailable):
            await broker.publish_many([(channel(), b"x")])
    finally:
        await broker.close()


# -- presence -------------------------------------------------------------------------------


class _NullSink:
    async def send_text(self, data: str) -> None:
        return None

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        return None


def _client(user: str, device: str, n: int) -> Client:
    return Client(_NullSink(), user, device, f"c{n}", max_queue=8)


async def test_presence_is_cluster_wide_and_expires(redis_url: str) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    a_id, b_id = f"node-a-{uuid.uuid4().hex[:6]}", f"node-b-{uuid.uuid4().hex[:6]}"
    hub_a, hub_b = Hub(), Hub()
    client_a = redis_client_for(redis_url)
    client_b = redis_client_for(redis_url)
    a = RedisPresence(client_a, a_id, hub_a, interval=60, ttl=1.0)
    b = RedisPresence(client_b, b_id, hub_b, interval=60, ttl=60)
    try:
        hub_a.add(_client(user, "phone", 1))
        hub_b.add(_client(user, "tablet", 2))
        hub_b.add(_client(user, "watch", 3))
        await a.beat()
        await b.beat()
        assert await b.connected_devices(user) == {"phone", "tablet", "watch"}
        nodes = await b.nodes()
        assert nodes[a_id] == 1 and nodes[b_id] == 2

        # A device that leaves drops out at the next heartbeat of its node.
        watch = hub_b.device(user, "watch")
        assert watch is not None
        hub_b.remove(watch)
        await b.beat()
        assert await a.connected_devices(user) == {"phone", "tablet"}

        # Node A dies (no more heartbeats): it drops out once its TTL (1s) has passed.
        await asyncio.sleep(1.1)  # the expiry itself is under test, not a synchronisation
        assert await b.connected_devices(user) == {"tablet"}
        assert a_id not in await b.nodes()

        await b.stop()  # a clean stop withdraws at once
        assert await a.connected_devices(user) == {"phone"}  # its own hub only
        assert b_id not in await a.nodes()
    finally:
        await a.stop()
        await client_a.aclose()
        await client_b.aclose()


async def test_a_beat_writes_only_what_changed(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    users = [f"u-{uuid.uuid4().hex[:10]}" for _ in range(50)]
    hub = Hub()
    redis = redis_client_for(redis_url)
    node = RedisPresence(redis, f"node-{uuid.uuid4().hex[:6]}", hub, interval=60, ttl=60)
    sent: list[list[str]] = []
    execute = aioredis.client.Pipeline.execute

    async def counted(self: aioredis.client.Pipeline, raise_on_error: bool = True) -> list:  # type: ignore[type-arg]
        sent.append([str(args[0]) for args, _ in self.command_stack])
        return await execute(self, raise_on_error)

    monkeypatch.setattr(aioredis.client.Pipeline, "execute", counted)
    try:
        for n, user in enumerate(users):
            hub.add(_client(user, "phone", n))
        await node.beat()  # the first beat: the heartbeat key was not there yet
        await node.beat()  # so this one writes every entry once more
        sent.clear()
        await node.beat()  # nothing changed: the heartbeat alone, whatever the hub holds
        assert [c for c in sent[0] if c.startswith(("ZADD", "SADD", "ZREM", "SREM"))] == ["ZADD"]
        phone = hub.device(users[0], "phone")
        assert phone is not None
        hub.remove(phone)
        hub.add(_client(users[1], "tablet", 99))
        sent.clear()
        await node.beat()  # one device gone, one new: two entries, four writes
        writes = [c for c in sent[0] if c.startswith(("ZADD", "SADD", "ZREM", "SREM"))]
        assert sorted(writes) == ["SADD", "SREM", "ZADD", "ZADD", "ZREM"]
        assert await node.connected_devices(users[0]) == set()
        assert await node.connected_devices(users[1]) == {"phone", "tablet"}
    finally:
        await node.stop()
        await redis.aclose()


async def test_a_dead_nodes_entries_are_removed_and_a_reaped_node_writes_them_again(
    redis_url: str,
) -> None:
    user = f"u-{uuid.uuid4().hex[:10]}"
    a_id, b_id = f"node-a-{uuid.uuid4().hex[:6]}", f"node-b-{uuid.uuid4().hex[:6]}"
    hub_a, hub_b = Hub(), Hub()
    redis = redis_client_for(redis_url)
    a = RedisPresence(redis, a_id, hub_a, interval=60, ttl=0.5)
    b = RedisPresence(redis, b_id, hub_b, interval=60, ttl=60)
    try:
        hub_a.add(_client(user, "phone", 1))
        hub_b.add(_client(user, "tablet", 2))
        await a.beat()
        await b.beat()
        assert await redis.zcard(presence_key(user)) == 2
        await asyncio.sleep(0.6)  # A's expiry passing is what is under test
        await b.beat()  # B finds A dead and removes its entries
        assert {m.decode() for m in await redis.zrange(presence_key(user), 0, -1)} == {
            f"tablet|{b_id}"
        }
        assert not await redis.exists(node_devices_key(a_id), node_key(a_id))
        assert await redis.zscore(NODES_KEY, a_id) is None
        # A was only late: its next beat learns that it was taken for dead (its heartbeat
        # key is gone), the one after writes all of its entries again.
        await a.beat()
        await a.beat()
        assert await b.connected_devices(user) == {"phone", "tablet"}
        assert {m.decode() for m in await redis.smembers(node_devices_key(a_id))} == {
            f"{user}\x1fphone"
        }
    finally:
        await a.stop()
        await b.stop()
        await redis.aclose()


def redis_client_for(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url)
