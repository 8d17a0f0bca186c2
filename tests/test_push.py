"""The push fallback against a fake FCM (and its OAuth token endpoint) on a real port:
real server processes on PostgreSQL, real devices, and the webhook's signature."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from channels.push import PushMessage, WebhookSender, verify_webhook
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


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    """A webhook receiver on a real port, recording what it gets."""
    import threading

    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from tests.harness import free_port

    got: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: Request) -> Response:
        got.append((dict(request.headers), await request.body()))
        return Response(status_code=204)

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            Starlette(routes=[Route("/hook", hook, methods=["POST"])]),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="off",
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    await until(lambda: _started(server))
    yield f"http://127.0.0.1:{port}/hook", got
    server.should_exit = True
    thread.join(10)


async def _started(server: Any) -> bool:
    return bool(server.started)


async def test_the_webhook_is_signed_so_a_receiver_can_check_it(
    receiver: tuple[str, list[tuple[dict[str, str], bytes]]],
) -> None:
    url, got = receiver
    secret = "whsec-" + unique()
    sender = WebhookSender(url, secret)
    message = PushMessage(
        user="u1", device="p", provider="apns", token="apns-token", event_id="grab-1", seq=42,
        kind="block.grabbed", data='{"block_id":"B9"}', created_at=1_763_800_000_123,
        expires_at=None, collapse=None, notification={"title": "t"}, high_priority=True,
    )  # fmt: skip
    now_ms = int(time.time() * 1000)
    outcome = await sender.send(message, now_ms)
    await sender.aclose()
    assert outcome.status == "sent"
    [(headers, body)] = got
    # A receiver written from docs/push.md alone: HMAC-SHA256 over "<timestamp>.<body>".
    timestamp = headers["courier-timestamp"]
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    assert headers["courier-signature"] == f"v1={expected.hexdigest()}"
    assert abs(int(timestamp) - now_ms / 1000) <= 1
    payload = json.loads(body)
    assert payload["event"] == {
        "id": "grab-1",
        "seq": 42,
        "kind": "block.grabbed",
        "data": {"block_id": "B9"},
        "created_at": "2025-11-22T08:26:40.123Z",
        "expires_at": None,
        "collapse": None,
    }
    assert (payload["type"], payload["token"], payload["carried"]) == (
        "courier.push",
        "apns-token",
        1,
    )
    signature, now = headers["courier-signature"], time.time()
    assert verify_webhook(secret, timestamp, signature, body, now)
    assert not verify_webhook(secret, timestamp, signature, body + b" ", now)  # altered
    assert not verify_webhook(secret, timestamp, signature, body, now + 301)  # replayed late
    assert not verify_webhook("other", timestamp, signature, body, now)


def test_a_quiet_provider_is_retried_without_raising() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=request)

    async def go() -> str:
        sender = WebhookSender(
            "http://hook.test/",
            "s",
            client=httpx.AsyncClient(transport=httpx.MockTransport(refuse)),
        )
        message = PushMessage("u", "d", "x", "t", "e", 1, "k", "{}", 0, None, None, None, False)
        outcome = await sender.send(message, 0)
        await sender.aclose()
        return f"{outcome.status}:{outcome.reason}"

    assert asyncio.run(go()) == "retry:connect_error"


async def test_fcm_sender_shapes_messages_and_reads_every_answer(fake: FakeGoogle) -> None:
    """The sender alone against the fake: payload rules, token reuse, answer mapping."""
    from channels.push import FcmSender, retry_delay
    from channels.push.fcm import MAX_DATA_BYTES

    sender = FcmSender(fake.service_account(), endpoint=fake.url)
    now = int(time.time() * 1000)

    def message(token: str, data: str = "{}", **kw: Any) -> PushMessage:
        fields: dict[str, Any] = {
            "user": "u", "device": "d", "provider": "fcm", "token": token, "event_id": "e1",
            "seq": 5, "kind": "plan.changed", "data": data, "created_at": now,
            "expires_at": None, "collapse": None, "notification": None, "high_priority": False,
        }  # fmt: skip
        return PushMessage(**{**fields, **kw})

    fetched = fake.token_fetches
    big = json.dumps({"blob": "x" * MAX_DATA_BYTES})
    outcomes = [
        await sender.send(message(f"ok-{unique()}", collapse="plan", expires_at=now + 42_500), now),
        await sender.send(message(f"ok-{unique()}", data=big), now),
        await sender.send(message(f"bad-{unique()}"), now),
        await sender.send(message(f"gone-{unique()}"), now),
        await sender.send(message(f"down-{unique()}"), now),
        await sender.send(message(f"ok-{unique()}", expires_at=now - 1), now),
        await sender.send(message(f"ok-{unique()}", provider="apns"), now),
    ]
    await sender.aclose()
    assert [(o.status, o.reason) for o in outcomes] == [
        ("sent", "ok"),
        ("sent", "ok"),
        ("unregistered", "INVALID_ARGUMENT"),
        ("unregistered", "UNREGISTERED"),
        ("retry", "INTERNAL"),
        ("failed", "expired"),
        ("failed", "unsupported_provider"),
    ]
    assert fake.token_fetches == fetched + 1  # one access token for every send
    keyed, large = (r.message for r in fake.received[-5:-3])
    assert keyed["android"] == {"priority": "NORMAL", "collapse_key": "plan", "ttl": "42s"}
    assert keyed["data"]["collapse"] == "plan" and "notification" not in keyed
    assert "data" not in large["data"] and large["data"]["id"] == "e1"  # over 4 KB: fetch it
    assert len(json.dumps(large["data"]).encode()) <= MAX_DATA_BYTES
    assert retry_delay(1, 30.0) == 30.0 and 0 <= retry_delay(3) <= 8
