"""The ledger's push side: devices' push addresses and the push decisions.

A device that has not acked an event ``push_after`` seconds after it was published gets a
platform push, once. The decision is a row of ``pushes`` per (event, device), inserted by
a scan of ``events.push_at`` that every node may run: the scan holds the one row of
``push_scan`` while it decides, and the primary key makes a decision once, so nodes never
double it and a node that dies mid-scan leaves nothing half-decided (its transaction
rolls back and the next scan redoes it). Any node then claims due rows for a lease
(``claimed_by``, ``claimed_until``), sends, and finishes them; rows of a node that died
after claiming are claimed again once their lease runs out.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, or_, select, text, update

from models.ledger import Ledger
from models.tables import push_registrations, push_scan, pushes

SCAN_OVERLAP_MS = 5_000
"""Each scan looks this far behind the previous one, so that an event committed late (its
``push_at`` was already behind the scan mark) is still decided; the primary key keeps a
re-scanned decision single."""

_DECIDE = text(
    "INSERT INTO pushes (user_id, device_id, seq, state, attempts, next_at, decided_at,"
    " created_at)"
    " SELECT e.user_id, r.device_id, e.seq, 'due', 0, e.push_at, :now, e.created_at"
    " FROM events AS e JOIN push_registrations AS r ON r.user_id = e.user_id"
    " LEFT JOIN devices AS d ON d.user_id = r.user_id AND d.device_id = r.device_id"
    " WHERE e.push_at > :since AND e.push_at <= :now"
    " AND (e.device_id IS NULL OR e.device_id = r.device_id)"
    " AND COALESCE(d.acked_seq, 0) < e.seq"
    " AND e.superseded_by IS NULL AND (e.expires_at IS NULL OR e.expires_at > :now)"
    " ON CONFLICT DO NOTHING"
)
_CLAIM = (
    "UPDATE pushes SET state = 'sending', claimed_by = :claim, claimed_until = :until,"
    " attempts = attempts + 1"
    " WHERE (user_id, device_id, seq) IN (SELECT user_id, device_id, seq FROM pushes"
    " WHERE (state = 'due' AND next_at <= :now) OR (state = 'sending' AND claimed_until < :now)"
    " ORDER BY next_at LIMIT :lim{lock})"
)
_PG_CLAIM = text(_CLAIM.format(lock=" FOR UPDATE SKIP LOCKED"))
_SQLITE_CLAIM = text(_CLAIM.format(lock=""))
_CLAIMED = text(
    "SELECT p.user_id, p.device_id, p.seq, p.attempts, p.created_at, e.id, e.kind, e.data,"
    " e.expires_at, e.collapse, e.superseded_by, e.notification, COALESCE(d.acked_seq, 0),"
    " r.provider, r.token"
    " FROM pushes AS p JOIN events AS e ON e.user_id = p.user_id AND e.seq = p.seq"
    " LEFT JOIN devices AS d ON d.user_id = p.user_id AND d.device_id = p.device_id"
    " LEFT JOIN push_registrations AS r"
    " ON r.user_id = p.user_id AND r.device_id = p.device_id"
    " WHERE p.claimed_by = :claim AND p.state = 'sending'"
    " ORDER BY p.user_id, p.device_id, p.seq"
)


PROVIDER = re.compile(r"[a-z0-9_.-]{1,32}")
MAX_TOKEN = 4096


def push_address_problem(provider: object, token: object) -> str | None:
    """What is wrong with a push address, or None."""
    if not isinstance(provider, str) or not PROVIDER.fullmatch(provider):
        return "provider must be 1-32 characters of [a-z0-9_.-], e.g. fcm"
    if (
        not isinstance(token, str)
        or not 1 <= len(token) <= MAX_TOKEN
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in token)
    ):
        return f"token must be 1-{MAX_TOKEN} characters, no control characters"
    return None


def token_hint(token: str) -> str:
    """A push token as logs and views show it: never in full."""
    return f"…{token[-6:]}" if len(token) > 12 else "…"


@dataclass(frozen=True, slots=True)
class Claimed:
    """A claimed push decision, with what sending it needs."""

    user: str
    device: str
    seq: int
    attempts: int
    created_at: int
    event_id: str
    kind: str
    data: str
    expires_at: int | None
    collapse: str | None
    superseded_by: int | None
    notification: str | None
    acked_seq: int
    provider: str | None
    token: str | None

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.user, self.device, self.seq)


@dataclass(frozen=True, slots=True)
class PushState:
    """One device's push of one event, for ``GET /v1/events/{id}``."""

    state: str
    attempts: int
    reason: str | None
    decided_at: int
    done_at: int | None
    carried_by: int | None


class PushStore:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    # -- registrations ------------------------------------------------------------------------

    async def register(self, user: str, device: str, provider: str, token: str, now: int) -> None:
        """Set the device's push address (one per device: a new one replaces the old)."""
        values = {
            "user_id": user,
            "device_id": device,
            "provider": provider,
            "token": token,
            "updated_at": now,
        }
        stmt = self.ledger._insert()(push_registrations).values(values)
        stmt = stmt.on_conflict_do_update(
            index_elements=["user_id", "device_id"],
            set_={"provider": provider, "token": token, "updated_at": now},
        )
        async with self.ledger._tx() as conn:
            await conn.execute(stmt)

    async def unregister(self, user: str, device: str, token: str | None = None) -> bool:
        """Remove the device's push address (only if it is still ``token``, when given: a
        provider's "unregistered" must not remove an address the device replaced since)."""
        where = [push_registrations.c.user_id == user, push_registrations.c.device_id == device]
        if token is not None:
            where.append(push_registrations.c.token == token)
        async with self.ledger._tx() as conn:
            result = await conn.execute(delete(push_registrations).where(*where))
        return bool(getattr(result, "rowcount", 0))

    async def registrations(self, user: str) -> dict[str, tuple[str, str]]:
        """``device -> (provider, token)`` of the user's devices that have one."""
        stmt = select(
            push_registrations.c.device_id,
            push_registrations.c.provider,
            push_registrations.c.token,
        ).where(push_registrations.c.user_id == user)
        async with self.ledger._tx() as conn:
            return {r[0]: (r[1], r[2]) for r in await conn.execute(stmt)}

    # -- decisions ----------------------------------------------------------------------------

    async def decide(self, now: int) -> int:
        """Decide the pushes due by ``now``; answers how many were decided. Safe to run
        on every node at once: the scan mark's row serialises them."""
        async with self.ledger._tx() as conn:
            mark = select(push_scan.c.scanned_to).where(push_scan.c.id == 1)
            if self.ledger.dialect == "postgresql":
                mark = mark.with_for_update()
            scanned_to = (await conn.execute(mark)).scalar_one()
            if now <= scanned_to:
                return 0
            since = max(0, int(scanned_to) - SCAN_OVERLAP_MS)
            result = await conn.execute(_DECIDE, {"since": since, "now": now})
            await conn.execute(update(push_scan).where(push_scan.c.id == 1).values(scanned_to=now))
            return int(getattr(result, "rowcount", 0) or 0)

    async def claim(self, now: int, lease_ms: int, limit: int = 200) -> list[Claimed]:
        """Take up to ``limit`` due decisions (or ones whose claim ran out) for a lease."""
        claim = uuid.uuid4().hex
        stmt = _PG_CLAIM if self.ledger.dialect == "postgresql" else _SQLITE_CLAIM
        params = {"claim": claim, "until": now + lease_ms, "now": now, "lim": limit}
        async with self.ledger._tx() as conn:
            result = await conn.execute(stmt, params)
            if not getattr(result, "rowcount", 0):
                return []
            rows = await conn.execute(_CLAIMED, {"claim": claim})
            return [Claimed(*r) for r in rows]

    async def finish(
        self,
        keys: Sequence[tuple[str, str, int]],
        state: str,
        now: int,
        reason: str | None = None,
        carried_by: int | None = None,
    ) -> None:
        """Mark claimed decisions ``sent``, ``skipped`` or ``failed``."""
        values: dict[str, Any] = {
            "state": state,
            "done_at": now,
            "reason": reason,
            "carried_by": carried_by,
            "claimed_by": None,
            "claimed_until": None,
        }
        await self._update(keys, values)

    async def retry(self, keys: Sequence[tuple[str, str, int]], next_at: int, reason: str) -> None:
        """Put claimed decisions back as due at ``next_at`` (after a retryable answer)."""
        values = {
            "state": "due",
            "next_at": next_at,
            "reason": reason,
            "claimed_by": None,
            "claimed_until": None,
        }
        await self._update(keys, values)

    async def _update(self, keys: Sequence[tuple[str, str, int]], values: dict[str, Any]) -> None:
        if not keys:
            return
        match = or_(
            *(
                and_(pushes.c.user_id == u, pushes.c.device_id == d, pushes.c.seq == s)
                for u, d, s in keys
            )
        )
        async with self.ledger._tx() as conn:
            await conn.execute(update(pushes).where(match).values(**values))

    async def states(self, user: str, seq: int) -> dict[str, PushState]:
        """``device -> PushState`` of event ``seq`` of ``user``."""
        stmt = select(
            pushes.c.device_id,
            pushes.c.state,
            pushes.c.attempts,
            pushes.c.reason,
            pushes.c.decided_at,
            pushes.c.done_at,
            pushes.c.carried_by,
        ).where(pushes.c.user_id == user, pushes.c.seq == seq)
        async with self.ledger._tx() as conn:
            return {r[0]: PushState(*r[1:]) for r in await conn.execute(stmt)}
