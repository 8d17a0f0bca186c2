"""The ledger's push side (models/pushes.py), on SQLite and on the real PostgreSQL."""

from __future__ import annotations

from models.ledger import Cursor, Ledger, NewEvent, now_ms
from models.pushes import Claimed, PushStore
from tests.harness import unique


def ev(user: str, **kw: object) -> NewEvent:
    fields: dict[str, object] = {"push_after": 10, **kw}
    return NewEvent(id=unique("e"), user=user, kind="block.grabbed", data='{"n":1}', **fields)  # type: ignore[arg-type]


async def test_registrations_are_one_per_device_and_removed_only_if_unchanged(
    ledger: Ledger,
) -> None:
    store = PushStore(ledger)
    user = unique()
    await store.register(user, "p1", "fcm", "tok-1", now=1)
    await store.register(user, "p1", "fcm", "tok-2", now=2)  # the app got a new token
    await store.register(user, "p2", "apns", "tok-3", now=2)
    assert await store.registrations(user) == {"p1": ("fcm", "tok-2"), "p2": ("apns", "tok-3")}
    assert not await store.unregister(user, "p1", token="tok-1")  # stale: kept
    assert await store.unregister(user, "p1", token="tok-2")
    assert await store.unregister(user, "p2")
    assert await store.registrations(user) == {}


async def test_a_push_is_decided_once_for_each_unacked_registered_device(ledger: Ledger) -> None:
    store = PushStore(ledger)
    user = unique()
    base = now_ms()
    for device in ("acked", "behind", "other"):
        await ledger.touch_device(user, device, now=base)
        await store.register(user, device, "fcm", f"tok-{device}", now=base)
    await ledger.touch_device(user, "unregistered", now=base)
    recorded = await ledger.record(
        [
            ev(user),  # 1: due at base + 10 s for every registered device not past it
            ev(user, device="other"),  # 2: for "other" only
            ev(user, push_after=None),  # 3: never pushed
            ev(user, ttl=5),  # 4: expired before it is due
            ev(user, collapse="plan"),  # 5: superseded by 6
            ev(user, collapse="plan", push_after=60),  # 6: due later
        ],
        now=base,
    )
    assert [r.seq for r in recorded] == [1, 2, 3, 4, 5, 6]
    await ledger.flush_cursors([Cursor(user, "acked", 2, 2, base + 1)])

    # The database is shared with other tests: look only at this user's decisions.
    async def claim(now: int) -> list[Claimed]:
        return [c for c in await store.claim(now, 30_000, limit=100_000) if c.user == user]

    await store.decide(now=base + 9_000)
    assert await claim(base + 9_000) == []  # nothing due yet
    assert await store.decide(now=base + 11_000) >= 3
    await store.decide(now=base + 12_000)  # a re-scan decides nothing twice
    claimed = await claim(base + 12_000)
    mine = sorted((c.device, c.seq) for c in claimed)
    assert mine == [("behind", 1), ("other", 1), ("other", 2)]
    first = next(c for c in claimed if c.key == (user, "other", 2))
    assert (first.provider, first.token, first.kind, first.acked_seq) == (
        "fcm",
        "tok-other",
        "block.grabbed",
        0,
    )
    # Claimed rows are not claimed again while their lease runs.
    assert await claim(base + 13_000) == []
    await store.finish([(user, "other", 1), (user, "other", 2)], "sent", base + 13_000, None, 2)
    await store.retry([(user, "behind", 1)], next_at=base + 20_000, reason="http_503")
    assert await claim(base + 19_000) == []
    again = await claim(base + 20_000)
    assert [(c.device, c.seq, c.attempts) for c in again] == [("behind", 1, 2)]
    # A claim whose node died is taken again once its lease has run out.
    taken = await claim(base + 50_001)
    assert [(c.device, c.seq, c.attempts) for c in taken] == [("behind", 1, 3)]
    await store.finish([c.key for c in taken], "failed", base + 50_002, "UNREGISTERED")
    states = await store.states(user, 1)
    assert {d: (s.state, s.reason) for d, s in states.items()} == {
        "behind": ("failed", "UNREGISTERED"),
        "other": ("sent", None),
    }
    assert states["other"].carried_by == 2
    assert (await store.states(user, 2))["other"].state == "sent"
    await ledger.prune(before=base + 1)
    assert await store.states(user, 1) == {}
