"""The push fallback against a fake FCM (and its OAuth token endpoint) on a real port:
real server processes on PostgreSQL and real devices. The senders alone (message shapes,
answers, the webhook's signature) are in test_push_senders.py."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import fresh_postgres
from tests.fake_fcm import PROJECT, FakeGoogle
from tests.harness import API_KEY, Device, ServerProcess, unique, until

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

PUSH_AFTER = 1


def push_env(fake: FakeGoogle) -> dict[str, str]:
    return {
        "COURIER_FCM_CREDENTIALS": fake.service_account(),
        "COURIER_FCM_ENDPOINT": fake.url,
        "COURIER_PUSH_AFTER_SECONDS": str(PUSH_AFTER),
        "COURIER_PUSH_CLAIM_SECONDS": "2",
        "COURIER_PUSH_HIGH_PRIORITY_KINDS": "block.grabbed",
    }


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeGoogle]:
    google = FakeGoogle().start()
    yield google
    google.stop()
    assert google.problems == []


@pytest.fixture(scope="module")
def push_db() -> Iterator[str]:
    with fresh_postgres("courier_push") as (url, _name):
        yield url


@pytest.fixture(scope="module")
def node(
    push_db: str, fake: FakeGoogle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    server = ServerProcess(push_db, tmp_path_factory.mktemp("push"), env=push_env(fake)).start()
    yield server
    server.stop()


async def register(server: ServerProcess, user: str, device: str, token: str) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        answer = await http.put(
            f"/v1/users/{user}/devices/{device}/push",
            json={"provider": "fcm", "token": token},
            headers={"Authorization": f"Bearer {API_KEY}"},
        )
    assert answer.status_code == 200, answer.text


async def away(server: ServerProcess, user: str, device: str, token: str) -> None:
    """A device that connected once, set its push address, and went away without acking."""
    phone = await Device.connect(server, user, device)
    await phone.send({"type": "push", "provider": "fcm", "token": token})
    assert await phone.frame() == {"type": "push_ok"}
    await phone.close()


async def deliveries(server: ServerProcess, event_id: str) -> dict[str, dict[str, Any]]:
    body = (await server.get(f"/v1/events/{event_id}")).json()
    return {d["device"]: d for d in body["deliveries"]}


async def arrived(fake: FakeGoogle, token: str, n: int = 1, timeout: float = 10) -> list[Any]:
    async def enough() -> bool:
        return len(fake.arrivals(token)) >= n

    await until(enough, timeout=timeout, interval=0.02)
    return fake.arrivals(token)


async def test_a_device_that_did_not_ack_gets_one_push_in_time(
    node: ServerProcess, fake: FakeGoogle
) -> None:
    user = unique()
    away, acking = f"ok-{unique()}", f"ok-{unique()}"
    phone = await Device.connect(node, user, "away")
    await phone.send({"type": "push", "provider": "fcm", "token": away})
    assert await phone.frame() == {"type": "push_ok"}
    other = await Device.connect(node, user, "acking")
    await register(node, user, "acking", acking)
    note = {"title": "Block grabbed", "body": "10:00-12:00"}
    published = time.time()
    event = await node.publish(user, data={"block_id": "B9"}, notification=note)
    assert (await phone.event())["seq"] == event["seq"]  # received, never acked
    await phone.close()  # the app was suspended
    await other.ack((await other.event())["seq"])
    [push] = await arrived(fake, away)
    assert push.at - published <= PUSH_AFTER + 1.0  # the closing note's figure
    message = push.message
    assert message["data"] == {
        "id": event["id"],
        "seq": str(event["seq"]),
        "kind": "block.grabbed",
        "data": '{"block_id":"B9"}',
        "carried": "1",
    }
    assert message["android"] == {"priority": "HIGH"} and message["notification"] == note

    async def pushed() -> bool:
        return (await deliveries(node, event["id"]))["away"]["status"] == "pushed"

    await until(pushed)
    states = await deliveries(node, event["id"])
    assert states["away"]["push"]["state"] == "sent"
    assert states["away"]["push"]["reason"].startswith(f"projects/{PROJECT}/messages/")
    # Decided in the same scan as the other device's: the acking device got none.
    assert states["acking"]["status"] == "acked" and states["acking"]["push"] is None
    assert fake.arrivals(acking) == []
    await other.close()


async def test_expired_superseded_and_unwanted_events_are_not_pushed(
    node: ServerProcess, fake: FakeGoogle
) -> None:
    user = unique()
    token = f"ok-{unique()}"
    await away(node, user, "p", token)
    expiring = await node.publish(user, kind="shift.offer", ttl=1, push_after=2)
    older = await node.publish(user, kind="plan.changed", collapse="plan", data={"plan": "a"})
    silent = await node.publish(user, kind="chat", push=False)
    due = await node.publish_many(
        [
            {"user": user, "kind": "plan.changed", "collapse": "plan", "data": {"plan": "b"}},
            {"user": user, "kind": "block.released", "data": {"block_id": "B1"}},
        ]
    )
    # The two due together go as one push, carrying the newest.
    [push] = await arrived(fake, token)
    assert push.message["data"]["seq"] == str(due[1]["seq"])
    assert push.message["data"]["carried"] == "2"

    async def settled() -> bool:
        states = await deliveries(node, due[0]["id"])
        return states["p"]["push"] is not None and states["p"]["push"]["state"] == "sent"

    await until(settled)
    assert (await deliveries(node, due[0]["id"]))["p"]["push"]["carried_by"] == due[1]["seq"]
    for skipped in (older, silent):
        assert (await deliveries(node, skipped["id"]))["p"]["push"] is None
    await until(lambda: _expired_unpushed(node, expiring["id"]), timeout=10)
    assert len(fake.arrivals(token)) == 1


async def _expired_unpushed(node: ServerProcess, event_id: str) -> bool:
    state = (await deliveries(node, event_id))["p"]
    return bool(state["status"] == "expired" and state["push"] is None)


async def test_an_unregistered_token_is_removed(node: ServerProcess, fake: FakeGoogle) -> None:
    user = unique()
    token = f"gone-{unique()}"
    await away(node, user, "p", token)
    event = await node.publish(user)
    await arrived(fake, token)

    async def removed() -> bool:
        body = (await node.get(f"/v1/users/{user}/devices")).json()
        return [d["push"] for d in body["devices"]] == [None]

    async def failed() -> bool:
        push = (await deliveries(node, event["id"]))["p"]["push"]
        return push is not None and push["state"] == "failed"

    await until(failed)
    await until(removed)
    metrics = (await node.get("/metrics", key="")).text
    assert "courier_push_registrations_removed_total 1.0" in metrics
    assert 'courier_push_failures_total{reason="UNREGISTERED"}' in metrics


async def test_retry_after_is_honoured(node: ServerProcess, fake: FakeGoogle) -> None:
    user = unique()
    token = f"busy-{unique()}"
    await away(node, user, "p", token)
    event = await node.publish(user)
    first, second = await arrived(fake, token, n=2, timeout=20)
    assert first.answered == 429 and second.at - first.at >= 2.0  # Retry-After: 2

    async def sent() -> bool:
        push = (await deliveries(node, event["id"]))["p"]["push"]
        return push is not None and push["state"] == "sent"

    await until(sent)
    assert (await deliveries(node, event["id"]))["p"]["push"]["attempts"] == 2


async def test_a_slow_provider_delays_neither_sockets_nor_other_pushes(
    node: ServerProcess, fake: FakeGoogle
) -> None:
    slow_user, quick_user, live_user = unique(), unique(), unique()
    slow, quick = f"slow-{unique()}", f"ok-{unique()}"
    await away(node, slow_user, "p", slow)
    await away(node, quick_user, "p", quick)
    await node.publish(slow_user)
    await node.publish(quick_user)
    [slow_push] = await arrived(fake, slow)
    live = await Device.connect(node, live_user, "p")
    sent = await node.publish(live_user)
    assert (await live.event())["seq"] == sent["seq"]
    [quick_push] = await arrived(fake, quick)
    assert quick_push.answered == 200
    assert slow_push.answered is None  # still waiting on the slow provider all along
    await live.close()


@pytest.fixture
def own_db() -> Iterator[str]:
    """A ledger of its own: no other node may take this test's pushes."""
    with fresh_postgres("courier_push_nodes") as (url, _name):
        yield url


async def test_one_push_per_event_and_device_when_a_node_dies_before_sending(
    own_db: str, tmp_path: Path
) -> None:
    """Node A decides and claims the push, then is killed while its request hangs; of the
    two nodes left, exactly one sends it, once, after A's claim runs out."""
    push_db = own_db
    hanging, google = FakeGoogle(hang_all=True).start(), FakeGoogle().start()
    nodes: list[ServerProcess] = []
    try:
        a = ServerProcess(push_db, tmp_path, env=push_env(hanging)).start()
        nodes.append(a)
        user, token = unique(), f"ok-{unique()}"
        await away(a, user, "p", token)
        event = await a.publish(user)
        await arrived(hanging, token)  # decided and claimed by A, never answered
        a.kill()
        for _ in range(2):
            nodes.append(ServerProcess(push_db, tmp_path, env=push_env(google)).start())
        [push] = await arrived(google, token, timeout=20)
        assert push.message["data"]["seq"] == str(event["seq"])

        async def sent() -> bool:
            state = (await deliveries(nodes[1], event["id"]))["p"]["push"]
            return state is not None and state["state"] == "sent"

        await until(sent)
        await asyncio.sleep(1.5)  # the subject: several more rounds of both nodes
        assert len(google.arrivals(token)) == 1
        assert (await deliveries(nodes[1], event["id"]))["p"]["push"]["attempts"] == 2
    finally:
        for server in nodes:
            server.kill()
        hanging.stop()
        google.stop()
