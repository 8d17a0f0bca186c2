"""The Python publishers: against the real server, and their retries."""

from __future__ import annotations

import json

import httpx
import pytest

from channels.publisher import AsyncPublisher, Publisher, PublishError, event
from tests.harness import API_KEY, Device, ServerProcess, unique

pytestmark = pytest.mark.e2e


async def test_async_publisher_against_the_server(server: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(server, user, "p")
    async with AsyncPublisher(server.url, API_KEY) as courier:
        first = await courier.publish(user, "block.grabbed", {"block_id": "B9"}, id=f"g-{user}")
        again = await courier.publish(user, "block.grabbed", {"block_id": "B9"}, id=f"g-{user}")
        many = await courier.publish_many(
            [event(user, "block.released"), {"user": user, "kind": "k"}]
        )
        with pytest.raises(PublishError) as info:
            await courier.publish("bad user", "k")
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    assert [r.duplicate for r in many] == [False, False]
    assert info.value.status == 422
    events = await phone.events(3)
    assert [e["seq"] for e in events] == [first.seq, many[0].seq, many[1].seq]
    await phone.close()


def test_sync_publisher_against_the_server(server: ServerProcess) -> None:
    user = unique()
    with Publisher(server.url, API_KEY) as courier:
        result = courier.publish(user, "plan.changed", {"plan": "pro"}, ttl=60, collapse="plan")
        assert result.seq == 1 and not result.duplicate
    with Publisher(server.url, "wrong-key", retries=0) as bad, pytest.raises(PublishError) as info:
        bad.publish(user, "k")
    assert info.value.status == 401


def test_retries_keep_the_id_so_they_cannot_duplicate() -> None:
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body["id"])
        if len(seen) == 1:
            raise httpx.ConnectError("connection refused", request=request)
        if len(seen) == 2:
            return httpx.Response(
                503, json={"error": {"code": "ledger_unavailable", "message": "down"}}
            )
        return httpx.Response(201, json={"id": body["id"], "seq": 7, "duplicate": False})

    with Publisher("http://courier.test", "k", transport=httpx.MockTransport(answer)) as c:
        result = c.publish("u1", "block.grabbed")
    assert len(seen) == 3 and len(set(seen)) == 1  # the same idempotency key every time
    assert result.id == seen[0] and result.seq == 7


def test_refusals_are_not_retried() -> None:
    calls = 0

    def answer(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(
            422, json={"error": {"code": "invalid", "message": "kind: bad", "field": "kind"}}
        )

    with (
        Publisher("http://courier.test", "k", transport=httpx.MockTransport(answer)) as c,
        pytest.raises(PublishError, match="kind: bad"),
    ):
        c.publish("u1", "Bad Kind")
    assert calls == 1
