"""The ingest stream consumer against real Redis and a real PostgreSQL ledger."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis
from courier_publisher import AsyncStreamPublisher

from channels.broker import MemoryBroker, user_channel
from channels.ingest import StreamConsumer
from channels.metrics import Metrics
from channels.node import Node, NodeConfig
from models.ledger import Ledger, StoredEvent
from server.api import parse_event
from server.services import Limits
from tests.harness import until

LIMITS = Limits(max_data_bytes=16 * 1024, max_batch=1000, max_ttl=24 * 3600)


@dataclass
class Env:
    redis: aioredis.Redis
    ledger: Ledger
    node: Node
    stream: str
    user: str

    def consumer(self, name: str, **options: Any) -> StreamConsumer:
        return StreamConsumer(
            self.redis, self.node, LIMITS, consumer=name, stream=self.stream, **options
        )

    async def xadd(self, event: Any = None, **fields: Any) -> str:
        if event is not None:
            fields["event"] = event if isinstance(event, str) else json.dumps(event)
        entry_id = await self.redis.xadd(self.stream, fields)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def events(self) -> list[StoredEvent]:
        rows, _ = await self.ledger.backfill(self.user, "d1", 0, 1000)
        return rows


@pytest.fixture
async def env(redis_url: str, postgres_url: str) -> AsyncIterator[Env]:
    client = aioredis.Redis.from_url(redis_url)
    ledger = Ledger.from_url(postgres_url)
    node = Node(NodeConfig(node_id=f"n-{uuid.uuid4().hex[:8]}"), ledger, MemoryBroker(), Metrics())
    stream = f"courier:test:{uuid.uuid4().hex[:12]}:ingest"
    yield Env(client, ledger, node, stream, f"u-{uuid.uuid4().hex[:12]}")
    await client.delete(stream, f"{stream}:dead")
    await client.aclose()
    await ledger.close()


def ev(user: str, n: int, **extra: Any) -> dict[str, Any]:
    return {"user": user, "kind": "block.grabbed", "data": {"n": n}, "id": f"{user}-{n}", **extra}


async def test_malformed_entries_go_to_dead_stream_good_ones_are_recorded(env: Env) -> None:
    consumer = env.consumer("c1")
    await consumer.ensure_group()
    await consumer.ensure_group()  # BUSYGROUP is fine
    good_ids = [await env.xadd(ev(env.user, 1)), await env.xadd(ev(env.user, 2))]
    bad = [
        await env.xadd("{not json"),
        await env.xadd(other="no event field"),
        await env.xadd(ev(env.user, 3, kind="Not A Kind")),
        await env.xadd(["a", "list"]),
        await env.xadd(
            '{"user": "u", "kind": "k", "data": {"a": ' + "[" * 5000 + "]" * 5000 + "}}"
        ),
        await env.xadd(ev(env.user, 4, id="nul\u0000in-id")),
    ]
    good_ids.append(await env.xadd({"user": env.user, "kind": "plan.changed"}))  # no id

    assert await consumer.read_once() == 9

    events = await env.events()
    assert [e.id for e in events] == [f"{env.user}-1", f"{env.user}-2", f"xadd-{good_ids[2]}"]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    dead = await env.redis.xrange(f"{env.stream}:dead")
    assert [f[b"entry"].decode() for _, f in dead] == bad
    reasons = [f[b"reason"].decode() for _, f in dead]
    assert "not valid JSON" in reasons[0]
    assert "no field 'event'" in reasons[1]
    assert reasons[2].startswith("kind")
    assert reasons[3].startswith("$")
    assert "not valid JSON" in reasons[4]  # nested too deeply: refused, never retried forever
    assert reasons[5].startswith("id")
    assert dead[0][1][b"event"] == b"{not json"
    pending = await env.redis.xpending(env.stream, "courier")
    assert pending["pending"] == 0
    assert consumer.recorded == 3 and consumer.dead == 6

    await consumer.update_lag()
    assert env.node.metrics.ingest_lag._value.get() == 0


async def test_entries_of_a_killed_consumer_are_claimed_and_recorded_once(env: Env) -> None:
    dead_consumer = env.consumer("killed")
    await dead_consumer.ensure_group()
    ids = [await env.xadd(ev(env.user, n)) for n in range(5)]
    ids.append(await env.xadd({"user": env.user, "kind": "plan.changed"}))  # no id
    # The killed node read every entry and recorded the first three, then died
    # before its XACK (the ledger commit happened; the ack did not).
    reply = await env.redis.xreadgroup("courier", "killed", {env.stream: ">"}, count=100)
    assert reply
    await env.node.publish([parse_event(ev(env.user, n), "", LIMITS) for n in range(3)])
    pending = await env.redis.xpending(env.stream, "courier")
    assert pending["pending"] == 6

    # Not idle long enough yet (a minute here, whatever the machine's speed): the owner may
    # be alive.
    assert await env.consumer("rescuer", claim_seconds=60).claim_once() == 0
    rescuer = env.consumer("rescuer", claim_seconds=0.05)
    await asyncio.sleep(0.1)  # let the claim threshold itself pass (not a synchronisation)
    assert await rescuer.claim_once() == 6
    assert await rescuer.claim_once() == 0

    events = await env.events()
    assert sorted(e.id for e in events) == sorted(
        [f"{env.user}-{n}" for n in range(5)] + [f"xadd-{ids[5]}"]
    )
    assert len(events) == 6  # exactly once, though three were recorded before the crash
    pending = await env.redis.xpending(env.stream, "courier")
    assert pending["pending"] == 0


async def test_running_consumer_records_published_events(env: Env) -> None:
    delivered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def on_message(channel: str, payload: bytes) -> None:
        if not delivered.done():
            delivered.set_result(payload)

    await env.node.broker.start(on_message, lambda: None)
    await env.node.broker.subscribe([user_channel(env.user)])
    consumer = env.consumer("live", block_ms=200)
    consumer.start()
    try:
        async with AsyncStreamPublisher(_url(env.redis), stream=env.stream) as pub:
            event_id = await pub.publish(env.user, "block.grabbed", {"block_id": "B9"})
        await asyncio.wait_for(delivered, 10.0)
        events = await env.events()
        assert [e.id for e in events] == [event_id]
    finally:
        await consumer.stop()


def _url(client: aioredis.Redis) -> str:
    kw = client.connection_pool.connection_kwargs
    return f"redis://{kw.get('host', '127.0.0.1')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


async def test_ledger_down_leaves_entries_pending_until_it_is_back(env: Env) -> None:
    down = Ledger.from_url("postgresql+asyncpg://postgres@127.0.0.1:1/nothing")
    node = Node(NodeConfig(node_id="down"), down, MemoryBroker(), Metrics())
    stuck = StreamConsumer(
        env.redis, node, LIMITS, consumer="stuck", stream=env.stream, lease_seconds=1.5
    )
    await stuck.ensure_group()
    entry = await env.xadd(ev(env.user, 1))
    task = asyncio.create_task(stuck.read_once())
    try:
        # It keeps retrying the same entry: no return, no ack, no dead letter.
        done, _ = await asyncio.wait({task}, timeout=1.0)
        assert not done
        pending = await env.redis.xpending(env.stream, "courier")
        assert pending["pending"] == 1
        assert await env.redis.xlen(f"{env.stream}:dead") == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await down.close()
    # The ledger is back (another node with a working one): the entry is taken over.
    rescuer = env.consumer("rescuer", claim_seconds=0.01)
    # The stuck consumer still holds the ingest lease: nobody else may record until it lapses.
    assert not await rescuer.renew_lease()
    await asyncio.sleep(1.6)  # the lease and claim thresholds themselves (not a synchronisation)
    assert await rescuer.claim_once() == 1
    assert [e.id for e in await env.events()] == [f"{env.user}-1"]
    assert (await env.redis.xpending(env.stream, "courier"))["pending"] == 0
    assert entry


async def test_a_reused_id_with_other_content_goes_to_the_dead_stream(env: Env) -> None:
    await env.xadd(ev(env.user, 1))
    clash = await env.xadd({**ev(env.user, 1), "data": {"n": "other"}})
    same = await env.xadd(ev(env.user, 1))  # the same content again: a plain duplicate
    await env.xadd(ev(env.user, 2))
    consumer = env.consumer("c1")
    await consumer.ensure_group()
    await consumer.read_once()
    dead = await env.redis.xrange(f"{env.stream}:dead")
    assert [f[b"entry"].decode() for _, f in dead] == [clash]
    assert dead[0][1][b"reason"].decode().startswith("id_conflict")
    assert [(e.id, e.data) for e in await env.events()] == [
        (f"{env.user}-1", '{"n":1}'),
        (f"{env.user}-2", '{"n":2}'),
    ]
    assert same not in [f[b"entry"].decode() for _, f in dead]
    assert (await env.redis.xpending(env.stream, "courier"))["pending"] == 0


async def test_entries_that_are_not_utf8_never_hold_the_stream(env: Env) -> None:
    consumer = env.consumer("c1")
    await consumer.ensure_group()
    first = await env.xadd(ev(env.user, 1))
    bad = [
        await env.redis.xadd(
            env.stream, {"event": b'{"user":"u1","kind":"k","data":{"x":"\xff"}}'}
        ),
        await env.redis.xadd(env.stream, {b"\xff\xfe": b"name not UTF-8"}),
        await env.redis.xadd(env.stream, {b"event": b"\xc3\x28"}),
    ]
    last = await env.xadd(ev(env.user, 2))
    assert await consumer.read_once() == 5
    assert [e.id for e in await env.events()] == [f"{env.user}-1", f"{env.user}-2"]
    dead = await env.redis.xrange(f"{env.stream}:dead")
    assert [f[b"entry"] for _, f in dead] == bad
    assert all(f[b"reason"] for _, f in dead)
    assert "UTF-8" in dead[0][1][b"reason"].decode()
    pending = await env.redis.xpending(env.stream, "courier")
    assert pending["pending"] == 0 and first and last


async def test_an_entry_that_keeps_failing_goes_to_the_dead_stream(env: Env) -> None:
    """A failure that is not an outage (here: a bug in recording) is bounded per entry."""
    consumer = env.consumer("c1")
    await consumer.ensure_group()
    poison = await env.xadd(ev(env.user, 1, collapse="poison"))
    await env.xadd(ev(env.user, 2))
    real_publish = env.node.publish

    async def flaky(batch: Any) -> Any:
        if any(e.collapse == "poison" for e in batch):
            raise KeyError("a bug")
        return await real_publish(batch)

    env.node.publish = flaky  # type: ignore[method-assign]
    for _ in range(2):
        with pytest.raises(KeyError):
            await consumer.read_once(new=False) or await consumer.read_once()
    await consumer.read_once(new=False)  # the third try dead-letters it; the rest goes on
    assert [e.id for e in await env.events()] == [f"{env.user}-2"]
    dead = await env.redis.xrange(f"{env.stream}:dead")
    assert [f[b"entry"].decode() for _, f in dead] == [poison]
    assert "3 times" in dead[0][1][b"reason"].decode()


async def test_a_lost_read_reply_is_recovered_in_order_without_a_claim(env: Env) -> None:
    """The reply to ``XREADGROUP >`` is lost after Redis assigned the entries: the consumer
    re-reads its own pending entries first, so nothing waits for a claim or is reordered."""
    consumer = env.consumer("c1", claim_seconds=300)
    await consumer.ensure_group()
    for n in range(3):
        await env.xadd(ev(env.user, n))
    real = env.redis.xreadgroup
    lost = {"done": False}

    async def lose_first_new_reply(*args: Any, **kwargs: Any) -> Any:
        reply = await real(*args, **kwargs)
        streams = args[2] if len(args) > 2 else kwargs["streams"]
        if not lost["done"] and b">" not in streams.values() and ">" in streams.values():
            lost["done"] = True
            raise ConnectionError("reply lost")
        return reply

    env.redis.xreadgroup = lose_first_new_reply  # type: ignore[method-assign]
    task = asyncio.create_task(consumer.run())
    try:
        await _until_recorded(env, 3)
        for n in range(3, 6):
            await env.xadd(ev(env.user, n))
        await _until_recorded(env, 6)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert lost["done"]
    events = await env.events()
    assert [e.id for e in events] == [f"{env.user}-{n}" for n in range(6)]


async def _until_recorded(env: Env, n: int) -> None:
    async def recorded() -> bool:
        return len(await env.events()) >= n

    await until(recorded)  # the ledger has no change notification to await


async def test_a_lease_renewed_a_moment_ago_is_held_without_asking_redis(env: Env) -> None:
    consumer = env.consumer("c1", lease_seconds=0.6)
    assert await consumer.renew_lease()
    await env.redis.delete(consumer.lease_key)  # what Redis holds is not looked at ...
    assert await consumer.hold_lease()
    assert await env.redis.get(consumer.lease_key) is None
    await asyncio.sleep(0.25)  # past a third of the lease (the threshold, not a synchronisation)
    assert await consumer.hold_lease()  # ... until a third of the lease has gone by
    assert await env.redis.get(consumer.lease_key) == b"c1"
    other = env.consumer("c2", lease_seconds=0.6)
    assert not await other.hold_lease()  # another node may not record meanwhile
    assert not other.leader
    await env.redis.delete(consumer.lease_key)
