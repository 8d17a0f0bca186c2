"""The ledger: durable events and per-device cursors, on PostgreSQL or SQLite.

Guarantees:

* ``record`` is idempotent on the event ``id`` and atomic per batch: a batch is
  either wholly durable (and answered) or not written at all.
* ``seq`` is allocated by bumping the user's ``streams`` row inside the same
  transaction, so a user's events commit in ``seq`` order and a user's ``seq``
  values are contiguous except where a concurrent duplicate burned one.
* Delivery state per device is two cursors (``acked_seq``, ``sent_seq``); they
  only move forward and are written in one statement per flush for all devices.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import and_, bindparam, event, func, or_, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    SQLAlchemyError,
)
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from models.tables import devices, events, push_registrations, pushes, skipped, streams

log = logging.getLogger("courier.ledger")

MIGRATIONS = Path(__file__).with_name("migrations")
_CHUNK = 500  # rows per multi-row statement (well under both drivers' parameter limits)


class LedgerUnavailable(Exception):
    """The database could not be reached or did not answer; nothing was half-written."""


class LedgerRefused(Exception):
    """The database refused the data itself (retrying the same input cannot succeed)."""


class IdConflict(LedgerRefused):
    """Ids of the batch are taken by events of other content; nothing was recorded.

    ``indexes`` are the positions in the batch of the events that conflict.
    """

    def __init__(self, indexes: list[int]) -> None:
        super().__init__(f"{len(indexes)} event id(s) already used for other content")
        self.indexes = indexes


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class NewEvent:
    """A validated event to record. ``data`` is already-encoded JSON object text."""

    id: str
    user: str
    kind: str
    data: str
    device: str | None = None
    ttl: int | None = None
    collapse: str | None = None
    digest: str = ""
    push_after: int | None = None
    """Seconds after which a device that has not acked it gets a push; None: never."""
    notification: str | None = None
    """The push notification (JSON text of ``{"title", "body"}``), if the publisher gave one."""
    """What makes two events with one ``id`` the same (see :func:`content_digest`);
    empty: computed from the fields as they are."""

    def content(self) -> str:
        push = None
        if self.push_after is not None or self.notification is not None:
            push = {"push_after": self.push_after, "notification": self.notification}
        return self.digest or content_digest(
            self.user, self.kind, self.data, self.device, self.ttl, self.collapse, push
        )


def content_digest(
    user: str, kind: str, data: str | bytes, device: str | None, ttl: int | None,
    collapse: str | None, push: Any = None,
) -> str:  # fmt: skip
    """SHA-256 of an event's content; ``data`` should be encoded with sorted keys, so that
    a retry that orders the keys of ``data`` differently is still the same event.
    ``push``: the push fields the publisher gave, if any (so digests of events without
    them are what they were before those fields existed)."""
    raw = data.encode() if isinstance(data, str) else data
    fields: list[Any] = [user, kind, device, ttl, collapse]
    if push is not None:
        fields.append(push)
    head = json.dumps(fields, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(head.encode() + b"\n" + raw).hexdigest()


@dataclass(frozen=True, slots=True)
class StoredEvent:
    user: str
    seq: int
    id: str
    kind: str
    data: str
    created_at: int
    device: str | None = None
    expires_at: int | None = None
    collapse: str | None = None
    superseded_by: int | None = None


@dataclass(frozen=True, slots=True)
class Recorded:
    """The answer for one published event. ``event`` is None for a duplicate."""

    id: str
    user: str
    seq: int
    duplicate: bool
    event: StoredEvent | None


class Cursor(NamedTuple):
    """A forward move of one device's cursors (0 means: leave as is). A named tuple: a
    flush makes one per device moved, thousands every 50 ms under load."""

    user: str
    device: str
    acked: int
    sent: int
    seen: int


@dataclass(frozen=True, slots=True)
class Registration:
    """A connecting device's acked cursor and its user's stream head and pruned seq."""

    acked: int
    head: int
    pruned: int


@dataclass(frozen=True, slots=True)
class DeviceLimit:
    """At most ``cap`` devices per user; past it a new device is refused, or (``evict``)
    the user's least recently seen devices are deleted to make room for it."""

    cap: int
    evict: bool = False


@dataclass(frozen=True, slots=True)
class Admission:
    """The outcome of a batch of registrations: registered devices, the new devices
    refused by the device limit, and the devices evicted to make room."""

    registered: dict[tuple[str, str], Registration]
    refused: set[tuple[str, str]]
    evicted: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class DeviceState:
    user: str
    device: str
    acked_seq: int
    sent_seq: int
    created_at: int
    last_seen: int


_EVENT_COLUMNS = (
    events.c.user_id,
    events.c.seq,
    events.c.id,
    events.c.kind,
    events.c.data,
    events.c.created_at,
    events.c.device_id,
    events.c.expires_at,
    events.c.collapse,
    events.c.superseded_by,
)


# Fixed statements, compiled once: a batch's rows travel as parameters (PostgreSQL:
# arrays through unnest, one round trip; SQLite: executemany), never as new SQL text.
_EVENT_KEYS = (
    "user_id",
    "seq",
    "id",
    "device_id",
    "kind",
    "data",
    "created_at",
    "expires_at",
    "collapse",
    "digest",
    "push_at",
    "notification",
)
_PG_INSERT_EVENTS = text(
    "INSERT INTO events (user_id, seq, id, device_id, kind, data, created_at, expires_at,"
    " collapse, digest, push_at, notification)"
    " SELECT * FROM unnest(CAST(:user_id AS text[]), CAST(:seq AS bigint[]),"
    " CAST(:id AS text[]), CAST(:device_id AS text[]), CAST(:kind AS text[]),"
    " CAST(:data AS text[]), CAST(:created_at AS bigint[]), CAST(:expires_at AS bigint[]),"
    " CAST(:collapse AS text[]), CAST(:digest AS text[]), CAST(:push_at AS bigint[]),"
    " CAST(:notification AS text[]))"
    " ON CONFLICT (id) DO NOTHING RETURNING id"
)
_PG_ALLOCATE = text(
    "INSERT INTO streams (user_id, last_seq)"
    " SELECT * FROM unnest(CAST(:users AS text[]), CAST(:counts AS bigint[]))"
    " ON CONFLICT (user_id) DO UPDATE SET last_seq = streams.last_seq + EXCLUDED.last_seq"
    " RETURNING user_id, last_seq"
)
_PG_RECORD_NEW = (  # Ledger._record_new: a batch of new events in one statement (asyncpg)
    "WITH input AS (SELECT * FROM unnest($1::varchar[], $2::varchar[], $3::varchar[],"
    " $4::varchar[], $5::text[], $6::bigint[], $7::varchar[], $8::bigint[], $9::text[])"
    " WITH ORDINALITY AS t(id, user_id, device_id, kind, data, expires_at, digest, push_at,"
    " notification, ord)),"
    " alloc AS (INSERT INTO streams (user_id, last_seq)"
    " SELECT * FROM unnest($11::varchar[], $12::bigint[])"
    " ON CONFLICT (user_id) DO UPDATE SET last_seq = streams.last_seq + EXCLUDED.last_seq"
    " RETURNING user_id, last_seq),"
    " counted AS (SELECT u, n FROM unnest($11::varchar[], $12::bigint[]) AS c(u, n))"
    " INSERT INTO events (user_id, seq, id, device_id, kind, data, created_at, expires_at,"
    " collapse, digest, push_at, notification)"
    " SELECT i.user_id,"
    " a.last_seq - c.n + row_number() OVER (PARTITION BY i.user_id ORDER BY i.ord),"
    " i.id, i.device_id, i.kind, i.data, $10, i.expires_at, NULL, i.digest, i.push_at,"
    " i.notification"
    " FROM input i JOIN alloc a ON a.user_id = i.user_id JOIN counted c ON c.u = i.user_id"
    " RETURNING id, seq"
)
_PG_SUPERSEDE = text(  # Ledger._supersede: every (user, device, collapse) key at once
    "UPDATE events AS e SET superseded_by = k.seq"
    " FROM unnest(CAST(:users AS varchar[]), CAST(:devices AS varchar[]),"
    " CAST(:collapses AS varchar[]), CAST(:seqs AS bigint[])) AS k(u, d, c, seq)"
    " WHERE e.user_id = k.u AND e.collapse = k.c AND e.device_id IS NOT DISTINCT FROM k.d"
    " AND e.seq < k.seq AND e.superseded_by IS NULL"
)
_PG_REGISTER = text(
    "WITH up AS ("
    " INSERT INTO devices (user_id, device_id, acked_seq, sent_seq, created_at, last_seen)"
    " SELECT u, d, 0, 0, :now, :now"
    " FROM unnest(CAST(:users AS text[]), CAST(:devices AS text[])) AS v(u, d)"
    " ON CONFLICT (user_id, device_id) DO UPDATE SET last_seen = EXCLUDED.last_seen"
    " RETURNING user_id, device_id, acked_seq, (xmax = 0) AS inserted)"
    " SELECT up.user_id, up.device_id, up.acked_seq, COALESCE(s.last_seq, 0),"
    " COALESCE(s.pruned_seq, 0), up.inserted"
    " FROM up LEFT JOIN streams s ON s.user_id = up.user_id"
)
_PG_LOOKUP_IDS = text(  # a join, not "id = ANY(:ids)": the planner scanned the table for that
    "SELECT e.id, e.user_id, e.seq, e.digest"
    " FROM unnest(CAST(:ids AS varchar[])) AS k(id) JOIN events e ON e.id = k.id"
)
_PG_HEADS = text(
    "SELECT user_id, last_seq FROM streams WHERE user_id = ANY(CAST(:users AS varchar[]))"
)
_PG_BACKFILL = (  # Ledger.backfill_many on asyncpg: heads, pages and skipped in one statement
    "WITH r AS (SELECT r.i, r.u, r.d, r.after, COALESCE(s.last_seq, 0) AS head"
    " FROM unnest($1::int[], $2::varchar[], $3::varchar[], $4::bigint[]) AS r(i, u, d, after)"
    " LEFT JOIN streams s ON s.user_id = r.u),"
    # The superseded events each backfill passes over: the device never gets them.
    " passed AS (INSERT INTO skipped (user_id, device_id, seq, created_at)"
    " SELECT r.u, r.d, e.seq, e.created_at FROM r"
    " JOIN events e ON e.user_id = r.u AND e.seq > r.after AND e.seq <= r.head"
    " AND (e.device_id IS NULL OR e.device_id = r.d) AND e.superseded_by IS NOT NULL"
    " ON CONFLICT DO NOTHING)"
    " SELECT r.i, r.head, e.user_id, e.seq, e.id, e.kind, e.data, e.created_at, e.device_id,"
    " e.expires_at, e.collapse, e.superseded_by"
    " FROM r LEFT JOIN LATERAL (SELECT * FROM events"
    " WHERE events.user_id = r.u AND events.seq > r.after AND events.seq <= r.head"
    " AND (events.device_id IS NULL OR events.device_id = r.d)"
    " AND (events.expires_at IS NULL OR events.expires_at > $5)"
    " AND events.superseded_by IS NULL"
    " ORDER BY events.seq LIMIT $6) AS e ON true"
    " ORDER BY r.i, e.seq"
)
_PG_LOCK_USERS = text(
    "SELECT pg_advisory_xact_lock(hashtext('courier.devices:' || u))"
    " FROM unnest(CAST(:users AS text[])) AS u ORDER BY u"
)
_sqlite_devices = sqlite.insert(devices)
_SQLITE_REGISTER = _sqlite_devices.on_conflict_do_update(
    index_elements=["user_id", "device_id"],
    set_={"last_seen": _sqlite_devices.excluded.last_seen},
).returning(devices.c.user_id, devices.c.device_id, devices.c.acked_seq)
_SQLITE_INSERT_EVENTS = (
    sqlite.insert(events).on_conflict_do_nothing(index_elements=["id"]).returning(events.c.id)
)
_sqlite_streams = sqlite.insert(streams)
_SQLITE_ALLOCATE = _sqlite_streams.on_conflict_do_update(
    index_elements=["user_id"],
    set_={"last_seq": streams.c.last_seq + _sqlite_streams.excluded.last_seq},
).returning(streams.c.user_id, streams.c.last_seq)


def _expires_at(e: NewEvent, now: int) -> int | None:
    return None if e.ttl is None else now + e.ttl * 1000


def _push_at(e: NewEvent, now: int) -> int | None:
    return None if e.push_after is None else now + e.push_after * 1000


def _stored(row: Any) -> StoredEvent:
    return StoredEvent(*row)


def create_engine(url: str) -> AsyncEngine:
    """An engine tuned for the backend: one writer connection for SQLite, a pool for PostgreSQL."""
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url, pool_size=1, max_overflow=0, pool_timeout=30, connect_args={"timeout": 30}
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    engine = create_async_engine(
        url,
        pool_size=10,
        max_overflow=10,
        pool_timeout=5,
        connect_args={"timeout": 5, "command_timeout": 15},
    )

    @event.listens_for(engine.sync_engine, "connect")
    def _no_jit(dbapi_conn: Any, _record: Any) -> None:
        # PostgreSQL (11+) compiles a statement to machine code when its plan looks costly,
        # and the planner cannot see how many rows the ledger's arrays hold: the publish
        # statement was compiled at every execution, 3-4 ms for a statement that runs in
        # under 1 ms (docs/benchmarks.md, fifth round). Every statement here is short.
        # A SET, not a startup parameter, which connection poolers such as PgBouncer refuse.
        dbapi_conn.run_async(lambda pg: pg.execute("SET jit = off"))

    @event.listens_for(engine.sync_engine, "checkout")
    def _alive(_dbapi_conn: Any, _record: Any, proxy: Any) -> None:
        # A pooled connection the server closed (a restart, an idle timeout) is known to
        # asyncpg without a round trip; the pool replaces it. SQLAlchemy's pre-ping would
        # ask the server on every checkout (BEGIN, SELECT, ROLLBACK: three round trips,
        # more than the single statement of a publish). A connection that fails in use is
        # invalidated with the rest of the pool, as SQLAlchemy does on any disconnect.
        if proxy.driver_connection.is_closed():
            raise DisconnectionError("the pooled connection was closed")

    return engine


class Ledger:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    @classmethod
    def from_url(cls, url: str) -> Ledger:
        return cls(create_engine(url))

    async def close(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def _tx(self, autocommit: bool = False) -> AsyncIterator[AsyncConnection]:
        """One transaction (or, ``autocommit``, statements that each commit on their own);
        data the database refuses becomes ``LedgerRefused``, faults ``LedgerUnavailable``."""
        try:
            if autocommit:
                async with self.engine.connect() as raw:
                    yield await raw.execution_options(isolation_level="AUTOCOMMIT")
            else:
                async with self.engine.begin() as conn:
                    yield conn
        except (DataError, IntegrityError) as exc:
            raise LedgerRefused(_describe(exc)) from exc
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            raise LedgerUnavailable(_describe(exc)) from exc

    def _insert(self) -> Any:
        return postgresql.insert if self.dialect == "postgresql" else sqlite.insert

    @asynccontextmanager
    async def _driver(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled PostgreSQL connection's own asyncpg driver, for the hot statements:
        each statement commits on its own, without SQLAlchemy's per-statement and per-row
        work (a reconnect storm reads 100,000 rows). Faults map as in ``_tx``; a connection
        broken in use is invalidated, with the rest of the pool."""
        try:
            async with self.engine.connect() as conn:
                raw = await conn.get_raw_connection()
                try:
                    yield raw.driver_connection  # type: ignore[misc]
                except (asyncpg.InterfaceError, OSError):
                    await conn.invalidate()
                    raise
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            raise LedgerRefused(_describe(exc)) from exc
        except (asyncpg.PostgresError, asyncpg.InterfaceError, SQLAlchemyError) as exc:
            raise LedgerUnavailable(_describe(exc)) from exc
        except (OSError, TimeoutError) as exc:
            raise LedgerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def ping(self) -> None:
        async with self._tx() as conn:
            await conn.execute(text("SELECT 1"))

    async def schema_revision(self) -> str | None:
        async with self._tx() as conn:
            try:
                row = (await conn.execute(text("SELECT version_num FROM alembic_version"))).first()
            except DBAPIError:
                return None
            return None if row is None else str(row[0])

    # -- publishing -------------------------------------------------------------------------

    async def record(self, batch: Sequence[NewEvent], now: int | None = None) -> list[Recorded]:
        """Record a batch in one transaction; answers in the batch's order.

        A repeated ``id`` (in the ledger already, or earlier in the same batch) with the
        same content is a duplicate: it records nothing and answers with the first event's
        seq. With other content it raises ``IdConflict`` and nothing of the batch is written.
        """
        if not batch:
            return []
        now = now_ms() if now is None else now
        if (
            self.dialect == "postgresql"
            and all(e.collapse is None for e in batch)
            and len({e.id for e in batch}) == len(batch)
        ):
            fresh = await self._record_new(batch, now)
            if fresh is not None:
                return fresh
        for attempt in range(3):
            try:
                async with self._tx() as conn:
                    return await self._record(conn, batch, now)
            except LedgerUnavailable as exc:
                # A deadlock between two batches that share ids is resolved by a retry.
                if "deadlock" not in str(exc) or attempt == 2:
                    raise
                log.warning("ledger: deadlock recording a batch, retrying")
        raise AssertionError("unreachable")

    async def _record_new(self, batch: Sequence[NewEvent], now: int) -> list[Recorded] | None:
        """A batch of new events, none with a collapse key (every publish unless a publisher
        retries): seqs allocated and events inserted by one statement on PostgreSQL,
        committed on its own (one round trip instead of six, without SQLAlchemy's
        per-statement work). None when that cannot answer: an id is in the ledger already
        (a retry), or a concurrent publish of one of the ids got in first. Either is a
        unique violation that undoes the whole statement, seqs included; the full path
        answers those.

        The statement reads no table but through the rows it writes: an id lookup here
        was planned once per connection, and a plan made while the table was small (a new
        ledger) scanned the whole table at every publish from then on."""
        ids = [e.id for e in batch]
        counts = Counter(e.user for e in batch)
        users = sorted(counts)
        expires = [_expires_at(e, now) for e in batch]
        args = (
            ids,
            [e.user for e in batch],
            [e.device for e in batch],
            [e.kind for e in batch],
            [e.data for e in batch],
            expires,
            [e.content() for e in batch],
            [_push_at(e, now) for e in batch],
            [e.notification for e in batch],
            now,
            users,
            [counts[u] for u in users],
        )
        async with self._driver() as pg:
            try:
                rows = await pg.fetch(_PG_RECORD_NEW, *args)
            except (asyncpg.UniqueViolationError, asyncpg.DeadlockDetectedError):
                return None
        if len(rows) != len(batch):
            return None
        seqs: dict[str, int] = {row[0]: row[1] for row in rows}
        answers = []
        for e, expires_at in zip(batch, expires, strict=True):
            seq = seqs[e.id]
            ev = StoredEvent(e.user, seq, e.id, e.kind, e.data, now, e.device, expires_at, None)
            answers.append(Recorded(e.id, e.user, seq, False, ev))
        return answers

    async def _record(
        self, conn: AsyncConnection, batch: Sequence[NewEvent], now: int
    ) -> list[Recorded]:
        ids = list(dict.fromkeys(e.id for e in batch))
        known = await self._lookup_ids(conn, ids)
        fresh: dict[str, NewEvent] = {}
        conflicts: list[int] = []
        for i, e in enumerate(batch):
            if e.id in known:
                digest = known[e.id][2]
                if digest is not None and digest != e.content():
                    conflicts.append(i)
            elif e.id in fresh:
                if fresh[e.id].content() != e.content():
                    conflicts.append(i)
            else:
                fresh[e.id] = e
        if conflicts:
            raise IdConflict(conflicts)

        stored: dict[str, StoredEvent] = {}
        if fresh:
            counts = Counter(e.user for e in fresh.values())
            heads = await self._allocate(conn, counts)
            next_seq = {u: heads[u] - n + 1 for u, n in counts.items()}
            rows = []
            for e in fresh.values():
                seq = next_seq[e.user]
                next_seq[e.user] = seq + 1
                ev = StoredEvent(
                    user=e.user,
                    seq=seq,
                    id=e.id,
                    kind=e.kind,
                    data=e.data,
                    created_at=now,
                    device=e.device,
                    expires_at=_expires_at(e, now),
                    collapse=e.collapse,
                )
                stored[e.id] = ev
                rows.append(
                    {
                        "user_id": ev.user,
                        "seq": ev.seq,
                        "id": ev.id,
                        "device_id": ev.device,
                        "kind": ev.kind,
                        "data": ev.data,
                        "created_at": ev.created_at,
                        "expires_at": ev.expires_at,
                        "collapse": ev.collapse,
                        "digest": e.content(),
                        "push_at": _push_at(e, now),
                        "notification": e.notification,
                    }
                )
            inserted = await self._insert_events(conn, rows)
            raced = [key for key in stored if key not in inserted]
            if raced:  # a concurrent batch recorded the same id first: it wins
                for key in raced:
                    del stored[key]
                won = await self._lookup_ids(conn, raced)
                clash = [
                    i
                    for i, e in enumerate(batch)
                    if e.id in won and won[e.id][2] not in (None, e.content())
                ]
                if clash:
                    raise IdConflict(clash)
                known.update(won)
            await self._supersede(conn, stored.values())

        answers: list[Recorded] = []
        first_in_batch: set[str] = set()
        for e in batch:
            mine = stored.get(e.id)
            if mine is not None and e.id not in first_in_batch:
                first_in_batch.add(e.id)
                answers.append(Recorded(e.id, mine.user, mine.seq, False, mine))
            elif mine is not None:
                answers.append(Recorded(e.id, mine.user, mine.seq, True, None))
            else:
                user, seq, _ = known[e.id]
                answers.append(Recorded(e.id, user, seq, True, None))
        return answers

    async def _lookup_ids(
        self, conn: AsyncConnection, ids: list[str]
    ) -> dict[str, tuple[str, int, str | None]]:
        """The user, seq and content digest of each id already recorded (events recorded
        before digests were kept have none: they match any content)."""
        found: dict[str, tuple[str, int, str | None]] = {}
        if self.dialect == "postgresql":
            # One fixed statement with an array: an IN list of hundreds of parameters gets a
            # generic plan after a few runs of a prepared statement, and that plan scanned
            # the whole table (seconds per publish once the table held 100,000 events).
            for row in await conn.execute(_PG_LOOKUP_IDS, {"ids": ids}):
                found[row[0]] = (row[1], row[2], row[3])
            return found
        for i in range(0, len(ids), _CHUNK):
            stmt = select(events.c.id, events.c.user_id, events.c.seq, events.c.digest).where(
                events.c.id.in_(ids[i : i + _CHUNK])
            )
            for row in await conn.execute(stmt):
                found[row[0]] = (row[1], row[2], row[3])
        return found

    async def _allocate(self, conn: AsyncConnection, counts: Counter[str]) -> dict[str, int]:
        """Reserve ``counts[user]`` seqs per user; returns each user's new head.

        Users are locked in sorted order so concurrent batches cannot deadlock here.
        """
        users = sorted(counts)
        if self.dialect == "postgresql":
            result = await conn.execute(
                _PG_ALLOCATE, {"users": users, "counts": [counts[u] for u in users]}
            )
        else:
            result = await conn.execute(
                _SQLITE_ALLOCATE, [{"user_id": u, "last_seq": counts[u]} for u in users]
            )
        return {r[0]: r[1] for r in result}

    async def _insert_events(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> set[str]:
        """Insert new events; answers the ids actually inserted (a concurrent twin wins)."""
        if self.dialect == "postgresql":
            params = {key: [r[key] for r in rows] for key in _EVENT_KEYS}
            result = await conn.execute(_PG_INSERT_EVENTS, params)
        else:
            result = await conn.execute(_SQLITE_INSERT_EVENTS, rows)
        return {r[0] for r in result}

    async def _supersede(self, conn: AsyncConnection, fresh: Iterable[StoredEvent]) -> None:
        """Mark older undelivered-by-design events of the same collapse key as superseded.

        The key is (user, target device, collapse): an event for one device never
        hides an event meant for all of them.
        """
        newest: dict[tuple[str, str | None, str], int] = {}
        for ev in fresh:
            if ev.collapse is not None:
                key = (ev.user, ev.device, ev.collapse)
                newest[key] = max(newest.get(key, 0), ev.seq)
        if not newest:
            return
        # Its own statement after the seqs were allocated: under READ COMMITTED it sees an
        # event of the same key that a concurrent batch committed while this one waited
        # for the user's row lock (one statement with the insert would not).
        if self.dialect == "postgresql":  # one statement for every key of the batch
            keys = list(newest)
            await conn.execute(
                _PG_SUPERSEDE,
                {
                    "users": [k[0] for k in keys],
                    "devices": [k[1] for k in keys],
                    "collapses": [k[2] for k in keys],
                    "seqs": [newest[k] for k in keys],
                },
            )
            return
        for (user, device, collapse), seq in newest.items():
            target = (
                events.c.device_id.is_(None) if device is None else events.c.device_id == device
            )
            await conn.execute(
                update(events)
                .where(
                    events.c.user_id == user,
                    events.c.collapse == collapse,
                    target,
                    events.c.seq < seq,
                    events.c.superseded_by.is_(None),
                )
                .values(superseded_by=seq)
            )

    # -- delivery ---------------------------------------------------------------------------

    async def backfill(
        self, user: str, device: str, after: int, limit: int, now: int | None = None
    ) -> tuple[list[StoredEvent], int]:
        """Deliverable events of ``device`` with ``seq > after``, oldest first, and the head.

        The head is read first: every event at or below it is committed, so a
        caller that got fewer than ``limit`` rows has seen everything up to it.
        """
        return (await self.backfill_many([(user, device, after)], limit, now))[0]

    async def backfill_many(
        self, wanted: Sequence[tuple[str, str, int]], limit: int, now: int | None = None
    ) -> list[tuple[list[StoredEvent], int]]:
        """``backfill`` of many ``(user, device, after)`` at once, answered in their order,
        so that a reconnect storm of thousands of phones is a handful of queries, not one
        transaction each. On PostgreSQL one statement per 500 devices reads their heads
        and pages (one lateral join) and records the superseded events they pass, under
        one snapshot: every event at or below a head it read is in it."""
        now = now_ms() if now is None else now
        pages: list[list[StoredEvent]] = [[] for _ in wanted]
        if self.dialect == "postgresql":
            heads: dict[int, int] = {}
            async with self._driver() as pg:
                for c in range(0, len(wanted), _CHUNK):
                    chunk = range(c, min(c + _CHUNK, len(wanted)))
                    rows = await pg.fetch(
                        _PG_BACKFILL,
                        list(chunk),
                        [wanted[i][0] for i in chunk],
                        [wanted[i][1] for i in chunk],
                        [wanted[i][2] for i in chunk],
                        now,
                        limit,
                    )
                    for row in rows:
                        i = row[0]
                        heads[i] = row[1]
                        if row[3] is not None:  # the device's events (none: its head only)
                            pages[i].append(StoredEvent(*row[2:]))
            return [(pages[i], heads.get(i, 0)) for i in range(len(wanted))]
        async with self._tx() as conn:
            heads_of = await self._heads(conn, sorted({u for u, _, _ in wanted}))
            due = [
                (i, u, d, a, heads_of[u])
                for i, (u, d, a) in enumerate(wanted)
                if heads_of.get(u, 0) > a
            ]
            for i, user, device, after, head in due:
                stmt = (
                    select(*_EVENT_COLUMNS)
                    .where(
                        events.c.user_id == user,
                        events.c.seq > after,
                        events.c.seq <= head,
                        or_(events.c.device_id.is_(None), events.c.device_id == device),
                        or_(events.c.expires_at.is_(None), events.c.expires_at > now),
                        events.c.superseded_by.is_(None),
                    )
                    .order_by(events.c.seq)
                    .limit(limit)
                )
                pages[i] = [_stored(r) for r in await conn.execute(stmt)]
                passed = await conn.execute(
                    select(events.c.seq, events.c.created_at).where(
                        events.c.user_id == user,
                        events.c.seq > after,
                        events.c.seq <= head,
                        or_(events.c.device_id.is_(None), events.c.device_id == device),
                        events.c.superseded_by.is_not(None),
                    )
                )
                await self._note_skipped(conn, [(user, device, *r) for r in passed])
        return [(pages[i], max(heads_of.get(u, 0), 0)) for i, (u, _, _) in enumerate(wanted)]

    async def _note_skipped(self, conn: AsyncConnection, passed: Iterable[Any]) -> None:
        """Record ``(user, device, seq, created_at)`` rows of superseded events that a
        backfill passed: the device will never get them (for their delivery status)."""
        rows = [{"user_id": u, "device_id": d, "seq": q, "created_at": c} for u, d, q, c in passed]
        if rows:
            await conn.execute(self._insert()(skipped).on_conflict_do_nothing(), rows)

    async def heads(self, users: Sequence[str]) -> dict[str, int]:
        """The current head seq of each user (users with no events are absent)."""
        async with self._tx() as conn:
            return await self._heads(conn, users)

    async def _heads(self, conn: AsyncConnection, users: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        if self.dialect == "postgresql":  # an array, not an IN list (see _lookup_ids)
            result = await conn.execute(_PG_HEADS, {"users": list(users)})
            return {r[0]: int(r[1]) for r in result}
        for i in range(0, len(users), _CHUNK):
            stmt = select(streams.c.user_id, streams.c.last_seq).where(
                streams.c.user_id.in_(users[i : i + _CHUNK])
            )
            found.update({r[0]: int(r[1]) for r in await conn.execute(stmt)})
        return found

    async def touch_device(self, user: str, device: str, now: int | None = None) -> int:
        """Register one connecting device (or refresh it); answers its acked cursor."""
        admission = await self.register_devices([(user, device)], now)
        return admission.registered[(user, device)].acked

    async def register_devices(
        self,
        keys: Sequence[tuple[str, str]],
        now: int | None = None,
        limit: DeviceLimit | None = None,
    ) -> Admission:
        """Register (or refresh) connecting devices in one transaction.

        Answers the acked cursor, the user's stream head and pruned seq per
        ``(user, device)``: a device whose resume point is at the head needs no backfill
        read at all, and one below the pruned seq missed events to retention.

        With a ``limit``, a device new to its user that would take the user past
        ``limit.cap`` devices is refused (not registered), or the user's least recently
        seen other devices are deleted to make room (``limit.evict``). Known devices
        cost one statement per batch; only a batch with new devices reads the users'
        device lists (on PostgreSQL under a per-user lock, so that nodes admitting
        devices of one user at once cannot pass the cap together).
        """
        now = now_ms() if now is None else now
        # Each row once per statement, in one order everywhere (no lock-order deadlocks).
        keys = sorted(set(keys))
        found: dict[tuple[str, str], Registration] = {}
        new: set[tuple[str, str]] = set()
        refused: set[tuple[str, str]] = set()
        evicted: list[tuple[str, str]] = []
        async with self._tx() as conn:
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i : i + _CHUNK]
                if self.dialect == "postgresql":
                    result = await conn.execute(
                        _PG_REGISTER,
                        {
                            "users": [u for u, _ in chunk],
                            "devices": [d for _, d in chunk],
                            "now": now,
                        },
                    )
                    for r in result:
                        found[(r[0], r[1])] = Registration(int(r[2]), int(r[3]), int(r[4]))
                        if r[5]:
                            new.add((r[0], r[1]))
                    continue
                if limit is not None:
                    new.update(await self._unknown(conn, chunk))
                acked = await conn.execute(
                    _SQLITE_REGISTER,
                    [
                        {
                            "user_id": u,
                            "device_id": d,
                            "acked_seq": 0,
                            "sent_seq": 0,
                            "created_at": now,
                            "last_seen": now,
                        }
                        for u, d in chunk
                    ],
                )
                cursors = {(r[0], r[1]): int(r[2]) for r in acked}
                users = sorted({u for u, _ in chunk})
                heads = {
                    r[0]: (int(r[1]), int(r[2]))
                    for r in await conn.execute(
                        select(streams.c.user_id, streams.c.last_seq, streams.c.pruned_seq).where(
                            streams.c.user_id.in_(users)
                        )
                    )
                }
                found.update({k: Registration(cursors[k], *heads.get(k[0], (0, 0))) for k in chunk})
            if limit is not None and new:
                refused, evicted = await self._enforce(conn, new, limit)
                for key in refused:
                    del found[key]
        return Admission(found, refused, evicted)

    async def _unknown(
        self, conn: AsyncConnection, keys: Sequence[tuple[str, str]]
    ) -> set[tuple[str, str]]:
        users = sorted({u for u, _ in keys})
        stmt = select(devices.c.user_id, devices.c.device_id).where(devices.c.user_id.in_(users))
        known = {(r[0], r[1]) for r in await conn.execute(stmt)}
        return {k for k in keys if k not in known}

    async def _enforce(
        self, conn: AsyncConnection, new: set[tuple[str, str]], limit: DeviceLimit
    ) -> tuple[set[tuple[str, str]], list[tuple[str, str]]]:
        """Apply the device limit to the users of ``new`` (devices just inserted)."""
        users = sorted({u for u, _ in new})
        if self.dialect == "postgresql":
            await conn.execute(_PG_LOCK_USERS, {"users": users})
        owned: dict[str, list[str]] = {}
        for i in range(0, len(users), _CHUNK):
            stmt = (
                select(devices.c.user_id, devices.c.device_id)
                .where(devices.c.user_id.in_(users[i : i + _CHUNK]))
                .order_by(devices.c.user_id, devices.c.last_seen, devices.c.device_id)
            )
            for r in await conn.execute(stmt):
                owned.setdefault(r[0], []).append(r[1])
        refused: set[tuple[str, str]] = set()
        evicted: list[tuple[str, str]] = []
        for user in users:
            mine = owned.get(user, [])  # least recently seen first
            excess = len(mine) - limit.cap
            if excess <= 0:
                continue
            if limit.evict:
                older = [d for d in mine if (user, d) not in new]
                evicted += [(user, d) for d in older[:excess]]
                excess -= min(excess, len(older))
            # Refused (or, evicting, still over: the batch alone brings more than the cap).
            arrivals = sorted(d for d in mine if (user, d) in new)
            refused.update((user, d) for d in arrivals[len(arrivals) - excess :] if excess > 0)
        gone = [*evicted, *refused]
        for i in range(0, len(gone), _CHUNK):
            part = gone[i : i + _CHUNK]
            for table in (devices, push_registrations):
                await conn.execute(
                    table.delete().where(
                        or_(*(and_(table.c.user_id == u, table.c.device_id == d) for u, d in part))
                    )
                )
        return refused, evicted

    async def prune_devices(self, before: int) -> int:
        """Delete devices not seen since ``before`` (ms); answers how many."""
        async with self._tx() as conn:
            result = await conn.execute(devices.delete().where(devices.c.last_seen < before))
            # Push addresses go with their devices (and ones never used by a device).
            await conn.execute(
                push_registrations.delete().where(
                    push_registrations.c.updated_at < before,
                    ~select(devices.c.device_id)
                    .where(
                        devices.c.user_id == push_registrations.c.user_id,
                        devices.c.device_id == push_registrations.c.device_id,
                    )
                    .exists(),
                )
            )
            return int(getattr(result, "rowcount", 0) or 0)

    async def flush_cursors(self, moves: Sequence[Cursor]) -> None:
        """Move many devices' cursors forward in one statement (never backward)."""
        if not moves:
            return
        async with self._tx() as conn:
            if self.dialect == "postgresql":
                await conn.execute(
                    text(
                        "UPDATE devices AS d SET"
                        " acked_seq = GREATEST(d.acked_seq, v.acked),"
                        " sent_seq = GREATEST(d.sent_seq, v.sent, v.acked),"
                        " last_seen = GREATEST(d.last_seen, v.seen)"
                        " FROM unnest(CAST(:users AS text[]), CAST(:devices AS text[]),"
                        " CAST(:acked AS bigint[]), CAST(:sent AS bigint[]),"
                        " CAST(:seen AS bigint[])) AS v(user_id, device_id, acked, sent, seen)"
                        " WHERE d.user_id = v.user_id AND d.device_id = v.device_id"
                    ),
                    {
                        "users": [m.user for m in moves],
                        "devices": [m.device for m in moves],
                        "acked": [m.acked for m in moves],
                        "sent": [m.sent for m in moves],
                        "seen": [m.seen for m in moves],
                    },
                )
            else:
                await conn.execute(
                    text(
                        "UPDATE devices SET acked_seq = max(acked_seq, :acked),"
                        " sent_seq = max(sent_seq, :sent, :acked),"
                        " last_seen = max(last_seen, :seen)"
                        " WHERE user_id = :user AND device_id = :device"
                    ),
                    [
                        {
                            "user": m.user,
                            "device": m.device,
                            "acked": m.acked,
                            "sent": m.sent,
                            "seen": m.seen,
                        }
                        for m in moves
                    ],
                )

    # -- state ------------------------------------------------------------------------------

    async def get_event(self, event_id: str) -> StoredEvent | None:
        async with self._tx() as conn:
            row = (
                await conn.execute(select(*_EVENT_COLUMNS).where(events.c.id == event_id))
            ).first()
        return None if row is None else _stored(row)

    async def skipped_devices(self, user: str, seq: int) -> set[str]:
        """The devices whose backfill passed event ``seq`` of ``user`` because it had been
        superseded: they never got it."""
        stmt = select(skipped.c.device_id).where(skipped.c.user_id == user, skipped.c.seq == seq)
        async with self._tx() as conn:
            return {r[0] for r in await conn.execute(stmt)}

    async def devices(self, user: str) -> list[DeviceState]:
        stmt = (
            select(
                devices.c.user_id,
                devices.c.device_id,
                devices.c.acked_seq,
                devices.c.sent_seq,
                devices.c.created_at,
                devices.c.last_seen,
            )
            .where(devices.c.user_id == user)
            .order_by(devices.c.device_id)
        )
        async with self._tx() as conn:
            return [DeviceState(*r) for r in await conn.execute(stmt)]

    async def prune(self, before: int) -> int:
        """Delete events created before ``before`` (ms); answers how many.

        Each user's ``pruned_seq`` keeps the highest seq deleted, so a device that
        resumes below it is told that events it never got are gone.
        """
        async with self._tx() as conn:
            gone = [
                {"user": r[0], "seq": int(r[1])}
                for r in await conn.execute(
                    select(events.c.user_id, func.max(events.c.seq))
                    .where(events.c.created_at < before)
                    .group_by(events.c.user_id)
                )
            ]
            if not gone:
                return 0
            await conn.execute(
                update(streams)
                .where(streams.c.user_id == bindparam("user"))
                .values(pruned_seq=func.max(streams.c.pruned_seq, bindparam("seq")))
                if self.dialect == "sqlite"
                else update(streams)
                .where(streams.c.user_id == bindparam("user"))
                .values(pruned_seq=func.greatest(streams.c.pruned_seq, bindparam("seq"))),
                gone,
            )
            await conn.execute(skipped.delete().where(skipped.c.created_at < before))
            await conn.execute(pushes.delete().where(pushes.c.created_at < before))
            result = await conn.execute(events.delete().where(events.c.created_at < before))
            return int(getattr(result, "rowcount", 0) or 0)

    async def count_events(self) -> int:
        async with self._tx() as conn:
            return int((await conn.execute(select(func.count()).select_from(events))).scalar_one())


def delivery_status(
    ev: StoredEvent, dev: DeviceState, now: int, skipped: bool = False, pushed: bool = False
) -> str:
    """One device's state of one event, derived from the device's cursors.

    * ``superseded``: a newer event of its collapse key replaced it before the device
      got it (``skipped``: the device's backfill passed over it), or before the device
      acknowledged it;
    * ``acked``: the device's acked cursor is past the event (it processed it, or
      caught up past it while it was expired);
    * ``expired``: the event expired before the device acknowledged it;
    * ``pushed``: sent to the device's push provider (``pushed``), not acknowledged yet;
    * ``sent``: written to the device, not acknowledged yet;
    * ``pending``: not written to the device yet (it is offline or catching up).
    """
    if skipped:
        return "superseded"
    if dev.acked_seq >= ev.seq:
        return "acked"
    if ev.expires_at is not None and ev.expires_at <= now:
        return "expired"
    if ev.superseded_by is not None:
        return "superseded"
    if pushed:
        return "pushed"
    if dev.sent_seq >= ev.seq:
        return "sent"
    return "pending"


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)
    text_ = str(orig if orig is not None else exc).strip().splitlines()
    return f"{type(orig or exc).__name__}: {text_[0] if text_ else ''}"


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema to ``revision`` with Alembic. Must not run inside an event loop."""
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    command.upgrade(cfg, revision)


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None
    return head


async def wait_for(coro: Any, seconds: float) -> Any:
    """``asyncio.wait_for`` that reports a timeout as ``LedgerUnavailable``."""
    try:
        return await asyncio.wait_for(coro, seconds)
    except TimeoutError as exc:
        raise LedgerUnavailable(f"no answer within {seconds:g}s") from exc
