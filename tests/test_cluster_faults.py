"""Faults in a three-node cluster: each test injects one, and every published event
must still be received, in order, and acked by every device of its user.

Every service a test stops is started again in a ``finally``, even when the test fails.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.cluster import Roamer, start_cluster, users, xadd
from tests.conftest import fresh_redis_db
from tests.harness import API_KEY, ServerProcess, until

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

PER_USER = 40


@pytest.fixture
def fault_redis(redis_url: str) -> str:
    return fresh_redis_db(redis_url, 4)


@contextmanager
def cluster(
    postgres_url: str, redis_url: str, workdir: Path, **env: str
) -> Iterator[list[ServerProcess]]:
    nodes = start_cluster(postgres_url, redis_url, workdir, **env)
    try:
        yield nodes
    finally:
        for node in nodes:
            node.kill()
        for node in nodes:
            assert "Traceback" not in node.log(), node.log()


async def publish_retrying(
    nodes: list[ServerProcess], event: dict[str, object], start: int
) -> None:
    """A backend that retries on another node with the same id (so never twice)."""
    for attempt in range(60):
        node = nodes[(start + attempt) % len(nodes)]
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                r = await http.post(
                    f"{node.url}/v1/events",
                    json=event,
                    headers={"Authorization": f"Bearer {API_KEY}"},
                )
            if r.status_code in (200, 201):
                return
            assert r.status_code == 503, r.text
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"could not publish {event['id']}")


async def run_scenario(
    nodes: list[ServerProcess],
    fault: Callable[[], Awaitable[None]],
    fault_at: int = PER_USER // 2,
    devices_per_user: int = 2,
    stream: str | None = None,
) -> list[Roamer]:
    """Publish PER_USER events to each of 3 users (HTTP, or the stream when given),
    inject ``fault`` halfway, and wait for every device to process every event."""
    people = users(3)
    phones = [
        Roamer(u, f"d{j}", nodes, start=i + j)
        for i, u in enumerate(people)
        for j in range(devices_per_user)
    ]
    runs = [asyncio.create_task(p.run(PER_USER, timeout=90)) for p in phones]
    await asyncio.wait_for(asyncio.gather(*(p.connected.wait() for p in phones)), 20)
    expected = {u: [f"{u}-{k}" for k in range(PER_USER)] for u in people}
    for k in range(PER_USER):
        if k == fault_at:
            await fault()
        batch = [
            {"user": u, "kind": "block.grabbed", "id": f"{u}-{k}", "data": {"k": k}} for u in people
        ]
        if stream:
            await xadd(stream, batch)
        else:
            for i, e in enumerate(batch):
                await publish_retrying(nodes, e, k + i)
    await asyncio.gather(*runs)
    for p in phones:
        assert p.ids == expected[p.user], (p.device, p.closes)
    await all_acked(nodes, phones)
    return phones


async def all_acked(nodes: list[ServerProcess], phones: list[Roamer]) -> None:
    async def done() -> bool:
        for p in phones:
            for node in nodes:
                if node.proc is not None and node.proc.poll() is None:
                    body = (await node.get(f"/v1/users/{p.user}/devices")).json()
                    cursors = {d["device"]: d["acked_seq"] for d in body["devices"]}
                    return all(cursors.get(q.device) == q.last for q in phones if q.user == p.user)
        return False

    for p in phones:
        assert p.last > 0
    await until(done, timeout=20)


def redis_cli(*args: str) -> str:
    return subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", "6379", *args],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout


def start_redis() -> None:
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ],
        check=False,
        timeout=30,
    )


def pg_cluster(action: str) -> None:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(
        [
            "pg_ctlcluster",
            "--skip-systemctl-redirect",
            version,
            "main",
            action,
            *(["-m", "fast"] if action == "stop" else []),
        ],
        check=True,
        timeout=120,
    )


def pg_ready() -> bool:
    return (
        subprocess.run(["pg_isready", "-q", "-h", "127.0.0.1", "-p", "5432"], timeout=10).returncode
        == 0
    )


async def test_redis_pubsub_connections_killed_mid_stream(
    postgres_url: str, fault_redis: str, tmp_path: Path
) -> None:
    with cluster(postgres_url, fault_redis, tmp_path) as nodes:

        async def kill_pubsub() -> None:
            assert int(redis_cli("CLIENT", "KILL", "TYPE", "pubsub").strip() or 0) >= 3

        await run_scenario(nodes, kill_pubsub)
        for node in nodes:
            text = (await node.get("/metrics", key="")).text
            value = next(
                float(line.split()[1])
                for line in text.splitlines()
                if line.startswith("courier_broker_reconnects_total ")
            )
            assert value >= 1


async def test_redis_restarted_mid_stream(
    postgres_url: str, fault_redis: str, tmp_path: Path
) -> None:
    with cluster(postgres_url, fault_redis, tmp_path) as nodes:

        async def restart() -> None:
            redis_cli("SHUTDOWN", "NOSAVE")
            try:
                # While Redis is down, HTTP publishing still records durably.
                (user,) = users(1)
                r = await nodes[0].post({"user": user, "kind": "k", "id": f"{user}-down"})
                assert r.status_code == 201, r.text
            finally:
                start_redis()
            await until(lambda: redis_cli("PING").strip() == "PONG", timeout=20)

        try:
            await run_scenario(nodes, restart)
        finally:
            if redis_cli("PING").strip() != "PONG":
                start_redis()


async def test_postgres_restarted_during_stream_ingest(
    postgres_url: str, fault_redis: str, tmp_path: Path
) -> None:
    with cluster(postgres_url, fault_redis, tmp_path) as nodes:
        people = users(2)
        phones = [Roamer(u, "d", nodes, start=i) for i, u in enumerate(people)]
        runs = [asyncio.create_task(p.run(PER_USER, timeout=120)) for p in phones]
        await asyncio.wait_for(asyncio.gather(*(p.connected.wait() for p in phones)), 20)
        half = PER_USER // 2
        await xadd(
            fault_redis,
            [{"user": u, "kind": "k", "id": f"{u}-{k}"} for k in range(half) for u in people],
        )
        await until(lambda: all(len(p.processed) == half for p in phones), timeout=30)
        pg_cluster("stop")
        try:
            # Entries added while the ledger is down stay pending in the stream.
            await xadd(
                fault_redis,
                [
                    {"user": u, "kind": "k", "id": f"{u}-{k}"}
                    for k in range(half, PER_USER)
                    for u in people
                ],
            )
            r = await nodes[1].post({"user": people[0], "kind": "k", "id": uuid.uuid4().hex})
            assert r.status_code == 503
            assert all(len(p.processed) == half for p in phones)
            assert all(p.reconnects == 0 for p in phones)  # phones keep their connections
        finally:
            pg_cluster("start")
            await until(pg_ready, timeout=60)
        await asyncio.gather(*runs)
        for p in phones:
            assert p.ids == [f"{p.user}-{k}" for k in range(PER_USER)]
        await all_acked(nodes, phones)


async def test_node_killed_with_sigkill(
    postgres_url: str, fault_redis: str, tmp_path: Path
) -> None:
    with cluster(postgres_url, fault_redis, tmp_path) as nodes:

        async def kill() -> None:
            nodes[0].signal(signal.SIGKILL)
            nodes[0].wait(10)

        phones = await run_scenario(nodes, kill, devices_per_user=2)
        assert any(1006 in p.closes for p in phones)  # some phones were on the killed node


async def test_node_sigterm_drains_in_batches(
    postgres_url: str, fault_redis: str, tmp_path: Path
) -> None:
    with cluster(
        postgres_url, fault_redis, tmp_path, COURIER_DRAIN_BATCH="1", COURIER_DRAIN_SECONDS="1"
    ) as nodes:

        async def term() -> None:
            nodes[0].signal(signal.SIGTERM)

        phones = await run_scenario(nodes, term, devices_per_user=3)
        assert nodes[0].wait(20) in (0, -15)
        assert any(1012 in p.closes for p in phones)
        assert "batches" in nodes[0].log()
