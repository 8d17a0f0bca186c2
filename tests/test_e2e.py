"""End to end: a real server process, real WebSocket devices, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable

import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.harness import (
    API_KEY,
    JWT_SECRET,
    OPS_TOKEN,
    Device,
    ServerProcess,
    token,
    unique,
    until,
)

pytestmark = pytest.mark.e2e


async def _equals(value: Awaitable[object], expected: object) -> bool:
    return await value == expected


async def test_publish_reaches_every_connected_device_of_the_user(server: ServerProcess) -> None:
    user, other = unique(), unique()
    phone = await Device.connect(server, user, "phone1")
    tablet = await Device.connect(server, user, "tablet", via_query=True)
    stranger = await Device.connect(server, other, "phone1")
    assert phone.hello["user"] == user and phone.hello["after"] == 0
    assert phone.hello["heartbeat"] == 25 and isinstance(phone.hello["heartbeat"], int)
    result = await server.publish(user, data={"block_id": "B9", "starts_at": "2026-11-22T10:00Z"})
    for device in (phone, tablet):
        event = await device.event()
        assert event["seq"] == result["seq"] and event["id"] == result["id"]
        assert event["kind"] == "block.grabbed"
        assert event["data"] == {"block_id": "B9", "starts_at": "2026-11-22T10:00Z"}
        assert event["created_at"].endswith("Z") and event["expires_at"] is None
    # The other user's device gets nothing: its next frame is its own event.
    mine = await server.publish(other, kind="plan.changed")
    assert (await stranger.event())["id"] == mine["id"]
    for d in (phone, tablet, stranger):
        await d.close()


async def test_acked_events_are_not_sent_again_after_reconnect(server: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(server, user, "p")
    first = [await server.publish(user) for _ in range(3)]
    events = await phone.events(3)
    assert [e["seq"] for e in events] == [r["seq"] for r in first]
    await phone.ack(events[1]["seq"])  # processed the first two only
    await phone.send({"type": "ping"})
    assert (await phone.frame())["type"] == "pong"  # the ack was read before the ping
    await phone.close()
    again = await Device.connect(server, user, "p")
    assert again.hello["after"] == events[1]["seq"]
    assert (await again.event())["seq"] == events[2]["seq"]
    marker = await server.publish(user, kind="marker")
    assert (await again.event())["id"] == marker["id"]
    await again.close()


async def test_events_published_while_offline_arrive_in_order(server: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(server, user, "p")
    await phone.close()
    published = await server.publish_many(
        [{"user": user, "kind": "block.released", "data": {"n": i}} for i in range(25)]
    )
    phone = await Device.connect(server, user, "p")
    events = await phone.events(25)
    assert [e["seq"] for e in events] == [r["seq"] for r in published]
    assert [e["data"]["n"] for e in events] == list(range(25))
    live = await server.publish(user)
    assert (await phone.event())["seq"] == live["seq"]
    await phone.close()


async def test_resume_with_after(server: ServerProcess) -> None:
    user = unique()
    published = await server.publish_many([{"user": user, "kind": "k"} for _ in range(5)])
    seqs = [r["seq"] for r in published]
    phone = await Device.connect(server, user, "p", after=seqs[2])
    assert phone.hello["after"] == seqs[2]
    assert [e["seq"] for e in await phone.events(2)] == seqs[3:]
    await phone.ack(seqs[4])
    await phone.close()
    # after= below the acked cursor replays (the app lost its local state).
    replay = await Device.connect(server, user, "p", after=0)
    assert [e["seq"] for e in await replay.events(5)] == seqs
    await replay.close()


async def test_duplicate_publish_records_once(server: ServerProcess) -> None:
    user, key = unique(), unique("grab")
    phone = await Device.connect(server, user, "p")
    first = await server.post({"user": user, "kind": "block.grabbed", "id": key})
    second = await server.post({"user": user, "kind": "block.grabbed", "id": key})
    assert first.status_code == 201 and second.status_code == 200
    assert first.json() == {"id": key, "seq": first.json()["seq"], "duplicate": False}
    assert second.json() == {"id": key, "seq": first.json()["seq"], "duplicate": True}
    batch = await server.post(
        [{"user": user, "kind": "block.grabbed", "id": key}, {"user": user, "kind": "k"}]
    )
    assert batch.status_code == 201
    assert [r["duplicate"] for r in batch.json()] == [True, False]
    events = await phone.events(2)
    assert [e["id"] for e in events] == [key, batch.json()[1]["id"]]
    await phone.close()


async def test_a_reused_id_with_other_content_is_a_409_conflict(server: ServerProcess) -> None:
    user, key = unique(), unique("grab")
    event = {"user": user, "kind": "block.grabbed", "id": key, "data": {"a": 1, "b": [1, 2]}}
    assert (await server.post(event)).status_code == 201
    reordered = {"data": {"b": [1, 2], "a": 1}, "id": key, "kind": "block.grabbed", "user": user}
    again = await server.post(reordered)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    changed = await server.post({**event, "data": {"a": 2, "b": [1, 2]}})
    assert changed.status_code == 409
    assert changed.json()["error"]["code"] == "id_conflict"
    assert changed.json()["error"]["field"] == "id"
    fresh = unique("new")
    listed = await server.post([{"user": user, "kind": "k", "id": fresh}, {**event, "ttl": 60}])
    assert listed.status_code == 409
    assert listed.json()["error"]["field"] == "[1].id"
    state = await server.get(f"/v1/events/{fresh}")
    assert state.status_code == 404  # nothing of the refused list was recorded
    original = await server.get(f"/v1/events/{key}")
    assert original.json()["data"] == {"a": 1, "b": [1, 2]}


async def test_expired_events_are_not_delivered(server: ServerProcess) -> None:
    user = unique()
    short = await server.publish(user, ttl=1)
    kept = await server.publish(user, ttl=600)
    await asyncio.sleep(1.2)  # the subject of this test is the passage of time itself
    phone = await Device.connect(server, user, "p")
    event = await phone.event()
    assert event["id"] == kept["id"] and event["expires_at"] is not None
    state = (await server.get(f"/v1/events/{short['id']}")).json()
    assert state["deliveries"] == [{"device": "p", "status": "expired", "push": None}]
    await phone.close()


async def test_collapse_delivers_only_the_newest_to_an_offline_device(
    server: ServerProcess,
) -> None:
    user = unique()
    online = await Device.connect(server, user, "online")
    plans = [
        await server.publish(user, kind="plan.changed", data={"plan": p}, collapse="plan")
        for p in ("basic", "plus", "pro")
    ]
    # A connected device saw each change as it happened.
    assert [e["data"]["plan"] for e in await online.events(3)] == ["basic", "plus", "pro"]
    offline = await Device.connect(server, user, "offline")
    only = await offline.event()
    assert only["data"] == {"plan": "pro"}
    marker = await server.publish(user, kind="marker")
    assert (await offline.event())["id"] == marker["id"]
    state = (await server.get(f"/v1/events/{plans[0]['id']}")).json()
    assert state["superseded_by"] == plans[1]["seq"]  # the first newer event replaced it
    assert {d["status"] for d in state["deliveries"]} == {"superseded"}

    async def newest() -> dict[str, str]:
        body = (await server.get(f"/v1/events/{plans[2]['id']}")).json()
        return {d["device"]: d["status"] for d in body["deliveries"]}

    await until(lambda: _equals(newest(), {"online": "sent", "offline": "sent"}))
    # Both ack past the first plan: only the device that got it reads acked.
    await online.ack(plans[2]["seq"])
    await offline.ack(marker["seq"])

    async def first() -> dict[str, str]:
        body = (await server.get(f"/v1/events/{plans[0]['id']}")).json()
        return {d["device"]: d["status"] for d in body["deliveries"]}

    await until(lambda: _equals(first(), {"online": "acked", "offline": "superseded"}))
    await online.close()
    await offline.close()


async def test_device_targeting(server: ServerProcess) -> None:
    user = unique()
    a = await Device.connect(server, user, "a")
    b = await Device.connect(server, user, "b")
    only_b = await server.publish(user, device="b")
    both = await server.publish(user)
    assert (await a.event())["id"] == both["id"]
    assert [e["id"] for e in await b.events(2)] == [only_b["id"], both["id"]]
    state = (await server.get(f"/v1/events/{only_b['id']}")).json()
    assert [d["device"] for d in state["deliveries"]] == ["b"]
    await a.close()
    await b.close()


async def test_two_devices_ack_independently(server: ServerProcess) -> None:
    user = unique()
    a = await Device.connect(server, user, "a")
    b = await Device.connect(server, user, "b")
    published = await server.publish_many([{"user": user, "kind": "k"} for _ in range(4)])
    seqs = [r["seq"] for r in published]
    assert [e["seq"] for e in await a.events(4)] == seqs
    assert [e["seq"] for e in await b.events(4)] == seqs
    await a.ack(seqs[3])
    await b.ack(seqs[1])
    for d in (a, b):
        await d.send({"type": "ping"})
        assert (await d.frame())["type"] == "pong"
        await d.close()

    async def states() -> dict[str, str]:
        body = (await server.get(f"/v1/events/{published[2]['id']}")).json()
        return {d["device"]: d["status"] for d in body["deliveries"]}

    # The ack flush runs on a short timer: wait for its visible result.
    await until(lambda: _equals(states(), {"a": "acked", "b": "sent"}))
    a2 = await Device.connect(server, user, "a")
    b2 = await Device.connect(server, user, "b")
    assert (a2.hello["after"], b2.hello["after"]) == (seqs[3], seqs[1])
    assert [e["seq"] for e in await b2.events(2)] == seqs[2:]
    devices = (await server.get(f"/v1/users/{user}/devices")).json()["devices"]
    assert {d["device"]: (d["connected"], d["acked_seq"]) for d in devices} == {
        "a": (True, seqs[3]),
        "b": (True, seqs[1]),
    }
    await a2.close()
    await b2.close()


async def test_acks_in_any_json_form_are_taken(server: ServerProcess) -> None:
    """The transport reads the usual forms of an ack itself; any other JSON form of it
    takes the full decoder, with the same result."""
    user = unique()
    published = await server.publish_many([{"user": user, "kind": "k"} for _ in range(3)])
    forms = {
        "compact": '{"type":"ack","seq":%d}',
        "spaced": '{"type": "ack", "seq": %d}',
        "reordered": '{"seq":%d,"type":"ack"}',
        "padded": ' { "type" : "ack" , "seq" : %d } ',
        "extra": '{"type":"ack","seq":%d,"note":"ok"}',
    }
    for name, form in forms.items():
        phone = await Device.connect(server, user, name)
        assert [e["seq"] for e in await phone.events(3)] == [1, 2, 3]
        await phone.send(form % 2)
        await phone.send(form % 9)  # beyond what it was given: clamped, and told
        reply = await phone.frame()
        assert reply["type"] == "error" and reply["code"] == "bad_ack", (name, reply)
        await phone.close()

    async def acked() -> dict[str, int]:
        devices = (await server.get(f"/v1/users/{user}/devices")).json()["devices"]
        return {d["device"]: d["acked_seq"] for d in devices}

    await until(lambda: _equals(acked(), dict.fromkeys(forms, 3)))
    assert published[-1]["seq"] == 3


@pytest.mark.parametrize(
    "bad",
    ["missing", "garbage", "expired", "wrong-secret", "alg-none", "no-device", "bad-user"],
)
async def test_bad_tokens_never_get_an_open_connection(server: ServerProcess, bad: str) -> None:
    user = unique()
    now = int(time.time())
    tokens = {
        "missing": "",
        "garbage": "not.a.jwt",
        "expired": token(user, "p", ttl=-5),
        "wrong-secret": token(user, "p", secret="x" * 40),
        "alg-none": jwt.encode({"sub": user, "did": "p", "exp": now + 60}, "", algorithm="none"),
        "no-device": jwt.encode({"sub": user, "exp": now + 60}, JWT_SECRET, algorithm="HS256"),
        "bad-user": token("a b", "p"),
    }
    for via_query in (False, True):
        with pytest.raises(InvalidStatus) as info:
            await Device.connect(server, user, "p", tok=tokens[bad], via_query=via_query)
        assert info.value.response.status_code == 401
        assert json.loads(info.value.response.body)["error"]["code"] in (
            "missing_token",
            "bad_token",
            "token_expired",
        )


async def test_bad_after_is_refused(server: ServerProcess) -> None:
    from websockets.asyncio.client import connect

    with pytest.raises(InvalidStatus) as info:
        await connect(f"{server.ws_url}/v1/ws?after=-1&token={token(unique(), 'p')}")
    assert info.value.response.status_code == 400


async def test_bad_frames_get_errors_and_never_hurt_others(server: ServerProcess) -> None:
    user = unique()
    bad = await Device.connect(server, user, "bad")
    good = await Device.connect(server, user, "good")
    for frame in (
        "not json",
        "[1, 2]",
        '"text"',
        "{}",
        '{"type": "ack", "seq": "x"}',
        '{"type": "ack"}',
        '{"type": "ack", "seq": -1}',
        '{"type":"ack","seq":01}',
        '{"type":"ack","seq":1.5}',
        '{"type":"ack","seq":٣}',
        '{"type": "nope"}',
        b"\x00\x01binary",
        '{"type": "ping", "x": ' + "[" * 5000 + "]" * 5000 + "}",  # deeply nested, 10 KB
    ):
        await bad.send(frame)
        reply = await bad.frame()
        assert reply["type"] == "error" and reply["code"] == "bad_frame", (frame, reply)
    await bad.send({"type": "ping"})
    assert (await bad.frame())["type"] == "pong"  # still a working connection
    huge = await Device.connect(server, user, "huge")
    await huge.send("x" * (70 * 1024))
    assert await huge.closed_with() == 1009
    result = await server.publish(user)
    assert (await good.event())["seq"] == result["seq"]
    assert (await bad.event())["seq"] == result["seq"]
    await bad.close()
    await good.close()


async def test_rate_limited_device_is_closed_with_4029(server: ServerProcess) -> None:
    user = unique()
    flood = await Device.connect(server, user, "flood")
    for _ in range(400):  # burst allowance is 200 frames
        try:
            await flood.send({"type": "ping"})
        except ConnectionClosed:
            break
    assert await flood.closed_with() == 4029
    calm = await Device.connect(server, user, "calm")
    await calm.send({"type": "ping"})
    assert (await calm.frame())["type"] == "pong"
    await calm.close()


async def test_second_connection_of_a_device_replaces_the_first(server: ServerProcess) -> None:
    user = unique()
    first = await Device.connect(server, user, "p")
    second = await Device.connect(server, user, "p")
    assert await first.closed_with() == 4009
    result = await server.publish(user)
    assert (await second.event())["seq"] == result["seq"]
    await second.close()


async def test_token_expiring_during_the_connection_closes_4001(server: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(server, user, "p", tok=token(user, "p", ttl=1.5))
    assert await phone.closed_with(timeout=10) == 4001


async def test_a_token_refreshed_in_band_keeps_the_connection_open(server: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(server, user, "p", tok=token(user, "p", ttl=1.5))
    await phone.send({"type": "auth", "token": token(user, "p", ttl=600)})
    answer = await phone.frame()
    assert answer["type"] == "auth_ok" and answer["exp"] >= time.time() + 590
    await asyncio.sleep(2.0)  # the subject of this test is the passage of the first expiry
    published = await server.publish(user, collapse="plan")
    event = await phone.event()
    assert (event["seq"], event["collapse"], event["device"]) == (published["seq"], "plan", None)
    await phone.close()


@pytest.mark.parametrize("case", ["other_device", "other_user", "garbage", "expired", "missing"])
async def test_a_refused_in_band_token_closes_4001(server: ServerProcess, case: str) -> None:
    user = unique()
    phone = await Device.connect(server, user, "p")
    fresh = {
        "other_device": token(user, "q"),
        "other_user": token(unique(), "p"),
        "garbage": "not-a-jwt",
        "expired": token(user, "p", ttl=-10),
        "missing": None,
    }[case]
    await phone.send({"type": "auth", "token": fresh} if fresh else {"type": "auth"})
    assert await phone.closed_with() == 4001
    assert f"token refresh of {user}/p refused" in server.log()


async def test_publish_validation_names_the_field(server: ServerProcess) -> None:
    cases: list[tuple[object, int, str]] = [
        ({"kind": "k"}, 422, "user"),
        ({"user": "u 1", "kind": "k"}, 422, "user"),
        ({"user": "u", "kind": "Block Grabbed"}, 422, "kind"),
        ({"user": "u", "kind": "k", "data": [1]}, 422, "data"),
        ({"user": "u", "kind": "k", "data": {"x": "y" * 20000}}, 422, "data"),
        ({"user": "u", "kind": "k", "ttl": 0}, 422, "ttl"),
        ({"user": "u", "kind": "k", "ttl": True}, 422, "ttl"),
        ({"user": "u", "kind": "k", "id": ""}, 422, "id"),
        ({"user": "u", "kind": "k", "id": "a\u0000b"}, 422, "id"),
        ({"user": "u", "kind": "k", "collapse": "p\nq"}, 422, "collapse"),
        ({"user": "u", "kind": "k", "device": 5}, 422, "device"),
        ({"user": "u", "kind": "k", "collapse": "x" * 300}, 422, "collapse"),
        ({"user": "u", "kind": "k", "colapse": "typo"}, 422, "colapse"),
        ([{"user": "u", "kind": "k"}, {"user": "u"}], 422, "[1].kind"),
        ([], 422, "$"),
        ([{"user": "u", "kind": "k"}] * 1001, 422, "$"),
        ("a string", 422, "$"),
    ]
    for body, status, field in cases:
        response = await server.post(body)
        assert response.status_code == status, (body, response.text)
        error = response.json()["error"]
        assert error["field"] == field, (body, error)
        assert error["message"] and error["code"]
    not_json = await server.post(None, raw=b"{nope")
    assert not_json.status_code == 400 and not_json.json()["error"]["code"] == "bad_json"
    nested = b'{"user": "u", "kind": "k", "data": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    deep = await server.post(None, raw=nested)
    assert deep.status_code == 400 and deep.json()["error"]["code"] == "bad_json"
    assert (await server.post({"user": "u", "kind": "k"}, key="wrong")).status_code == 401
    assert (await server.post({"user": "u", "kind": "k"}, key=OPS_TOKEN)).status_code == 401


async def test_state_endpoints_need_a_key_and_answer_404(server: ServerProcess) -> None:
    assert (await server.get("/v1/events/nope", key="wrong")).status_code == 401
    missing = await server.get(f"/v1/events/{unique()}")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert (await server.get("/v1/events/a%00b")).status_code == 404
    assert (await server.get("/v1/users/a%20b/devices")).status_code == 400
    assert (await server.get(f"/v1/users/{unique()}/devices")).json()["devices"] == []


async def test_health_metrics_and_stats(server: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(server, user, "p")
    await server.publish(user)
    await phone.event()
    assert (await server.get("/healthz", key="")).status_code == 200
    ready = await server.get("/readyz", key="")
    assert ready.status_code == 200 and ready.json() == {"ready": True}
    text = (await server.get("/metrics", key="")).text
    for name in (
        "courier_connections",
        "courier_connects_total",
        "courier_disconnects_total",
        "courier_events_published_total",
        "courier_frames_delivered_total",
        "courier_acks_total",
        "courier_delivery_latency_seconds_bucket",
        "courier_slow_consumer_closes_total",
        "courier_broker_reconnects_total",
        "courier_ingest_lag",
    ):
        assert name in text, name
    assert (await server.get("/v1/stats", key=API_KEY)).status_code == 401
    stats = (await server.get("/v1/stats", key=OPS_TOKEN)).json()
    assert stats["connections"] >= 1 and stats["cluster_connections"] >= 1
    page = await server.get("/ops", key="")
    assert page.status_code == 200 and "Courier" in page.text
    assert OPS_TOKEN not in page.text  # the page asks for the token; it holds no data
    in_url = await server.get(f"/v1/stats?token={OPS_TOKEN}", key="")
    assert in_url.status_code == 401  # a token in a URL is not accepted
    await phone.close()


async def test_after_beyond_the_head_is_clamped(server: ServerProcess) -> None:
    user = unique()
    published = await server.publish_many([{"user": user, "kind": "k"} for _ in range(2)])
    phone = await Device.connect(server, user, "p", after=10**12)
    assert phone.hello["after"] == published[-1]["seq"]
    new = await server.publish(user)
    assert (await phone.event())["seq"] == new["seq"]  # not swallowed as "already sent"
    await phone.close()


async def test_acks_are_not_rate_limited(server: ServerProcess) -> None:
    user = unique()
    published = await server.publish_many([{"user": user, "kind": "k"} for _ in range(600)])
    phone = await Device.connect(server, user, "p")
    for event in await phone.events(600):  # one ack per event, as a careful app does
        await phone.ack(event["seq"])
    await phone.send({"type": "ping"})
    assert (await phone.frame())["type"] == "pong"
    assert published[-1]["seq"] == 600
    await phone.close()
