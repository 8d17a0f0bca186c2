"""One connection per device under a connect burst spread over three nodes.

Every device connects twice at the same moment, on two different nodes. Each node
announces its new connection on the bus; the older of the two must be closed with
4009 everywhere, and the newer must stay and keep receiving. A lost announcement
(e.g. a command client out of pooled connections) would leave both open.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.cluster import start_cluster
from tests.conftest import assert_graceful_stop, fresh_redis_db
from tests.harness import Device, ServerProcess, unique

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

USERS = 100
DEVICES = 10  # per user: 1,000 devices, 2,000 connects


@pytest.fixture(scope="module")
def nodes(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    cluster = start_cluster(
        postgres_url,
        fresh_redis_db(redis_url, 8),
        tmp_path_factory.mktemp("burst"),
    )
    yield cluster
    for node in cluster:
        assert_graceful_stop(node)


async def _connect(node: ServerProcess, user: str, device: str) -> Device:
    for attempt in range(5):
        try:
            return await Device.connect(node, user, device)
        except (InvalidStatus, ConnectionClosed, OSError, TimeoutError):
            if attempt == 4:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))  # a refused connect backs off, as phones do
    raise AssertionError("unreachable")


async def _closed_code(phone: Device) -> int:
    """The close code, or 0 if the connection is still open after 60 s."""
    try:
        return await phone.closed_with(timeout=60)
    except TimeoutError:
        return 0


async def test_connect_burst_over_three_nodes_keeps_one_connection_per_device(
    nodes: list[ServerProcess],
) -> None:
    people = [unique("bu") for _ in range(USERS)]
    pairs = [
        (u, f"d{j}", nodes[(i + j) % 3], nodes[(i + j + 1) % 3])
        for i, u in enumerate(people)
        for j in range(DEVICES)
    ]
    first = [_connect(a, u, d) for u, d, a, _ in pairs]
    second = [_connect(b, u, d) for u, d, _, b in pairs]
    phones = await asyncio.wait_for(asyncio.gather(*first, *second), 120)
    both = list(zip(phones[: len(pairs)], phones[len(pairs) :], strict=True))
    try:
        # Each device: exactly one of its two connections is closed, with 4009.
        closes = {id(p): asyncio.create_task(_closed_code(p)) for pair in both for p in pair}
        survivors: list[Device] = []
        for a, b in both:
            done, _ = await asyncio.wait(
                {closes[id(a)], closes[id(b)]}, return_when=asyncio.FIRST_COMPLETED
            )
            codes = sorted(t.result() for t in done)
            assert codes != [0, 0], "neither connection of a device was replaced"
            assert codes == [4009], f"both connections of a device ended: {codes}"
            task = done.pop()
            survivor = b if task is closes[id(a)] else a
            closes[id(survivor)].cancel()  # stop watching it: it is read below
            survivors.append(survivor)
        # The survivors stay open and receive: one event per user through a node's API.
        for i, u in enumerate(people):
            await nodes[i % 3].publish(u, data={"n": i})
        for phone in survivors:
            event = await phone.event(timeout=30)
            assert event["kind"] == "block.grabbed"
        for node in nodes:
            log = node.log()
            assert "MaxConnectionsError" not in log and "Traceback" not in log, log[-3000:]
    finally:
        for pair in both:
            for p in pair:
                await p.close()
