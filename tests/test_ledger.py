"""The ledger contract: the same tests on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio

from sqlalchemy import text

from models.ledger import (
    Cursor,
    DeviceLimit,
    DeviceState,
    IdConflict,
    Ledger,
    NewEvent,
    delivery_status,
)
from tests.harness import unique


def ev(user: str, id: str | None = None, **kw: object) -> NewEvent:
    return NewEvent(id=id or unique("e"), user=user, kind="block.grabbed", data='{"n":1}', **kw)  # type: ignore[arg-type]


async def test_seq_is_per_user_contiguous_and_in_batch_order(ledger: Ledger) -> None:
    a, b = unique(), unique()
    answers = await ledger.record([ev(a), ev(b), ev(a), ev(a), ev(b)])
    assert [(r.user == a, r.seq) for r in answers] == [
        (True, 1),
        (False, 1),
        (True, 2),
        (True, 3),
        (False, 2),
    ]
    more = await ledger.record([ev(a)])
    assert more[0].seq == 4
    assert (await ledger.heads([a, b, unique()])) == {a: 4, b: 2}


async def test_idempotent_ids_in_ledger_and_in_batch(ledger: Ledger) -> None:
    user = unique()
    key = unique("grab")
    first = await ledger.record([ev(user, key)])
    assert not first[0].duplicate and first[0].event is not None
    again = await ledger.record([ev(user, key), ev(user), ev(user, key)])
    assert again[0].duplicate and again[0].seq == first[0].seq and again[0].event is None
    assert not again[1].duplicate and again[1].seq == 2
    assert again[2].duplicate and again[2].seq == first[0].seq
    same_batch = await ledger.record([ev(user, "dup-" + key), ev(user, "dup-" + key)])
    assert [r.duplicate for r in same_batch] == [False, True]
    assert same_batch[0].seq == same_batch[1].seq == 3


async def test_concurrent_batches_of_one_user_commit_in_seq_order(ledger: Ledger) -> None:
    user = unique()
    batches = [[ev(user) for _ in range(5)] for _ in range(8)]
    results = await asyncio.gather(*(ledger.record(b) for b in batches))
    seqs = sorted(r.seq for batch in results for r in batch)
    assert seqs == list(range(1, 41))
    rows, head = await ledger.backfill(user, "d", 0, 100)
    assert head == 40 and [r.seq for r in rows] == list(range(1, 41))


async def test_concurrent_duplicates_record_once(ledger: Ledger) -> None:
    user, key = unique(), unique("k")
    results = await asyncio.gather(*(ledger.record([ev(user, key)]) for _ in range(6)))
    flat = [r for batch in results for r in batch]
    assert sum(not r.duplicate for r in flat) == 1
    assert len({r.seq for r in flat}) == 1


async def test_concurrent_batches_sharing_ids_record_each_once_without_gaps(
    ledger: Ledger,
) -> None:
    # Batches of new ids take PostgreSQL's one-statement path; one that loses a race for an
    # id (or a deadlock over two) is undone whole and answered by the full path.
    users = [unique() for _ in range(3)]
    orders = [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 4, 1, 5, 3]] * 3
    for _ in range(3):
        keys = [unique("shared") for _ in range(6)]
        batches = [[ev(users[k % 3], keys[k]) for k in o] + [ev(users[0])] for o in orders]
        results = await asyncio.gather(*(ledger.record(b) for b in batches))
        by_key: dict[str, set[int]] = {}
        firsts = 0
        for answers in results:
            for r in answers:
                by_key.setdefault(r.id, set()).add(r.seq)
                firsts += not r.duplicate
        assert all(len(seqs) == 1 for seqs in by_key.values())  # one seq per id
        assert firsts == len(keys) + len(orders)  # each shared id once, each own id once
    heads = await ledger.heads(users)
    for user in users:
        rows, head = await ledger.backfill(user, "d", 0, 100)
        assert head == heads[user] and [r.seq for r in rows] == list(range(1, head + 1))


async def test_backfill_of_many_devices_at_once_matches_each_alone(ledger: Ledger) -> None:
    now = 1_000_000
    users = [unique() for _ in range(3)]
    for n, user in enumerate(users):
        await ledger.record(
            [ev(user, device="d1"), ev(user, ttl=10), ev(user, collapse="c"), ev(user)]
            + [ev(user, collapse="c") for _ in range(n)],
            now=now,
        )
    stranger = unique()
    wanted = [(u, d, a) for u in users for d in ("d1", "d2") for a in (0, 1, 3, 9)]
    # Past one statement's chunk of devices, with a user that has no events at all.
    wanted += [(users[0], f"x{i}", i % 4) for i in range(1100)] + [(stranger, "d1", 0)]
    many = await ledger.backfill_many(wanted, 2, now=now + 20_000)
    assert len(many) == len(wanted)
    for k in [*range(24), *range(24, len(wanted), 37)]:  # every user's cases, a sample of x*
        user, device, after = wanted[k]
        assert many[k] == await ledger.backfill(user, device, after, 2, now=now + 20_000), k
    assert many[0][1] == 4 and [r.seq for r in many[0][0]] == [1, 3]
    assert many[-1] == ([], 0)
    assert await ledger.backfill_many([], 10) == []


async def test_backfill_filters_device_expiry_and_supersession(ledger: Ledger) -> None:
    user = unique()
    now = 1_000_000
    await ledger.record(
        [
            ev(user, device="d1"),  # 1: for d1 only
            ev(user, device="d2"),  # 2: for d2 only
            ev(user, ttl=10),  # 3: expires at now + 10s
            ev(user, collapse="plan"),  # 4: superseded by 6
            ev(user, collapse="plan", device="d1"),  # 5: other target, not superseded by 6
            ev(user, collapse="plan"),  # 6
        ],
        now=now,
    )
    rows, head = await ledger.backfill(user, "d1", 0, 100, now=now + 1)
    assert head == 6
    assert [r.seq for r in rows] == [1, 3, 5, 6]
    rows, _ = await ledger.backfill(user, "d2", 0, 100, now=now + 20_000)
    assert [r.seq for r in rows] == [2, 6]
    rows, _ = await ledger.backfill(user, "d1", 3, 100, now=now)
    assert [r.seq for r in rows] == [5, 6]
    page, head = await ledger.backfill(user, "d1", 0, 2, now=now)
    assert [r.seq for r in page] == [1, 3] and head == 6
    assert await ledger.backfill(user, "d1", 6, 100) == ([], 6)
    assert await ledger.backfill(unique(), "d1", 0, 100) == ([], 0)


async def test_cursors_move_forward_only_in_one_flush(ledger: Ledger) -> None:
    user = unique()
    assert await ledger.touch_device(user, "d1", now=10) == 0
    assert await ledger.touch_device(user, "d2", now=10) == 0
    await ledger.flush_cursors([Cursor(user, "d1", 5, 7, 20), Cursor(user, "d2", 0, 3, 30)])
    await ledger.flush_cursors([Cursor(user, "d1", 4, 6, 15)])  # older: ignored
    devices = {d.device: d for d in await ledger.devices(user)}
    assert (devices["d1"].acked_seq, devices["d1"].sent_seq, devices["d1"].last_seen) == (5, 7, 20)
    assert (devices["d2"].acked_seq, devices["d2"].sent_seq) == (0, 3)
    assert await ledger.touch_device(user, "d1", now=40) == 5  # reconnect answers the cursor


async def test_delivery_status_per_device(ledger: Ledger) -> None:
    user = unique()
    recorded = await ledger.record(
        [ev(user, collapse="p"), ev(user, ttl=1), ev(user, collapse="p")], now=1000
    )
    first = await ledger.get_event(recorded[0].id)
    expiring = await ledger.get_event(recorded[1].id)
    assert first is not None and first.superseded_by == 3 and expiring is not None

    def dev(acked: int, sent: int) -> DeviceState:
        return DeviceState(user, "d", acked, sent, 0, 0)

    assert delivery_status(first, dev(1, 1), 2000) == "acked"
    assert delivery_status(first, dev(0, 3), 2000) == "superseded"
    assert delivery_status(first, dev(0, 0), 2000) == "superseded"
    assert delivery_status(expiring, dev(0, 0), 1500) == "pending"
    assert delivery_status(expiring, dev(0, 2), 1500) == "sent"
    assert delivery_status(expiring, dev(0, 2), 2001) == "expired"
    assert delivery_status(expiring, dev(2, 2), 2001) == "acked"
    assert await ledger.get_event(unique()) is None


async def test_superseded_events_a_device_never_got_stay_superseded(ledger: Ledger) -> None:
    user = unique()
    [first] = await ledger.record([ev(user, collapse="plan")], now=1000)
    for device in ("online", "away", "phone"):
        await ledger.touch_device(user, device, now=1001)
    # "online" was sent the first plan live; the others reconnect after it is superseded.
    await ledger.flush_cursors([Cursor(user, "online", 0, first.seq, 1002)])
    await ledger.record([ev(user, collapse="plan", device="phone")], now=1500)  # other key
    [newer] = await ledger.record([ev(user, collapse="plan")], now=2000)
    many = await ledger.backfill_many(
        [(user, "away", 0), (user, "phone", 0), (user, "online", first.seq)], 100, now=3000
    )
    assert [[r.seq for r in page] for page, _ in many] == [[3], [2, 3], [3]]
    assert await ledger.skipped_devices(user, first.seq) == {"away", "phone"}
    assert await ledger.skipped_devices(user, newer.seq) == set()
    await ledger.backfill(user, "away", 0, 100, now=3000)  # again: recorded once
    stored = await ledger.get_event(first.id)
    assert stored is not None and stored.superseded_by == newer.seq
    # Every device acks past it: only the one that got it reads acked.
    moves = [Cursor(user, d, newer.seq, newer.seq, 4000) for d in ("online", "away", "phone")]
    await ledger.flush_cursors(moves)
    skipped = await ledger.skipped_devices(user, first.seq)
    status = {
        d.device: delivery_status(stored, d, 5000, d.device in skipped)
        for d in await ledger.devices(user)
    }
    assert status == {"online": "acked", "away": "superseded", "phone": "superseded"}
    await ledger.prune(before=10**13)
    assert await ledger.skipped_devices(user, first.seq) == set()


async def test_prune_removes_only_old_events_and_keeps_the_pruned_seq(ledger: Ledger) -> None:
    user, other = unique(), unique()
    await ledger.record([ev(user), ev(user), ev(other)], now=1)
    await ledger.record([ev(user)], now=10**13)
    assert await ledger.prune(before=2) >= 3
    rows, head = await ledger.backfill(user, "d", 0, 10, now=1)
    assert [r.seq for r in rows] == [3] and head == 3
    nobody = unique()
    reg = await ledger.register_devices([(user, "d"), (other, "d"), (nobody, "d")])
    assert {k[0]: (r.head, r.pruned) for k, r in reg.registered.items()} == {
        user: (3, 2),
        other: (1, 1),
        nobody: (0, 0),
    }


async def test_register_devices_in_one_batch(ledger: Ledger) -> None:
    a, b = unique(), unique()
    await ledger.record([ev(a), ev(a), ev(a)])
    await ledger.flush_cursors([])  # nothing to do
    first = await ledger.register_devices([(a, "p1"), (a, "p2"), (b, "p1"), (a, "p1")], now=5)
    assert {k: (r.acked, r.head) for k, r in first.registered.items()} == {
        (a, "p1"): (0, 3),
        (a, "p2"): (0, 3),
        (b, "p1"): (0, 0),
    }
    await ledger.flush_cursors([Cursor(a, "p1", 2, 2, 6)])
    again = await ledger.register_devices([(a, "p1")], now=7)
    assert {k: (r.acked, r.head) for k, r in again.registered.items()} == {(a, "p1"): (2, 3)}
    assert [d.last_seen for d in await ledger.devices(a)] == [7, 5]


async def test_lone_events_dedupe_conflict_and_keep_seqs_contiguous(ledger: Ledger) -> None:
    # A lone event without a collapse key takes PostgreSQL's one-statement path.
    user = unique()
    key = unique("lone")
    first = await ledger.record([ev(user, key, ttl=60, device="d1")], now=5000)
    assert [(r.seq, r.duplicate) for r in first] == [(1, False)]
    stored = first[0].event
    assert stored is not None and (stored.expires_at, stored.device) == (65_000, "d1")
    assert await ledger.get_event(key) == stored
    again = await ledger.record([ev(user, key, ttl=60, device="d1")])
    assert [(r.user, r.seq, r.duplicate, r.event) for r in again] == [(user, 1, True, None)]
    try:
        await ledger.record([ev(user, key)])  # other content (no ttl, no device)
    except IdConflict as exc:
        assert exc.indexes == [0]
    else:
        raise AssertionError("a lone reused id with other content was accepted")
    nxt = await ledger.record([ev(user)])
    assert nxt[0].seq == 2 and await ledger.heads([user]) == {user: 2}  # no gap


async def test_a_reused_id_with_other_content_conflicts_and_records_nothing(ledger: Ledger) -> None:
    user = unique()
    key = unique("grab")
    await ledger.record([ev(user, key)])
    same = await ledger.record([ev(user, key)])
    assert same[0].duplicate
    for other in (
        NewEvent(id=key, user=user, kind="block.grabbed", data='{"n":2}'),
        NewEvent(id=key, user=unique(), kind="block.grabbed", data='{"n":1}'),
        NewEvent(id=key, user=user, kind="block.released", data='{"n":1}'),
        NewEvent(id=key, user=user, kind="block.grabbed", data='{"n":1}', ttl=60),
        NewEvent(id=key, user=user, kind="block.grabbed", data='{"n":1}', collapse="c"),
        NewEvent(id=key, user=user, kind="block.grabbed", data='{"n":1}', device="d1"),
    ):
        try:
            await ledger.record([ev(user), other])
        except IdConflict as exc:
            assert exc.indexes == [1]
        else:
            raise AssertionError(f"{other} was not a conflict")
    assert await ledger.heads([user]) == {user: 1}  # the batches were not written at all
    twin = unique("twin")
    try:
        await ledger.record([ev(user, twin), NewEvent(twin, user, "block.grabbed", '{"n":3}')])
    except IdConflict as exc:
        assert exc.indexes == [1]
    else:
        raise AssertionError("a conflict inside one batch was accepted")


async def test_device_limit_refuses_new_devices_past_the_cap(ledger: Ledger) -> None:
    user = unique()
    cap = DeviceLimit(2)
    first = await ledger.register_devices([(user, "a"), (user, "b")], now=1, limit=cap)
    assert set(first.registered) == {(user, "a"), (user, "b")} and not first.refused
    third = await ledger.register_devices([(user, "c"), (user, "a")], now=2, limit=cap)
    assert third.refused == {(user, "c")} and set(third.registered) == {(user, "a")}
    assert [d.device for d in await ledger.devices(user)] == ["a", "b"]
    burst = await ledger.register_devices([(user, "x"), (user, "y")], now=3, limit=DeviceLimit(3))
    assert len(burst.refused) == 1 and len(burst.registered) == 1
    assert len(await ledger.devices(user)) == 3


async def test_device_limit_evicts_the_least_recently_seen(ledger: Ledger) -> None:
    user = unique()
    cap = DeviceLimit(2, evict=True)
    await ledger.register_devices([(user, "old")], now=1, limit=cap)
    await ledger.register_devices([(user, "mid")], now=2, limit=cap)
    await ledger.register_devices([(user, "old")], now=3, limit=cap)  # "mid" is now the oldest
    got = await ledger.register_devices([(user, "new")], now=4, limit=cap)
    assert got.evicted == [(user, "mid")] and not got.refused
    assert [d.device for d in await ledger.devices(user)] == ["new", "old"]


async def test_concurrent_new_devices_never_pass_the_cap(ledger: Ledger) -> None:
    user = unique()
    cap = DeviceLimit(3)
    results = await asyncio.gather(
        *(ledger.register_devices([(user, f"d{i}")], limit=cap) for i in range(8))
    )
    assert sum(len(r.registered) for r in results) == 3
    assert len(await ledger.devices(user)) == 3


async def test_devices_not_seen_for_the_retention_period_are_pruned(ledger: Ledger) -> None:
    user = unique()
    await ledger.register_devices([(user, "gone")], now=10)
    await ledger.register_devices([(user, "here")], now=10**13)
    assert await ledger.prune_devices(before=11) >= 1
    assert [d.device for d in await ledger.devices(user)] == ["here"]


async def test_postgres_connections_never_compile_statements(postgres_url: str) -> None:
    """JIT compiled the one-statement publish at every execution (3-4 ms for a statement
    that runs in under 1 ms): the ledger's connections turn it off."""
    ledger = Ledger.from_url(postgres_url)
    try:
        async with ledger._driver() as pg:
            assert await pg.fetchval("SHOW jit") == "off"
        async with ledger.engine.connect() as conn:
            assert (await conn.execute(text("SHOW jit"))).scalar() == "off"
    finally:
        await ledger.close()
