"""Redis for a cluster of nodes: the fan-out bus (``RedisBroker``) and presence (``RedisPresence``).

``RedisBroker`` holds ONE pub/sub connection per process, owned by a supervised
listener task. Subscriptions are kept as a desired set; requests are queued and
written as one ``SUBSCRIBE``/``UNSUBSCRIBE`` command per batch (up to
``batch_size`` channels), so a reconnect storm of thousands of users costs a
handful of round trips. ``subscribe`` returns once Redis confirmed every channel.

When the connection fails, the listener logs, backs off (0.1 s doubling to 5 s,
with jitter), reconnects, re-subscribes every desired channel in batches, waits
for a ``PING`` sent after them (Redis answers in order, so the pong proves every
``SUBSCRIBE`` before it was confirmed) and only THEN calls ``on_reconnect``: the
node catches every connection up from the ledger, so a Redis blip loses nothing
durable.

A silent dead connection (no RST, e.g. a dropped NAT entry) is noticed by the
listener's own health check: after ``health_check_seconds`` without any data it
sends a ``PING``; with no answer within another period the connection is
treated as dead. TCP keepalive is on as well.

Publishing uses a separate, pooled command client (``health_check_interval`` set),
one pipeline per ``publish_many`` call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from channels.broker import BrokerUnavailable, MessageHandler, ReconnectHandler
from channels.hub import Hub

log = logging.getLogger("courier.redis")

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 5.0
_RESYNC = b"courier-resync"
_HEALTH = b"courier-health"


def backoff_delay(attempt: int) -> float:
    """0.1 s doubling up to 5 s, with +-50% jitter so a fleet does not reconnect in step."""
    base: float = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** min(attempt, 10))
    return base * (0.5 + random.random())


POOL_SIZE = 16
"""Connections per command client. Each node's traffic is coalesced (one bus pipeline in
flight, one presence pipeline, one ingest reader), so a handful suffice; the pool is a
blocking one, so a burst waits up to the command timeout for a connection instead of
failing with ``MaxConnectionsError`` (redis-py's default pool fails past 100)."""


def tls_options(url: str, verify: str = "full", ca_cert: str | None = None) -> dict[str, Any]:
    """redis-py's TLS options for ``url`` (none unless it is ``rediss://``).

    ``verify``: ``full`` checks the certificate chain and the host name (the default),
    ``ca`` the chain only, ``none`` nothing (Heroku Redis serves a self-signed
    certificate). ``ca_cert``: a PEM certificate to trust, its text or its path.
    """
    if not url.startswith("rediss://"):
        return {}
    options: dict[str, Any] = {
        "ssl_cert_reqs": "none" if verify == "none" else "required",
        "ssl_check_hostname": verify == "full",
    }
    if ca_cert is not None:
        key = "ssl_ca_data" if "-----BEGIN CERTIFICATE-----" in ca_cert else "ssl_ca_certs"
        options[key] = ca_cert
    return options


def redis_client(
    url: str,
    *,
    tls: Mapping[str, Any] | None = None,
    name: str | None = None,
    timeout: float = 5.0,
    health_check_seconds: float = 15.0,
    retries: int = 2,
    max_connections: int = POOL_SIZE,
) -> Redis:
    """A pooled command client with bounded timeouts and few, fast retries.

    (redis-py's default retries ten times, which turns an outage into long stalls.)
    ``retries=0`` for a client whose commands must never be sent twice blindly.
    """
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_connect_timeout=timeout,
        socket_timeout=timeout,
        socket_keepalive=True,
        health_check_interval=health_check_seconds,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries),
        client_name=name,
        **(tls or {}),
    )
    return Redis.from_pool(pool)  # the client owns its pool: aclose() closes both


def _unavailable(exc: BaseException) -> BrokerUnavailable:
    return BrokerUnavailable(f"redis: {type(exc).__name__}: {exc}")


class RedisBroker:
    """The ``Broker`` on Redis pub/sub (see the module documentation)."""

    def __init__(
        self,
        url: str,
        *,
        tls: Mapping[str, Any] | None = None,
        name: str = "courier",
        subscribe_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        health_check_seconds: float = 5.0,
        batch_size: int = 1000,
    ) -> None:
        self.url = url
        self.name = name
        self.subscribe_timeout = subscribe_timeout
        self.connect_timeout = connect_timeout
        self.health_check_seconds = health_check_seconds
        self.batch_size = batch_size
        self.client = redis_client(url, tls=tls, name=f"{name}:pub", timeout=connect_timeout)
        self._pool = ConnectionPool.from_url(
            url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=connect_timeout,
            socket_keepalive=True,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 0),
            client_name=f"{name}:bus",
            protocol=2,  # pub/sub replies as plain arrays, read by this module itself
            **(tls or {}),
        )
        self.desired: set[str] = set()
        """Channels this process wants; re-subscribed after every reconnect."""
        # State of the current connection; reset when it fails.
        self._conn: Any = None
        self._sent: set[str] = set()  # channels whose last command written was SUBSCRIBE
        self._inflight: dict[str, deque[list[asyncio.Future[None]] | None]] = {}
        # Requests not written yet: channel -> wanted (True subscribe, False unsubscribe).
        self._queue: dict[str, bool] = {}
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._wake = asyncio.Event()
        self._resynced = asyncio.Event()
        self._on_message: MessageHandler | None = None
        self._on_reconnect: ReconnectHandler | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected_once = False
        self.reconnects = 0
        self.commands_written = 0
        """SUBSCRIBE/UNSUBSCRIBE commands written (batching makes this small)."""

    # -- Broker -------------------------------------------------------------------------------

    async def start(self, on_message: MessageHandler, on_reconnect: ReconnectHandler) -> None:
        """Start the listener; waits up to ``connect_timeout`` for the first connection.

        If Redis is down at start the node still starts (``/readyz`` answers 503) and
        the listener keeps reconnecting; subscriptions fail with ``BrokerUnavailable``
        until it is back.
        """
        self._on_message = on_message
        self._on_reconnect = on_reconnect
        self._task = asyncio.create_task(self._listen_forever(), name="courier.redis listener")
        try:
            await asyncio.wait_for(self._resynced.wait(), self.connect_timeout)
        except TimeoutError:
            log.error(
                "redis bus %s not reachable within %.0fs; starting anyway and retrying",
                self._safe_url(),
                self.connect_timeout,
            )

    async def subscribe(self, channels: Iterable[str]) -> None:
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[None]] = []
        added: list[str] = []
        for ch in set(channels):
            if ch not in self.desired:
                self.desired.add(ch)
                added.append(ch)
            if ch in self._sent:
                self._queue.pop(ch, None)  # cancel an unsubscribe not written yet
                pending = self._inflight.get(ch)
                if pending:  # a SUBSCRIBE is on its way: wait for its confirmation
                    fut = loop.create_future()
                    last = pending[-1]
                    assert last is not None  # the last command written was SUBSCRIBE
                    last.append(fut)
                    futures.append(fut)
                continue
            self._queue[ch] = True
            fut = loop.create_future()
            self._waiting.setdefault(ch, []).append(fut)
            futures.append(fut)
        if not futures:
            return
        self._wake.set()
        try:
            await asyncio.wait_for(asyncio.gather(*futures), self.subscribe_timeout)
        except TimeoutError:
            # Roll back what this call added: the caller will retry on its next connection.
            await self.unsubscribe(added)
            raise BrokerUnavailable(
                f"redis did not confirm {len(futures)} subscriptions within "
                f"{self.subscribe_timeout:g}s ({'connected' if self._conn else 'disconnected'})"
            ) from None

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        for ch in set(channels):
            self.desired.discard(ch)
            for fut in self._waiting.pop(ch, ()):  # superseded before it was written
                if not fut.done():
                    fut.set_result(None)
            if ch in self._sent:
                self._queue[ch] = False
            else:
                self._queue.pop(ch, None)
        self._wake.set()

    async def publish_many(self, messages: Sequence[tuple[str, bytes]]) -> None:
        if not messages:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for channel, payload in messages:
                    pipe.publish(channel, payload)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise _unavailable(exc) from exc

    async def ping(self) -> None:
        if self._conn is None or not self._resynced.is_set():
            raise BrokerUnavailable("redis pub/sub connection is down; reconnecting")
        try:
            await asyncio.wait_for(self.client.ping(), self.connect_timeout)
        except (RedisError, OSError, TimeoutError) as exc:
            raise _unavailable(exc) from exc

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._on_message = None
        self.desired.clear()
        self._queue.clear()
        for futs in self._waiting.values():
            for fut in futs:
                if not fut.done():
                    fut.set_exception(BrokerUnavailable("the broker is closed"))
        self._waiting.clear()
        await self.client.aclose()
        await self._pool.aclose()

    @property
    def connected(self) -> bool:
        return self._conn is not None and self._resynced.is_set()

    # -- the listener -------------------------------------------------------------------------

    async def _listen_forever(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # connection errors, and bugs: never die silently
                if isinstance(exc, (RedisError, OSError, TimeoutError)):
                    log.warning(
                        "redis bus connection lost or refused (%s: %s); %d channels to "
                        "re-subscribe",
                        type(exc).__name__,
                        exc,
                        len(self.desired),
                    )
                else:
                    log.exception("redis bus listener failed unexpectedly; reconnecting")
            finally:
                healthy = self._resynced.is_set()
                await self._teardown()
            attempt = 0 if healthy else attempt + 1
            delay = backoff_delay(attempt)
            log.info("redis bus: reconnecting in %.2fs (attempt %d)", delay, attempt + 1)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection: connect, re-subscribe everything, then read until it fails."""
        # One dedicated connection (not a pooled one): it lives in subscribed mode.
        conn: Any = self._pool.make_connection()  # type: ignore[no-untyped-call]
        self._conn = conn
        await asyncio.wait_for(conn.connect(), self.connect_timeout)
        # Every desired channel goes out again, batched; queued waiters stay attached.
        for ch in self.desired:
            self._queue[ch] = True
        tasks = {
            asyncio.create_task(self._writer(conn, first=True), name="courier.redis writer"),
            asyncio.create_task(self._reader(conn), name="courier.redis reader"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            task.result()  # the error that ended the session
        raise ConnectionError("redis bus session ended")

    async def _writer(self, conn: Any, first: bool) -> None:
        """Write queued (un)subscriptions, coalesced: one command per ``batch_size`` channels."""
        while True:
            if not first:
                await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, {}
            subs: list[str] = []
            unsubs: list[str] = []
            for ch, want in batch.items():
                if want and ch not in self._sent:
                    subs.append(ch)
                    self._sent.add(ch)
                    self._inflight.setdefault(ch, deque()).append(self._waiting.pop(ch, []))
                elif not want and ch in self._sent:
                    unsubs.append(ch)
                    self._sent.discard(ch)
                    self._inflight.setdefault(ch, deque()).append(None)
            for command, channels in (("SUBSCRIBE", subs), ("UNSUBSCRIBE", unsubs)):
                for i in range(0, len(channels), self.batch_size):
                    self.commands_written += 1
                    await conn.send_command(command, *channels[i : i + self.batch_size])
            if first:
                await conn.send_command("PING", _RESYNC)
                first = False

    async def _reader(self, conn: Any) -> None:
        awaiting_pong = False
        while True:
            response = await conn.read_response(timeout=self.health_check_seconds)
            if response is None:  # nothing for a whole period
                if awaiting_pong:
                    raise TimeoutError(
                        f"no answer to PING within {self.health_check_seconds:g}s; "
                        "the connection is dead"
                    )
                await conn.send_command("PING", _HEALTH)
                awaiting_pong = True
                continue
            awaiting_pong = False
            self._handle(response)

    def _handle(self, response: Any) -> None:
        if isinstance(response, bytes):  # PING outside subscribed mode (no channels yet)
            if response == _RESYNC:
                self._on_resynced()
            return
        kind = response[0]
        if kind == b"message":
            channel = response[1].decode()
            if self._on_message is None or channel not in self.desired:
                return
            try:
                self._on_message(channel, response[2])
            except Exception:
                log.exception("message handler failed on %s; message dropped", channel)
        elif kind in (b"subscribe", b"unsubscribe"):
            channel = response[1].decode()
            pending = self._inflight.get(channel)
            if not pending:
                return
            waiters = pending.popleft()
            if not pending:
                del self._inflight[channel]
            for fut in waiters or ():
                if not fut.done():
                    fut.set_result(None)
        elif kind == b"pong":
            if response[1] == _RESYNC:
                self._on_resynced()
        else:
            log.warning("unexpected reply on the redis bus connection: %r", response[:2])

    def _on_resynced(self) -> None:
        self._resynced.set()
        if self._connected_once:
            self.reconnects += 1
            log.warning(
                "redis bus reconnected, %d channels re-subscribed; catching up from the ledger",
                len(self._sent),
            )
            if self._on_reconnect is not None:
                try:
                    self._on_reconnect()
                except Exception:
                    log.exception("reconnect handler failed")
        else:
            log.info("redis bus connected (%d channels)", len(self._sent))
        self._connected_once = True

    async def _teardown(self) -> None:
        conn, self._conn = self._conn, None
        self._resynced.clear()
        # Waiters of SUBSCRIBEs that were written but not confirmed wait for the next
        # connection, which subscribes every desired channel again.
        for ch, pending in self._inflight.items():
            for waiters in pending:
                if waiters and ch in self.desired:
                    self._waiting.setdefault(ch, []).extend(waiters)
        self._inflight.clear()
        self._sent.clear()
        self._queue = {}
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect(nowait=True)

    def _safe_url(self) -> str:
        host = self.url.rsplit("@", 1)[-1]
        return host.split("://", 1)[-1]


# -- presence -----------------------------------------------------------------------------------

NODES_KEY = "courier:nodes"


def node_key(node_id: str) -> str:
    return f"courier:node:{node_id}"


def presence_key(user: str) -> str:
    # The user as hash tag, like its bus channel: one user's keys live on one cluster shard.
    return f"courier:presence:{{{user}}}"


def node_devices_key(node_id: str) -> str:
    return f"courier:node:{node_id}:devices"


_SEP = "\x1f"
"""Between user and device in a node's device set (neither may contain it)."""


class RedisPresence:
    """Cluster-wide presence: each node writes what changed, and a node's liveness says
    whether its entries count.

    Keys:

    * ``courier:nodes`` ZSET node id -> expiry (unix milliseconds), and
      ``courier:node:{id}`` the node's connection count, with a TTL: the heartbeat.
    * ``courier:presence:{user}`` ZSET of ``device|node`` (score: when it was written).
      An entry counts only while its node's heartbeat is alive.
    * ``courier:node:{id}:devices`` SET of the node's ``user<US>device`` entries, so that
      whoever finds the node dead can remove them.

    Every ``interval`` seconds a node writes, in ONE pipeline, its heartbeat and the
    entries that changed since its last beat (a connect or a disconnect in between), so
    a beat costs the same with ten devices or a hundred thousand. A device that leaves
    drops out within one interval; a node that stops beating drops out when its expiry
    passes (``ttl``), and the next beat of any live node removes its entries. A node that
    finds its heartbeat key gone at a beat (it was reaped after a stall, or Redis lost its
    data) writes all of its entries again at the next one. Readers compare expiries with
    their own clock: keep node clocks in sync (NTP); a skew well under ``ttl`` does no
    harm.
    """

    def __init__(
        self,
        client: Redis,
        node_id: str,
        hub: Hub,
        *,
        interval: float = 2.0,
        ttl: float = 10.0,
    ) -> None:
        self.client = client
        self.node_id = node_id
        self.hub = hub
        self.interval = interval
        self.ttl = ttl
        self._written: dict[str, set[str]] = {}  # user -> devices Redis has from this node
        self._rewrite = False  # write every entry at the next beat, not only the changes
        hub.track_changes()  # a beat looks only at users whose connections changed
        self._task: asyncio.Task[None] | None = None

    async def connected_devices(self, user: str) -> set[str]:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrange(presence_key(user), 0, -1)
            pipe.zrangebyscore(NODES_KEY, _now_ms(), "+inf")
            members, live = await pipe.execute()
        alive = {_text(n) for n in live}
        devices = {c.device for c in self.hub.clients(user) if not c.closed}
        for m in members:
            device, _, node = _text(m).rpartition("|")
            if node in alive:
                devices.add(device)
        return devices

    async def nodes(self) -> dict[str, int]:
        ids = [_text(m) for m in await self.client.zrangebyscore(NODES_KEY, _now_ms(), "+inf")]
        counts = await self.client.mget([node_key(i) for i in ids]) if ids else []
        result = {i: int(c) for i, c in zip(ids, counts, strict=True) if c is not None}
        result[self.node_id] = len(self.hub)
        return result

    async def start(self) -> None:
        """Write the first heartbeat (raises if Redis is down), then beat in the background."""
        await self.beat()
        self.start_beating()

    def start_beating(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._beat_forever(), name="courier.redis presence")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await asyncio.wait_for(self._withdraw(), 2.0)
        except (RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "presence: could not withdraw node %s (expires by TTL): %s", self.node_id, exc
            )

    async def beat(self) -> None:
        """The heartbeat and the entries that changed since the last beat (one pipeline),
        then the removal of dead nodes' entries, if any node died. Only the users whose
        connections changed are looked at (all of them after a failed beat)."""
        now = _now_ms()
        ttl_ms = int(self.ttl * 1000)
        hub = self.hub
        written = self._written
        rewrite = self._rewrite
        users = hub.take_changed()
        if rewrite:
            users.update(written)
            users.update(hub.users())
        now_written: dict[str, set[str]] = {}  # the new entries of the users looked at
        mine = node_devices_key(self.node_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zadd(NODES_KEY, {self.node_id: now + ttl_ms})
            pipe.set(node_key(self.node_id), len(hub), px=ttl_ms, get=True)
            members: list[str] = []
            gone_members: list[str] = []
            for user in users:
                devices = {c.device for c in hub.clients(user) if not c.closed}
                before = written.get(user)
                now_written[user] = devices
                if before == devices and not rewrite:
                    continue
                added = devices - before if before and not rewrite else devices
                gone = before - devices if before else ()
                if added:
                    pipe.zadd(presence_key(user), {self._member(d): now for d in added})
                    members += [user + _SEP + d for d in added]
                if gone:
                    pipe.zrem(presence_key(user), *(self._member(d) for d in gone))
                    gone_members += [user + _SEP + d for d in gone]
            if members:
                pipe.sadd(mine, *members)
            if gone_members:
                pipe.srem(mine, *gone_members)
            pipe.zrangebyscore(NODES_KEY, "-inf", now - 1)
            try:
                replies = await pipe.execute()
            except BaseException:
                self._rewrite = True  # some of it may be written, or Redis restarted
                raise
        for user, devices in now_written.items():
            if devices:
                written[user] = devices
            else:
                written.pop(user, None)
        self._rewrite = False
        if replies[1] is None:
            # No heartbeat key: the first beat, or this node was taken for dead (a stall
            # longer than the TTL) and its entries removed, or Redis lost its data. Write
            # every entry again at the next beat.
            self._rewrite = True
        dead = [_text(n) for n in replies[-1] if _text(n) != self.node_id]
        if dead:
            await self._reap(dead)

    def _member(self, device: str) -> str:
        return f"{device}|{self.node_id}"

    async def _reap(self, dead: list[str]) -> None:
        """Remove the entries of nodes whose heartbeat expired. Several nodes may do this at
        once: every step can be repeated. A node that was only late finds its heartbeat key
        gone at its next beat and writes its entries again."""
        for node in dead:
            entries = await self.client.smembers(node_devices_key(node))
            async with self.client.pipeline(transaction=False) as pipe:
                for raw in entries:
                    user, _, device = _text(raw).partition(_SEP)
                    pipe.zrem(presence_key(user), f"{device}|{node}")
                # The heartbeat key goes too: were the node only late, it learns so.
                pipe.delete(node_devices_key(node), node_key(node))
                pipe.zrem(NODES_KEY, node)
                await pipe.execute()
            log.info("presence: node %s stopped beating; %d entries removed", node, len(entries))

    async def _beat_forever(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self.interval)
            try:
                await asyncio.wait_for(self.beat(), max(self.interval, 1.0))
                if failures:
                    log.info("presence heartbeat recovered after %d failures", failures)
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                # Other nodes stop counting this one after the TTL; say so once, then quietly.
                level = (
                    logging.WARNING if failures in (1, 10) or failures % 100 == 0 else logging.DEBUG
                )
                log.log(
                    level,
                    "presence heartbeat failed %d times (%s: %s); node %s drops out of "
                    "cluster presence after %.0fs",
                    failures,
                    type(exc).__name__,
                    exc,
                    self.node_id,
                    self.ttl,
                )

    async def _withdraw(self) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrem(NODES_KEY, self.node_id)
            pipe.delete(node_key(self.node_id), node_devices_key(self.node_id))
            for user, devices in self._written.items():
                pipe.zrem(presence_key(user), *(self._member(d) for d in devices))
            await pipe.execute()
        self._written = {}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000
