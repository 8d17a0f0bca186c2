"""Helpers for tests with several server processes on one Redis and one PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.harness import Device, ServerProcess, unique

CLUSTER_ENV = {
    "COURIER_RECONCILE_SECONDS": "0.5",
    "COURIER_PRESENCE_SECONDS": "0.5",
    "COURIER_INGEST_CLAIM_SECONDS": "2",
}


def start_cluster(
    database_url: str, redis_url: str, workdir: Path, n: int = 3, **env: str
) -> list[ServerProcess]:
    nodes: list[ServerProcess] = []
    try:
        for i in range(n):
            nodes.append(
                ServerProcess(
                    database_url,
                    workdir,
                    redis_url=redis_url,
                    env={**CLUSTER_ENV, "COURIER_NODE_ID": f"node{i}", **env},
                ).start()
            )
    except BaseException:
        for node in nodes:
            node.kill()
        raise
    return nodes


async def xadd(redis_url: str, events: Sequence[dict[str, Any] | str]) -> None:
    """Publish through the ingest stream, as a backend already on Redis would."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for e in events:
                pipe.xadd("courier:ingest", {"event": e if isinstance(e, str) else json.dumps(e)})
            await pipe.execute()
    finally:
        await client.aclose()


@dataclass
class Roamer:
    """A phone that processes events in order, acks them, and on any disconnect
    reconnects (resuming with ``after=``) to the next node that accepts it."""

    user: str
    device: str
    nodes: list[ServerProcess]
    start: int = 0
    processed: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    closes: list[int] = field(default_factory=list)
    reconnects: int = 0
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def last(self) -> int:
        return self.processed[-1] if self.processed else 0

    async def run(self, until_count: int, timeout: float = 60.0) -> None:
        await asyncio.wait_for(self._run(until_count), timeout)

    async def _run(self, until_count: int) -> None:
        i = self.start
        while len(self.processed) < until_count:
            node = self.nodes[i % len(self.nodes)]
            i += 1
            try:
                phone = await Device.connect(
                    node, self.user, self.device, after=self.last if self.processed else None
                )
            except (OSError, InvalidStatus, ConnectionClosed, TimeoutError):
                self.reconnects += 1
                await asyncio.sleep(0.1)  # backoff before the next node
                continue
            self.connected.set()
            try:
                while len(self.processed) < until_count:
                    frame = await phone.event(timeout=30)
                    if frame["seq"] <= self.last:
                        continue  # a repeat around a reconnect: dropped by seq
                    self.processed.append(frame["seq"])
                    self.ids.append(frame["id"])
                    await phone.ack(frame["seq"])
                await phone.close()
            except ConnectionClosed as exc:
                self.closes.append(exc.rcvd.code if exc.rcvd else 1006)
                self.reconnects += 1
                self.connected.clear()


def users(n: int) -> list[str]:
    return [unique("cu") for _ in range(n)]
