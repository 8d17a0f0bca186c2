"""A node joins the hub (local connections), the broker (other nodes) and the ledger.

The path of one event:

1. ``publish``: the ledger records the batch (durable, idempotent, ``seq`` per user;
   publishes that arrive while a commit is in flight share the next one),
   then each new event is encoded once and published on its user's channel.
2. ``_on_message``: every node subscribed to that user decodes the envelope once
   and offers the same frame to each local connection of the user.
3. ``_deliver``: a connection takes the event if it is the next one of its user's
   stream; an older one is a duplicate and dropped; a newer one means the bus
   lost something, so the connection catches up from the ledger.

A connection subscribes *before* it reads its backfill, buffering live events
meanwhile, so there is neither a gap nor a duplicate between backfill and live.
A reconcile loop compares each user's ledger head with what connections have
been given, so even an event whose bus message was lost at the tail of a
stream reaches connected devices within ``reconcile_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from channels.batching import Coalescer
from channels.broker import Broker, user_channel
from channels.client import Client, CloseHook, FastWriter, SentHook
from channels.commits import GroupCommit
from channels.cursors import CursorBuffer
from channels.disconnect import EVICTED, INTERNAL, REPLACED, RESTART, SLOW, Disconnect
from channels.frames import (
    Delivery,
    Evict,
    Replace,
    ack_seq,
    decode_bus,
    encode_delivery,
    encode_evict,
    encode_replace,
    error_frame,
    event_frame,
    hello_frame,
)
from channels.hub import Hub
from channels.limits import TokenBucket
from channels.metrics import Metrics
from channels.outbox import Outbox
from models.ledger import (
    DeviceLimit,
    Ledger,
    LedgerUnavailable,
    NewEvent,
    Recorded,
    Registration,
    StoredEvent,
    now_ms,
)

log = logging.getLogger("courier.node")

MAX_PENDING = 10_000
"""Live events buffered per connection while it catches up; past this it re-reads the ledger."""

SENT_FLUSH_SECONDS = 1.0
"""How often devices whose only move is their ``sent`` cursor are written (acks are
written every ``ack_flush_seconds``): while events flow that is every connected device."""

BACKFILL_BATCH = 1000
"""Devices per batched backfill read (a reconnect storm reads in batches of this many)."""

FLUSH_BUSY = 1000
"""Devices per cursor write above which the next write waits longer, up to FLUSH_STRETCH
times ``ack_flush_seconds``: thousands of devices acking at once are written in fewer,
larger statements (at 10,000 acking devices, building and writing every device's move
every 50 ms took a fifth of the server's CPU)."""

FLUSH_STRETCH = 4.0


def flush_pause(base: float, written: int) -> float:
    """Seconds until the next cursor write after one that moved ``written`` devices."""
    return base * min(FLUSH_STRETCH, max(1.0, written / FLUSH_BUSY))


COMMITS_IN_FLIGHT = 2
"""Publish transactions at once on PostgreSQL (see ``channels/commits.py``); SQLite has one
writer. While one commits, the next group's transaction runs: under 64 concurrent
publishers one at a time left the server and PostgreSQL each a third idle."""

GAP_GRACE = 0.05
"""Seconds to wait for a missing seq before reading the ledger: messages of two
publishers can pass each other on the bus, and only a message still missing
after this is taken as lost."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    node_id: str
    send_queue_size: int = 1024
    backfill_page: int = 500
    heartbeat_seconds: float = 25.0
    ack_flush_seconds: float = 0.05
    reconcile_seconds: float = 5.0
    retention_seconds: int = 24 * 3600
    rate_limit_per_second: float = 50.0
    rate_limit_burst: int = 200
    device_limit: DeviceLimit | None = None


class _Subscription:
    __slots__ = ("ready", "refs")

    def __init__(self, ready: asyncio.Future[None]) -> None:
        self.refs = 0
        # While the SUBSCRIBE is in flight (or failed); None once it is confirmed, so a
        # subscribed user holds no future.
        self.ready: asyncio.Future[None] | None = ready


class DeviceRefused(Exception):
    """The device is new to its user and the user has the most devices allowed."""


class _Registrar:
    """Registers connecting devices in batches: every device that connects while one
    registration statement is in flight goes into the next one (a reconnect storm of
    thousands of phones is a handful of statements, not one transaction each)."""

    def __init__(
        self,
        ledger: Ledger,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        limit: DeviceLimit | None,
        on_evicted: Callable[[list[tuple[str, str]]], None],
    ) -> None:
        self.ledger = ledger
        self.limit = limit
        self._on_evicted = on_evicted
        self._spawn = spawn
        self._waiting: dict[tuple[str, str], list[asyncio.Future[Registration]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def register(self, user: str, device: str) -> Registration:
        """Raises ``LedgerUnavailable``, or ``DeviceRefused`` past the device limit."""
        future: asyncio.Future[Registration] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault((user, device), []).append(future)
        if self._task is None or self._task.done():
            self._task = self._spawn(self._run())
        return await future

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, {}
            try:
                admission = await self.ledger.register_devices(list(batch), limit=self.limit)
            except Exception as exc:
                for futures in batch.values():
                    for f in futures:
                        if not f.done():
                            f.set_exception(exc)
                continue
            if admission.evicted:
                self._on_evicted(admission.evicted)
            for key, futures in batch.items():
                found = admission.registered.get(key)
                for f in futures:
                    if f.done():
                        continue
                    if found is None:
                        f.set_exception(DeviceRefused(f"{key[0]} has the most devices allowed"))
                    else:
                        f.set_result(found)


class Node:
    def __init__(
        self, config: NodeConfig, ledger: Ledger, broker: Broker, metrics: Metrics
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.broker = broker
        self.metrics = metrics
        self.hub = Hub()
        self.cursors = CursorBuffer()
        self._subs: dict[str, _Subscription] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._last_heads: dict[str, int] = {}
        self._reconcile_now = asyncio.Event()
        self._registrar = _Registrar(ledger, self._spawn, config.device_limit, self._evict)
        self.outbox = Outbox(broker, self._spawn)
        self.commits = GroupCommit(
            ledger.record,
            self._spawn,
            in_flight=COMMITS_IN_FLIGHT if ledger.dialect == "postgresql" else 1,
            on_commit=metrics.count_commit,
        )
        page = max(1, min(config.backfill_page, config.send_queue_size // 2))
        self._backfill: Coalescer[tuple[str, str, int], tuple[list[StoredEvent], int]] = Coalescer(
            lambda wanted: ledger.backfill_many(wanted, page),
            self._spawn,
            max_batch=BACKFILL_BATCH,
        )
        self.backfill_page = page
        self.draining = False
        self.acks_uncounted = 0
        self._sent_users: set[str] = set()  # users whose connections got frames lately
        # Made once: every connection holds the same two (not a bound method each).
        self._sent_hook: SentHook = self._on_sent
        self._close_hook: CloseHook = self._on_close

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.broker.start(self._on_message, self._on_reconnect)
        self._loops = [
            asyncio.create_task(self._supervise("cursor flush", self._flush_loop)),
            asyncio.create_task(self._supervise("reconcile", self._reconcile_loop)),
            asyncio.create_task(self._supervise("prune", self._prune_loop)),
        ]

    async def stop(self) -> None:
        """Stop background loops, write the last cursors, release the bus."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await asyncio.wait_for(self.flush_cursors(), 5.0)
        except (LedgerUnavailable, TimeoutError) as exc:
            log.error("shutdown: could not write %d device cursors: %s", len(self.cursors), exc)
        await self.broker.close()

    async def drain(
        self, disconnect: Disconnect = RESTART, batch: int = 500, seconds: float = 10.0
    ) -> None:
        """Close every connection with ``disconnect``, ``batch`` at a time, within ``seconds``.

        Batches are spread over the time budget so reconnecting phones spread over
        the other nodes instead of arriving as one herd.
        """
        self.draining = True
        clients = list(self.hub.all())
        if not clients:
            return
        rounds = (len(clients) + batch - 1) // batch
        pause = min(1.0, seconds / 2 / rounds) if rounds > 1 else 0.0
        log.info("draining %d connections in %d batches", len(clients), rounds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        for i in range(0, len(clients), batch):
            for client in clients[i : i + batch]:
                client.close(disconnect)
            if pause and i + batch < len(clients):
                await asyncio.sleep(pause)
        writers = [c.writer_task for c in clients if c.writer_task is not None]
        if writers:
            await asyncio.wait(writers, timeout=max(0.1, deadline - loop.time()))
        await self.flush_cursors_quietly()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _supervise(self, name: str, loop_fn: Any) -> None:
        """Run a background loop forever: log and restart it if it fails."""
        while True:
            try:
                await loop_fn()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("background loop %r failed; restarting in 1s", name)
                await asyncio.sleep(1.0)

    # -- connections ------------------------------------------------------------------------

    def new_client(
        self,
        sink: Any,
        user: str,
        device: str,
        budget: TokenBucket | None = None,
        fast: FastWriter | None = None,
    ) -> Client:
        return Client(
            sink,
            user,
            device,
            f"{self.config.node_id}:{next(self._ids)}",
            max_queue=self.config.send_queue_size,
            on_sent=self._sent_hook,
            on_close=self._close_hook,
            rate=self.config.rate_limit_per_second,
            rate_burst=self.config.rate_limit_burst,
            budget=budget,
            fast=fast,
        )

    async def connect(self, client: Client, after: int | None) -> int:
        """Register, subscribe, then start the backfill; answers the resume position.

        Raises ``LedgerUnavailable`` (nothing left registered) if the ledger is down.
        """
        previous = self.hub.add(client)
        if previous is not None:
            previous.close(REPLACED)
        try:
            await self._acquire(client.user)
        except BaseException:
            self.hub.remove(client)
            raise
        try:
            reg = await self._registrar.register(client.user, client.device)
        except BaseException:
            self._leave(client)
            raise
        head = reg.head
        # An ack still in the buffer (not flushed yet) counts: it was durable to the device.
        client.acked = acked = max(reg.acked, self.cursors.pending_ack(client.user, client.device))
        if after is not None:
            after = min(after, head)  # a resume point past the head would swallow new events
        client.position = acked if after is None else after
        client.send(
            hello_frame(
                client.user,
                client.device,
                client.position,
                self.config.heartbeat_seconds,
                self.config.node_id,
                truncated=client.position < reg.pruned,
            )
        )
        self.metrics.connects.inc()
        self.metrics.connections.inc()
        self._announce([client])
        self._ensure_catch_up(client, known_head=head)
        return client.position

    def disconnect(self, client: Client) -> None:
        """Unregister a finished connection (idempotent)."""
        if client.catch_up_task is not None:
            client.catch_up_task.cancel()
        if self._leave(client):
            self._note_sent(client)
            self.cursors.seen(client.user, client.device, now_ms())
            self.metrics.connections.dec()

    def _leave(self, client: Client) -> bool:
        if not self.hub.remove(client):
            return False
        self._release(client.user)
        return True

    def ack_frame(self, client: Client, data: bytes) -> bool:
        """A text message read by the transport: True if it was an ack, now taken."""
        if client.closed:
            return False
        seq = ack_seq(data)
        if seq is None:
            return False
        self.ack(client, seq)
        return True

    def ack(self, client: Client, seq: int) -> None:
        """A cumulative ack from the device; acks beyond what it was given are clamped."""
        if seq > client.position:
            client.send(
                error_frame(
                    "bad_ack", f"ack {seq} is beyond the last event sent ({client.position})"
                )
            )
            seq = client.position
        if seq <= client.acked:
            return
        client.acked = seq
        self.cursors.ack(client.user, client.device, seq)
        self.acks_uncounted += 1  # counted in bulk by the flush loop

    def _on_close(self, client: Client, disconnect: Disconnect) -> None:
        if disconnect is SLOW:
            self.metrics.slow_closes.inc()
            log.info(
                "connection %s (%s/%s) too slow: queue of %d overflowed, closing 4008",
                client.conn_id,
                client.user,
                client.device,
                client.max_queue,
            )

    def _on_sent(self, client: Client, seq: int, created_at: int) -> None:
        self._sent_users.add(client.user)
        self.metrics.frames_delivered.inc()
        if created_at:
            self.metrics.latency.observe(max(0, now_ms() - created_at) / 1000)

    # -- subscriptions (reference-counted per user) -----------------------------------------

    async def _acquire(self, user: str) -> None:
        sub = self._subs.get(user)
        if sub is None:
            sub = self._subs[user] = _Subscription(asyncio.get_running_loop().create_future())
            self._spawn(self._subscribe(user, sub))
        sub.refs += 1
        if sub.ready is None:
            return
        try:
            await asyncio.shield(sub.ready)
        except BaseException:
            self._release(user, sub)
            raise

    async def _subscribe(self, user: str, sub: _Subscription) -> None:
        ready = sub.ready
        assert ready is not None
        try:
            await self.broker.subscribe([user_channel(user)])
        except Exception as exc:
            if self._subs.get(user) is sub:  # roll back: the next connection tries again
                del self._subs[user]
            ready.set_exception(exc)
        else:
            ready.set_result(None)
            sub.ready = None

    def _release(self, user: str, taken: _Subscription | None = None) -> None:
        """Drop one reference; ``taken`` is the subscription it was taken on, if known
        (after a failed subscribe the entry may already be a newer one: leave that alone)."""
        sub = self._subs.get(user)
        if sub is None or (taken is not None and sub is not taken):
            return
        sub.refs -= 1
        if sub.refs > 0:
            return
        del self._subs[user]
        if sub.ready is None:  # subscribed (not in flight, not failed)
            self._spawn(self._unsubscribe(user))

    async def _unsubscribe(self, user: str) -> None:
        if user in self._subs:  # someone connected again meanwhile
            return
        try:
            await self.broker.unsubscribe([user_channel(user)])
        except Exception as exc:
            log.warning("unsubscribe %s failed (harmless; messages are filtered): %s", user, exc)

    # -- publishing ---------------------------------------------------------------------------

    async def publish(self, batch: Sequence[NewEvent]) -> list[Recorded]:
        """Record ``batch`` durably, then fan the new events out. Raises ``LedgerUnavailable``."""
        answers = await self.commits.record(batch)
        messages = []
        for a in answers:
            if a.event is not None:
                delivery = Delivery.of(a.event)
                messages.append(
                    (user_channel(a.user), encode_delivery(delivery, self.config.node_id))
                )
                if self.hub.has(a.user):
                    # This node's devices get it now, not after a trip through the bus; the
                    # bus carries it to the other nodes, and its echo here is dropped.
                    self._fan_out(delivery.wired())
        self.metrics.events_published.inc(len(messages))
        self.metrics.events_duplicate.inc(len(answers) - len(messages))
        written = self.outbox.send(messages, wait=True)
        if written is not None:
            # Durable already: if the bus fails (the outbox logs it), connected devices get
            # these from the ledger on the next event of their user or the next reconcile.
            with contextlib.suppress(Exception):
                await written
        return answers

    def _announce(self, clients: Iterable[Client]) -> None:
        """Tell every node that these connections are their devices' newest (see _on_replace).

        Nothing else would repeat a lost announcement, so the outbox retries it."""
        messages = [
            (user_channel(c.user), encode_replace(Replace(c.user, c.device, _replace_key(c))))
            for c in clients
            if not c.closed
        ]
        self.outbox.send(messages, retry=True)

    def _evict(self, devices: list[tuple[str, str]]) -> None:
        """Devices deleted to make room under the device limit: close them on every node."""
        for user, device in devices:
            self.metrics.device_limit.labels("evicted").inc()
            log.warning(
                "device limit: user %s has over %d devices; evicted %s, the least recently seen",
                user,
                self.config.device_limit.cap if self.config.device_limit else 0,
                device,
            )
        self.outbox.send(
            [(user_channel(u), encode_evict(Evict(u, d))) for u, d in devices], retry=True
        )

    # -- fan-out ------------------------------------------------------------------------------

    def _on_message(self, channel: str, payload: bytes) -> None:
        try:
            message = decode_bus(payload, self.config.node_id)
        except ValueError as exc:
            log.error("dropping malformed bus message on %s: %s", channel, exc)
            return
        if message is None:
            return  # an event this node published: its own devices had it at once
        if isinstance(message, Replace):
            self._on_replace(message)
            return
        if isinstance(message, Evict):
            client = self.hub.device(message.user, message.device)
            if client is not None:
                client.close(EVICTED)
            return
        self._fan_out(message)

    def _fan_out(self, d: Delivery) -> None:
        """Offer an event to every local connection of its user (never awaits a socket)."""
        now = now_ms()
        written = 0
        self._sent_users.add(d.user)
        for client in self.hub.clients(d.user):
            written += self._deliver(client, d, now)
        self._count_written(written, d.created_at)

    def _on_replace(self, r: Replace) -> None:
        client = self.hub.device(r.user, r.device)
        if client is None or client.closed:
            return
        mine = _replace_key(client)
        if mine < r.conn:
            client.close(REPLACED)
        elif mine > r.conn:
            # An older connection announced itself, perhaps before this node's announcement
            # could reach its node: announce again so that it learns it was replaced.
            self._announce([client])

    def _count_written(self, written: int, created_at: int) -> None:
        """Metrics of frames the fast path wrote at once, in bulk: one counter increment and
        one latency sample (the last of them) per event, not one each per frame."""
        if written:
            self.metrics.frames_delivered.inc(written)
            self.metrics.latency.observe(max(0, now_ms() - created_at) / 1000)

    def _deliver(self, client: Client, d: Delivery, now: int) -> int:
        """Offer a live event to a connection; answers 1 if its frame was written at once
        (the caller counts those in bulk), else 0 (queued, skipped, or a catch-up begun)."""
        if client.closed:
            return 0
        if client.catching_up:
            if client.pending is None:
                client.pending = [d]
            elif len(client.pending) < MAX_PENDING:
                client.pending.append(d)
            else:
                client.pending_overflow = True
            return 0
        if d.seq <= client.position:
            return 0  # already given (backfill or a repeated bus message)
        if d.seq != client.position + 1:
            # A hole in the user's stream: a message overtaken on the bus, or lost. The
            # ledger has it if it does not arrive within the grace period.
            client.catching_up = True
            client.pending = [d]  # not catching up: nothing was held before
            self._ensure_catch_up(client, grace=GAP_GRACE)
            return 0
        client.position = d.seq
        if d.device is not None and d.device != client.device:
            return 0  # for another device of the user
        if d.expires_at is not None and d.expires_at <= now:
            return 0
        # The sent cursor is read off the connection when cursors are written (see
        # _note_sent), not noted per frame.
        return (
            1
            if client.send(d.frame, d.seq, d.created_at, d.wire) and client.sent_seq == d.seq
            else 0
        )

    def _ensure_catch_up(
        self, client: Client, known_head: int | None = None, grace: float = 0.0
    ) -> None:
        client.catching_up = True
        task = client.catch_up_task
        if task is None or task.done():
            client.catch_up_task = self._spawn(self._guarded_catch_up(client, known_head, grace))

    async def _guarded_catch_up(self, client: Client, known_head: int | None, grace: float) -> None:
        try:
            if grace:
                await asyncio.sleep(grace)
                if self._replay_pending(client):
                    return  # the missing message arrived meanwhile: no ledger read
            await self._catch_up(client, known_head)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never leave a connection stuck in catch-up: it resumes from the ledger.
            log.exception("catch-up of %s failed; closing it", client.conn_id)
            client.close(INTERNAL)
        finally:
            if client.catch_up_task is asyncio.current_task():
                client.catch_up_task = None  # a finished task is not kept for the connection's life

    def _replay_pending(self, client: Client) -> bool:
        """Deliver the buffered live events in seq order; True if that closed every gap."""
        pending, client.pending = client.pending or [], None
        overflow, client.pending_overflow = client.pending_overflow, False
        client.catching_up = False
        pending.sort(key=_seq)
        now = now_ms()
        for d in pending:
            self._count_written(self._deliver(client, d, now), d.created_at)
        if overflow:
            client.catching_up = True
        return not client.catching_up

    async def _catch_up(self, client: Client, known_head: int | None = None) -> None:
        """Send the ledger's events after ``client.position``, then the buffered live ones.

        ``known_head`` is a head read after the subscription was made: a connection
        already at it needs no backfill read (everything newer arrives live).
        """
        backoff = 0.2
        page = self.backfill_page
        while not client.closed:
            if client.queued + page > client.max_queue:
                await client.wait_drained()  # a long backlog flows at the socket's pace
                continue
            rows: list[StoredEvent]
            if known_head is not None and client.position >= known_head:
                rows, head = [], known_head
            else:
                self.metrics.catch_ups.inc()
                try:
                    # Batched with every other connection catching up meanwhile.
                    rows, head = await self._backfill((client.user, client.device, client.position))
                except LedgerUnavailable as exc:
                    # Keep the connection: it catches up as soon as the ledger answers.
                    log.warning(
                        "catch-up of %s/%s waits for the ledger: %s",
                        client.user,
                        client.device,
                        exc,
                    )
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                    continue
            known_head = None
            backoff = 0.2
            for ev in rows:
                client.send(event_frame(ev), ev.seq)
            if len(rows) == page:
                client.position = rows[-1].seq
                continue
            client.position = max(client.position, head)
            if self._replay_pending(client):
                return

    # -- background loops ---------------------------------------------------------------------

    def count_acks(self) -> None:
        if self.acks_uncounted:
            self.metrics.acks.inc(self.acks_uncounted)
            self.acks_uncounted = 0

    def _note_sent(self, client: Client) -> None:
        if client.sent_seq > client.sent_noted:
            client.sent_noted = client.sent_seq
            self.cursors.sent(client.user, client.device, client.sent_seq)

    def _collect_sent(self) -> None:
        """Hand the sent cursors of the users that got frames since the last time to the
        cursor buffer: one pass per flush instead of a buffer update per frame."""
        users, self._sent_users = self._sent_users, set()
        for user in users:
            for client in self.hub.clients(user):
                self._note_sent(client)

    async def flush_cursors(self, include_sent: bool = True) -> int:
        """Write the buffered cursor moves; answers how many devices moved."""
        self.count_acks()
        if include_sent:
            self._collect_sent()
        moves = self.cursors.take(include_sent)
        if not moves:
            return 0
        try:
            await self.ledger.flush_cursors(moves)
        except BaseException:
            self.cursors.restore(moves)
            raise
        self.cursors.done()
        return len(moves)

    async def flush_cursors_quietly(self, include_sent: bool = True) -> int:
        try:
            return await self.flush_cursors(include_sent)
        except LedgerUnavailable as exc:
            self.metrics.cursor_flush_failures.inc()
            log.warning(
                "cursor flush failed, %d devices kept for retry: %s", len(self.cursors), exc
            )
            return 0

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        pause = self.config.ack_flush_seconds
        while True:
            await asyncio.sleep(pause)
            # Acks every round; devices that only moved ``sent`` once per SENT_FLUSH_SECONDS.
            include_sent = loop.time() - sent_at >= SENT_FLUSH_SECONDS
            if include_sent:
                sent_at = loop.time()
            written = await self.flush_cursors_quietly(include_sent)
            pause = flush_pause(self.config.ack_flush_seconds, written)

    def _on_reconnect(self) -> None:
        """The bus came back: messages may have been lost, so compare with the ledger now."""
        self.metrics.broker_reconnects.inc()
        self._last_heads = {}
        self._reconcile_now.set()
        # Announcements sent by other nodes meanwhile may be lost: repeat ours, so that
        # a device connected on two nodes during the outage keeps only its newest connection.
        self._announce(self.hub.all())

    async def _reconcile_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._reconcile_now.wait(), self.config.reconcile_seconds)
                urgent = True
            except TimeoutError:
                urgent = False
            self._reconcile_now.clear()
            await self.reconcile(urgent)

    async def reconcile(self, urgent: bool = False) -> None:
        """Start a catch-up for every connection behind its user's ledger head.

        Normally a connection must have been behind for a whole round (its live
        message may simply be in flight); ``urgent`` (after a bus reconnect) acts at once.
        """
        users = self.hub.users()
        if not users:
            self._last_heads = {}
            return
        try:
            heads = await self.ledger.heads(users)
        except LedgerUnavailable as exc:
            log.warning("reconcile skipped: %s", exc)
            return
        previous, self._last_heads = self._last_heads, heads
        for user, head in heads.items():
            due = head if urgent else min(head, previous.get(user, 0))
            for client in self.hub.clients(user):
                if not client.catching_up and not client.closed and client.position < due:
                    self._ensure_catch_up(client)

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(60.0)
            await self.prune()

    async def prune(self) -> None:
        """Delete events and devices older than the retention period.

        A device connected here is marked seen first: one that stays connected for
        longer than the retention period without acking is not a stale device.
        """
        now = now_ms()
        for client in self.hub.all():
            self.cursors.seen(client.user, client.device, now)
        before = now - self.config.retention_seconds * 1000
        try:
            await self.flush_cursors()
            events = await self.ledger.prune(before)
            devices = await self.ledger.prune_devices(before)
        except LedgerUnavailable as exc:
            log.warning("prune skipped: %s", exc)
            return
        if events or devices:
            log.info(
                "pruned %d events and %d devices older than the retention period",
                events,
                devices,
            )


def _seq(d: Delivery) -> int:
    return d.seq


def _replace_key(client: Client) -> str:
    """Orders connections of one device consistently on every node: the newest wins."""
    return f"{client.connected_at:015d}/{client.conn_id}"
