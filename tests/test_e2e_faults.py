"""End to end with a server of its own: slow phones, shutdown, an unreachable ledger."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import PG_ADMIN_DSN, _pg_admin, assert_graceful_stop, fresh_postgres
from tests.harness import Device, ServerProcess, unique, until

pytestmark = pytest.mark.e2e


@contextmanager
def running(url: str, workdir: Path, **env: str) -> Iterator[ServerProcess]:
    server = ServerProcess(url, workdir, env=env).start()
    try:
        yield server
    finally:
        server.kill()


async def metric(server: ServerProcess, name: str) -> float:
    text = (await server.get("/metrics", key="")).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_slow_phone_gets_4008_while_a_fast_one_keeps_receiving(
    postgres_url: str, tmp_path: Path
) -> None:
    user = unique()
    payload = {"blob": "x" * 15_000}  # big frames fill the socket buffers quickly
    with running(postgres_url, tmp_path, COURIER_SEND_QUEUE="64") as server:
        fast = await Device.connect(server, user, "fast")
        # max_queue=1: the client library stops reading the socket once one frame waits.
        slow = await Device.connect(server, user, "slow", max_queue=1)
        published: list[int] = []
        for _ in range(80):  # bounded: the slow phone must overflow long before this
            batch = await server.publish_many(
                [{"user": user, "kind": "k", "data": payload} for _ in range(25)]
            )
            published += [r["seq"] for r in batch]
            got = [e["seq"] for e in await fast.events(25)]
            assert got == published[-25:]
            await fast.ack(got[-1])
            if await metric(server, "courier_slow_consumer_closes_total") >= 1:
                break
        else:
            pytest.fail("the slow phone was never closed")
        assert await slow.closed_with() == 4008
        assert await metric(server, "courier_slow_consumer_closes_total") == 1
        # The fast phone is unaffected, and the slow one resumes from the ledger.
        more = await server.publish(user)
        assert (await fast.event())["seq"] == more["seq"]
        again = await Device.connect(server, user, "slow")
        seqs = [e["seq"] for e in await again.events(len(published) + 1, timeout=60)]
        assert seqs == [*published, more["seq"]]
        await fast.close()
        await again.close()


async def test_sigterm_drains_with_1012_and_keeps_acks(postgres_url: str, tmp_path: Path) -> None:
    user = unique()
    server = ServerProcess(
        postgres_url, tmp_path, env={"COURIER_DRAIN_BATCH": "2", "COURIER_DRAIN_SECONDS": "2"}
    ).start()
    try:
        phones = [await Device.connect(server, user, f"p{i}") for i in range(5)]
        result = await server.publish(user)
        for p in phones:
            assert (await p.event())["seq"] == result["seq"]
            await p.ack(result["seq"])
        server.signal(signal.SIGTERM)
        codes = await asyncio.gather(*(p.closed_with() for p in phones))
        assert codes == [1012] * 5
        assert_graceful_stop(server)
        assert "draining 5 connections in 3 batches" in server.log()
    finally:
        server.kill()
    # The acks sent just before the signal were flushed on the way out.
    with running(postgres_url, tmp_path) as again:
        for i in range(5):
            phone = await Device.connect(again, user, f"p{i}")
            assert phone.hello["after"] == result["seq"]
            await phone.close()


@pytest.fixture
def own_database() -> Iterator[tuple[str, str]]:
    """A PostgreSQL database of this test's own, so it can be cut off without hurting others."""
    with fresh_postgres("courier_fault") as db:
        yield db


async def _cut(name: str) -> None:
    await _pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
    await _pg_admin(
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"
    )


async def test_unreachable_ledger_answers_503_and_keeps_phones(
    own_database: tuple[str, str], tmp_path: Path
) -> None:
    url, name = own_database
    user = unique()
    with running(url, tmp_path, COURIER_RECONCILE_SECONDS="0.3") as server:
        phone = await Device.connect(server, user, "p")
        first = await server.publish(user)
        assert (await phone.event())["seq"] == first["seq"]
        await _cut(name)
        try:
            response = await server.post({"user": user, "kind": "k", "id": "during-outage"})
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "ledger_unavailable"
            ready = await server.get("/readyz", key="")
            assert ready.status_code == 503 and "ledger" in ready.json()["problems"]
            # A new phone cannot be registered now: told to try again later, not a 500.
            with pytest.raises(ConnectionClosed) as info:
                await Device.connect(server, user, "late")
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013
            # The connected phone keeps its connection.
            await phone.send({"type": "ping"})
            assert (await phone.frame())["type"] == "pong"
        finally:
            await _pg_admin(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await until(lambda: _ready(server), timeout=20)
        retry = await server.post({"user": user, "kind": "k", "id": "during-outage"})
        assert retry.status_code == 201  # nothing was half-written by the failed attempt
        assert (await phone.event())["id"] == "during-outage"
        await phone.close()
    assert "Traceback" not in server.log(), server.log()


async def test_the_first_publish_after_the_ledgers_connections_were_cut_is_recorded(
    own_database: tuple[str, str], tmp_path: Path
) -> None:
    # The pool learns without a round trip that a connection was closed under it (an
    # administrator's kill, a restart): the next publish takes a fresh one, no 503.
    url, name = own_database
    user = unique()
    with running(url, tmp_path) as server:
        phone = await Device.connect(server, user, "p")
        await asyncio.gather(*(server.publish(user) for _ in range(8)))  # pooled connections
        admin = await asyncpg.connect(PG_ADMIN_DSN, timeout=5)
        try:
            cut = await admin.fetch(
                "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1",
                name,
            )
            assert cut, "the server held no ledger connection"
            pids = [row["pid"] for row in cut]

            async def gone() -> bool:
                alive = await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", pids
                )
                return alive == 0

            await until(gone, timeout=10)
        finally:
            await admin.close()
        response = await server.post({"user": user, "kind": "k", "id": "after-the-cut"})
        assert response.status_code == 201, response.text
        seqs = [(await phone.event())["seq"] for _ in range(9)]
        assert seqs == list(range(1, 10))
        await phone.close()
    assert "Traceback" not in server.log(), server.log()


async def _ready(server: ServerProcess) -> bool:
    return (await server.get("/readyz", key="")).status_code == 200
