"""The ingest stream: backend services ``XADD courier:ingest * event '<json>'``.

Every node runs a ``StreamConsumer`` in the consumer group ``courier`` under its
node id. Guarantees:

* An entry is acknowledged (``XACK``) only after its event is durable in the
  ledger, through the same path as the HTTP API (``Node.publish``: one ledger
  transaction per batch, idempotent on the event id).
* An event without an ``id`` gets ``xadd-<entry id>``, so re-reading an entry
  (after a crash between the commit and the ``XACK``) never records it twice.
* A malformed entry (no ``event`` field, bad JSON, failed validation) is copied to
  ``courier:ingest:dead`` with ``event``, ``reason`` and ``entry`` and acknowledged
  in the same ``MULTI``: never retried forever, never silently dropped.
* While the ledger is unreachable nothing is acknowledged: the consumer backs off
  and retries the same entries (they stay in its pending list). If the ledger
  refuses the data itself (a data or integrity error, which no retry changes), the
  batch is split to find the entry it refuses, and that entry goes to the dead stream.
* An entry that cannot be read (not UTF-8, not JSON, any parse failure) goes to the
  dead stream at once; one whose recording fails for a reason that is not an outage
  goes there after ``MAX_TRIES`` attempts. No single entry can hold the stream.
* Reads are never retried blindly: the stream's Redis client has no command retries
  (a retried blocking ``XREADGROUP ... >`` whose first reply was lost would leave the
  entries Redis had already assigned pending until a claim). After any error the
  consumer first re-reads its own pending entries (id ``0``), then new ones, so a
  lost reply delays nothing and reorders nothing.
* Entries a dead consumer read but never acknowledged are taken over with
  ``XAUTOCLAIM`` once idle longer than ``claim_seconds``.
* One node at a time records (a leader lease, ``<stream>:leader``, renewed while it
  works), so a user's events are recorded, and numbered, in stream order: two
  nodes recording neighbouring entries concurrently could commit them in either
  order. A node that takes the lease over first claims every entry its
  predecessor left pending, oldest first, then reads new ones. A leader stuck on
  an unreachable ledger keeps its lease; one that loses it abandons its batch
  (left pending for the next leader).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from channels.metrics import Metrics
from channels.node import Node
from channels.redis import backoff_delay
from models.ledger import IdConflict, LedgerRefused, LedgerUnavailable, NewEvent
from server.api import InputError, parse_event
from server.services import Limits

log = logging.getLogger("courier.ingest")

STREAM = "courier:ingest"
GROUP = "courier"
READ_COUNT = 500
BLOCK_MS = 1000
MAX_TRIES = 3
"""Failures (other than outages) of one entry before it goes to the dead stream."""


class LeaseLost(Exception):
    """Another node holds the ingest lease now: stop before recording anything more."""


# Take the lease if free, or extend it if ours: one atomic step.
_LEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  redis.call('pexpire', KEYS[1], ARGV[2])
  return 1
end
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class _Entry:
    entry_id: str
    raw: bytes | None  # the ``event`` field as sent (None if missing)
    event: NewEvent | None
    reason: str | None  # why it is malformed (``event`` is None)


class StreamConsumer:
    def __init__(
        self,
        client: Redis,
        node: Node,
        limits: Limits,
        *,
        consumer: str | None = None,
        stream: str = STREAM,
        group: str = GROUP,
        claim_seconds: float = 30.0,
        claim_every: float = 5.0,
        count: int = READ_COUNT,
        block_ms: int = BLOCK_MS,
        lease_seconds: float = 10.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.client = client
        self.node = node
        self.limits = limits
        self.consumer = consumer or node.config.node_id
        self.stream = stream
        self.dead_stream = f"{stream}:dead"
        self.group = group
        self.claim_seconds = claim_seconds
        self.claim_every = claim_every
        self.count = count
        self.block_ms = min(block_ms, int(lease_seconds * 1000 / 3))
        self.lease_key = f"{stream}:leader"
        self.lease_seconds = lease_seconds
        self.leader = False
        self._fresh_until = 0.0
        self.metrics = metrics if metrics is not None else node.metrics
        self.recorded = 0
        self.dead = 0
        self._task: asyncio.Task[None] | None = None
        self._claim_cursor = "0-0"
        self._failures = 0
        self._tries: dict[str, int] = {}  # entry id -> failed recording attempts

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="courier.ingest")

    async def stop(self) -> None:
        """Stop reading. Entries read but not recorded stay pending (another node claims them)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.leader:
            self.leader = False
            try:  # hand over at once instead of after the lease runs out
                await self.client.eval(_RELEASE, 1, self.lease_key, self.consumer)
            except (RedisError, OSError) as exc:
                log.warning("could not release the ingest lease: %s", exc)

    async def run(self) -> None:
        """The supervised loop: never ends except by cancellation."""
        while True:
            try:
                await self.ensure_group()
                await self._consume()
            except asyncio.CancelledError:
                raise
            except LeaseLost:
                log.warning("ingest lease of %s lost; another node records now", self.stream)
                self.leader = False
            except (RedisError, OSError, TimeoutError) as exc:
                self._failures += 1
                failures = self._failures
                delay = backoff_delay(failures)
                log.warning(
                    "ingest from %s paused: redis %s: %s; retrying in %.1fs (failure %d)",
                    self.stream,
                    type(exc).__name__,
                    exc,
                    delay,
                    failures,
                )
                await asyncio.sleep(delay)
            except Exception:
                self._failures += 1
                delay = backoff_delay(self._failures)
                log.exception(
                    "ingest loop of %s failed unexpectedly; restarting in %.1fs", self.stream, delay
                )
                await asyncio.sleep(delay)

    async def ensure_group(self) -> None:
        try:
            # From the start of the stream: entries added before any node ran are not lost.
            await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            log.info("created consumer group %s on %s", self.group, self.stream)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # -- the loop -----------------------------------------------------------------------------

    async def renew_lease(self) -> bool:
        """Take or extend the ingest lease; True while this node is the one recording."""
        asked = asyncio.get_running_loop().time()
        held = bool(
            await self.client.eval(
                _LEASE, 1, self.lease_key, self.consumer, int(self.lease_seconds * 1000)
            )
        )
        if held and not self.leader:
            log.info("this node now records the ingest stream %s", self.stream)
        self.leader = held
        # Redis set the expiry after this node asked: the lease is ours until then at least.
        self._fresh_until = asked + self.lease_seconds / 3 if held else 0.0
        return held

    async def hold_lease(self) -> bool:
        """``renew_lease``, unless it was renewed less than a third of the lease ago: this
        node holds it for two thirds of the lease more then, and a busy stream's reads and
        records skip two Redis round trips each."""
        if self.leader and asyncio.get_running_loop().time() < self._fresh_until:
            return True
        return await self.renew_lease()

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        own_pending = True
        next_claim = loop.time()
        while True:
            was_leader = self.leader
            if not await self.hold_lease():
                await asyncio.sleep(self.lease_seconds / 3)  # a standby: try again later
                continue
            if not was_leader:
                # Taking over: first everything the previous leader left pending, oldest
                # first, then our own pending entries, then new ones.
                await self.claim_once(min_idle=0)
                own_pending = True
            if loop.time() >= next_claim:
                await self.claim_once()
                await self.update_lag()
                next_claim = loop.time() + self.claim_every
            if own_pending:
                n = await self.read_once(new=False)
                own_pending = n > 0
            else:
                await self.read_once(new=True)
            if self._failures:
                log.info("ingest from %s resumed", self.stream)
                self._failures = 0

    async def read_once(self, new: bool = True) -> int:
        """One ``XREADGROUP`` (new entries, or this consumer's pending ones) and its processing."""
        reply: Any = await self.client.xreadgroup(
            self.group,
            self.consumer,
            {self.stream: ">" if new else "0"},
            count=self.count,
            block=self.block_ms if new else None,
        )
        entries = _stream_entries(reply)
        if entries:
            await self.process(entries)
        return len(entries)

    async def claim_once(self, min_idle: float | None = None) -> int:
        """Take over entries idle longer than ``claim_seconds`` (their consumer died);
        ``min_idle=0`` takes every pending entry (a new leader taking over)."""
        total = 0
        idle = self.claim_seconds if min_idle is None else min_idle
        if min_idle is not None:
            self._claim_cursor = "0-0"
        for _ in range(20):  # bounded per round; the cursor carries over to the next round
            cursor, entries, *_deleted = await self.client.xautoclaim(
                self.stream,
                self.group,
                self.consumer,
                min_idle_time=int(idle * 1000),
                start_id=self._claim_cursor,
                count=self.count,
            )
            self._claim_cursor = _text(cursor)
            if entries:
                log.warning(
                    "claimed %d ingest entries idle over %.0fs from another consumer",
                    len(entries),
                    idle,
                )
                await self.process(entries)
                total += len(entries)
            if self._claim_cursor == "0-0":
                break
        return total

    async def update_lag(self) -> None:
        for info in await self.client.xinfo_groups(self.stream):
            if _text(info.get("name")) == self.group:
                lag = info.get("lag") or 0  # nil when Redis cannot tell (after deletions)
                pending = info.get("pending") or 0
                self.metrics.ingest_lag.set(int(lag) + int(pending))
                return

    # -- processing ---------------------------------------------------------------------------

    async def process(self, entries: Sequence[tuple[Any, Any]]) -> None:
        """Dead-letter the malformed entries, record the others, acknowledge each after."""
        if not await self.hold_lease():
            raise LeaseLost()  # another node records now: leave these pending for it
        parsed = [self._parse_safely(_text(entry_id), fields) for entry_id, fields in entries]
        bad = [e for e in parsed if e.event is None]
        good = [e for e in parsed if e.event is not None]
        if bad:
            await self._dead_letter(bad)
        if good:
            await self._record_bounded(good)

    def _parse_safely(self, entry_id: str, fields: Any) -> _Entry:
        """``_parse``, and any failure to read an entry is that entry's fault: it goes to the
        dead stream at once, so no single entry can hold the stream."""
        try:
            return self._parse(entry_id, fields)
        except Exception as exc:
            raw = fields.get(b"event") if isinstance(fields, dict) else None
            return _Entry(
                entry_id,
                raw if isinstance(raw, bytes) else None,
                None,
                f"event cannot be read: {exc!r}",
            )

    async def _record_bounded(self, good: Sequence[_Entry]) -> None:
        """``_record``, with a bound on failures that are not outages (a bug, or data the
        code cannot handle): a batch that fails is retried entry by entry, and an entry
        that fails ``MAX_TRIES`` times goes to the dead stream instead of holding the rest."""
        try:
            await self._record(good)
            if self._tries:
                for e in good:
                    self._tries.pop(e.entry_id, None)
            return
        except (LeaseLost, RedisError, OSError, TimeoutError, asyncio.CancelledError):
            raise
        except Exception as exc:
            if len(good) > 1:
                log.warning("recording %d ingest entries failed (%r); one by one", len(good), exc)
                for e in good:
                    await self._record_bounded([e])
                return
            (entry,) = good
            tries = self._tries[entry.entry_id] = self._tries.get(entry.entry_id, 0) + 1
            if tries < MAX_TRIES:
                raise
            self._tries.pop(entry.entry_id, None)
            await self._dead_letter(good, f"recording failed {tries} times: {exc!r}")

    def _parse(self, entry_id: str, fields: Any) -> _Entry:
        fields = fields or {}
        raw = fields.get(b"event", fields.get("event"))
        if raw is None:
            names = ", ".join(sorted(_text(k) for k in fields)) or "none"
            return _Entry(entry_id, None, None, f"no field 'event' (fields: {names})")
        raw = raw if isinstance(raw, bytes) else str(raw).encode()
        try:
            raw.decode()
        except UnicodeDecodeError as exc:
            return _Entry(entry_id, raw, None, f"event is not valid UTF-8: {exc}")
        try:
            obj = msgspec.json.decode(raw)
        except (msgspec.DecodeError, RecursionError) as exc:
            return _Entry(entry_id, raw, None, f"event is not valid JSON: {exc!r}")
        if isinstance(obj, dict) and obj.get("id") is None:
            obj["id"] = f"xadd-{entry_id}"  # deterministic: a re-read cannot record it twice
        try:
            event = parse_event(obj, "", self.limits)
        except InputError as exc:
            return _Entry(entry_id, raw, None, f"{exc.field}: {exc.message}")
        except (RecursionError, ValueError, TypeError) as exc:  # never block the stream
            return _Entry(entry_id, raw, None, f"event cannot be read: {exc!r}")
        return _Entry(entry_id, raw, event, None)

    async def _dead_letter(self, bad: Sequence[_Entry], reason: str | None = None) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            for e in bad:
                pipe.xadd(
                    self.dead_stream,
                    {
                        "event": e.raw if e.raw is not None else b"",
                        "reason": reason or e.reason or "unknown",
                        "entry": e.entry_id,
                    },
                )
            pipe.xack(self.stream, self.group, *[e.entry_id for e in bad])
            await pipe.execute()
        self.dead += len(bad)
        for e in bad:
            log.warning(
                "ingest entry %s moved to %s: %s",
                e.entry_id,
                self.dead_stream,
                reason or e.reason,
            )

    async def _record(self, good: Sequence[_Entry]) -> None:
        """Record ``good`` in one transaction and ack it.

        While the ledger is unavailable nothing is acknowledged and the same entries
        are retried (holding the lease). Only a refusal of the data itself, which no
        retry can change, sends entries to the dead stream, and the batch is split
        first so that only the refused entry goes there.
        """
        attempt = 0
        while True:
            events = [e for e in good if e.event is not None]
            try:
                await self.node.publish([e.event for e in events if e.event is not None])
            except IdConflict as exc:
                clash = [events[i] for i in exc.indexes]
                await self._dead_letter(
                    clash, "id_conflict: the id was already used for an event with other content"
                )
                gone = {e.entry_id for e in clash}
                rest = [e for e in good if e.entry_id not in gone]
                if rest:
                    await self._record(rest)
                return
            except LedgerRefused as exc:
                if len(good) > 1:
                    mid = len(good) // 2
                    log.warning(
                        "ledger refused a batch of %d ingest entries (%s); splitting it",
                        len(good),
                        exc,
                    )
                    await self._record(good[:mid])
                    await self._record(good[mid:])
                    return
                await self._dead_letter(good, f"the ledger refused the event: {exc}")
                return
            except LedgerUnavailable as exc:
                attempt += 1
                delay = backoff_delay(attempt)
                log.warning(
                    "ledger unavailable for %d ingest entries (%s); not acknowledged, "
                    "retrying in %.1fs (attempt %d)",
                    len(good),
                    exc,
                    delay,
                    attempt,
                )
                await asyncio.sleep(delay)
                if not await self.renew_lease():
                    raise LeaseLost() from exc
                continue
            break
        await self.client.xack(self.stream, self.group, *[e.entry_id for e in good])
        self.recorded += len(good)


def _stream_entries(reply: Any) -> list[tuple[Any, Any]]:
    """The entries of a one-stream ``XREADGROUP`` reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [e for entries in reply.values() for e in entries[0]]
    return list(reply[0][1])


def _text(value: Any) -> str:
    """Text of a Redis reply or field name; bytes that are not UTF-8 are shown escaped."""
    return value.decode(errors="backslashreplace") if isinstance(value, bytes) else str(value)
