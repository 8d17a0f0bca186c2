"""Three server processes on one Redis and one PostgreSQL behave as one server."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Roamer, start_cluster, users, xadd
from tests.conftest import assert_graceful_stop, fresh_redis_db
from tests.harness import OPS_TOKEN, Device, ServerProcess, until

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture(scope="module")
def cluster_redis(redis_url: str) -> str:
    """A Redis database of the cluster tests' own, emptied first."""
    return fresh_redis_db(redis_url, 3)


@pytest.fixture(scope="module")
def nodes(
    postgres_url: str, cluster_redis: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    cluster = start_cluster(postgres_url, cluster_redis, tmp_path_factory.mktemp("cluster"))
    yield cluster
    for node in cluster:
        assert_graceful_stop(node)


async def test_every_device_gets_its_users_events_in_order(
    nodes: list[ServerProcess], cluster_redis: str
) -> None:
    people = users(4)
    phones = [
        Roamer(u, f"d{j}", nodes, start=i + j) for i, u in enumerate(people) for j in range(2)
    ]
    per_user = 12
    runs = [asyncio.create_task(p.run(per_user, timeout=60)) for p in phones]
    await asyncio.wait_for(asyncio.gather(*(p.connected.wait() for p in phones)), 15)
    expected: dict[str, set[str]] = {u: set() for u in people}
    for k in range(per_user // 4):
        for i, node in enumerate(nodes):  # through each node's HTTP API
            for u in people:
                result = await node.publish(u, data={"k": k, "via": i})
                expected[u].add(result["id"])
        stream = [{"user": u, "kind": "block.released", "id": f"s-{u}-{k}"} for u in people]
        await xadd(cluster_redis, stream)  # and through the stream
        for u in people:
            expected[u].add(f"s-{u}-{k}")
    await asyncio.gather(*runs)
    for p in phones:
        assert set(p.ids) == expected[p.user], p.device
        assert p.processed == sorted(p.processed) and len(set(p.processed)) == per_user
    for u in people:
        a, b = (p for p in phones if p.user == u)
        assert a.processed == b.processed


async def test_second_connection_elsewhere_replaces_the_first(nodes: list[ServerProcess]) -> None:
    (user,) = users(1)
    first = await Device.connect(nodes[0], user, "p")
    second = await Device.connect(nodes[2], user, "p")
    assert await first.closed_with() == 4009
    result = await nodes[1].publish(user)
    assert (await second.event())["seq"] == result["seq"]
    await second.close()


async def test_presence_and_stats_are_cluster_wide(nodes: list[ServerProcess]) -> None:
    (user,) = users(1)
    phones = [await Device.connect(node, user, f"p{i}") for i, node in enumerate(nodes)]

    async def connected_seen_from_node0() -> bool:
        body = (await nodes[0].get(f"/v1/users/{user}/devices")).json()
        return {d["device"] for d in body["devices"] if d["connected"]} == {"p0", "p1", "p2"}

    await until(connected_seen_from_node0, timeout=10)

    async def three_nodes() -> bool:
        stats = (await nodes[1].get("/v1/stats", key=OPS_TOKEN)).json()
        return len(stats["nodes"]) == 3 and stats["cluster_connections"] >= 3

    await until(three_nodes, timeout=10)
    await phones[2].close()

    async def p2_gone() -> bool:
        body = (await nodes[0].get(f"/v1/users/{user}/devices")).json()
        return {d["device"]: d["connected"] for d in body["devices"]}["p2"] is False

    await until(p2_gone, timeout=10)
    for p in phones[:2]:
        await p.close()


async def test_workers_share_one_port_as_nodes(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    # A Redis db of its own: the module's three-node cluster must not show in its stats.
    server = ServerProcess(
        postgres_url,
        tmp_path,
        redis_url=fresh_redis_db(redis_url, 5),
        workers=2,
        env={"COURIER_PRESENCE_SECONDS": "0.5", "COURIER_LOG_FORMAT": "json"},
    ).start()
    phones: list[Device] = []
    try:
        (user,) = users(1)

        async def nodes_with(connections: int) -> bool:
            stats = (await server.get("/v1/stats", key=OPS_TOKEN)).json()
            return len(stats["nodes"]) == 2 and stats["cluster_connections"] == connections

        await until(lambda: nodes_with(0), timeout=20)  # both workers are up (and accepting)
        phones = [await Device.connect(server, user, f"p{i}") for i in range(40)]
        assert len({p.hello["node"] for p in phones}) == 2  # the kernel gave both some phones
        await until(lambda: nodes_with(40), timeout=10)
        results = [await server.publish(user) for _ in range(3)]  # through either worker
        for p in phones:
            assert [e["seq"] for e in await p.events(3)] == [r["seq"] for r in results]
        server.signal(signal.SIGTERM)
        assert await asyncio.gather(*(p.closed_with() for p in phones)) == [1012] * 40
        assert server.wait(30) == 0
        # Every line is one JSON object, and each worker's own lines are there, drain too.
        lines = [json.loads(line) for line in server.log().splitlines() if line.strip()]
        ours = [r for r in lines if r["logger"].startswith("courier")]
        ready = {r["process"] for r in ours if " ready (ledger " in r["message"]}
        draining = {r["process"] for r in ours if r["message"].startswith("draining ")}
        assert len(ready) == 2 and draining == ready, ours
    finally:
        for p in phones:
            await p.close()
        server.kill()
