"""Push addresses (a device's FCM token) over the device's connection and the publisher
API, and the publish fields of the push fallback, against a real server process."""

from __future__ import annotations

import httpx
import pytest

from tests.harness import API_KEY, Device, ServerProcess, unique, until

pytestmark = pytest.mark.e2e

TOKEN = "fcm-registration-token-" + "x" * 100 + "-tail42"


async def devices_of(server: ServerProcess, user: str) -> dict[str, object]:
    body = (await server.get(f"/v1/users/{user}/devices")).json()
    return {d["device"]: d["push"] for d in body["devices"]}


async def test_a_device_sets_its_push_address_over_its_connection(server: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(server, user, "p")
    await phone.send({"type": "push", "provider": "fcm", "token": TOKEN})
    assert await phone.frame() == {"type": "push_ok"}
    assert (await devices_of(server, user))["p"] == {"provider": "fcm", "token": "…tail42"}
    for bad in (
        {"type": "push", "provider": "FCM!", "token": TOKEN},
        {"type": "push", "provider": "fcm"},
        {"type": "push", "provider": "fcm", "token": "line\nbreak"},
        {"type": "push", "provider": "fcm", "token": "x" * 4097},
    ):
        await phone.send(bad)
        answer = await phone.frame()
        assert (answer["type"], answer["code"]) == ("error", "bad_frame"), bad
    await phone.send({"type": "push", "provider": "fcm", "token": "another-token-0000000-9"})
    assert await phone.frame() == {"type": "push_ok"}  # a new token replaces the old one
    assert (await devices_of(server, user))["p"] == {"provider": "fcm", "token": "…0000-9"}
    await phone.close()
    assert TOKEN not in server.log() and "another-token" not in server.log()


async def test_a_publisher_sets_and_removes_a_push_address(server: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(server, user, "p")
    path = f"/v1/users/{user}/devices/p/push"
    async with httpx.AsyncClient(
        base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=15
    ) as http:
        stored = await http.put(path, json={"provider": "fcm", "token": TOKEN})
        assert stored.status_code == 200, stored.text
        assert stored.json() == {"user": user, "device": "p", "provider": "fcm", "token": "…tail42"}
        assert (await devices_of(server, user))["p"] == {"provider": "fcm", "token": "…tail42"}
        cases = [
            ({"provider": "fcm"}, "token"),
            ({"provider": "", "token": TOKEN}, "provider"),
            ({"provider": "fcm", "token": TOKEN, "extra": 1}, "extra"),
        ]
        for body, field in cases:
            refused = await http.put(path, json=body)
            assert refused.status_code == 422 and refused.json()["error"]["field"] == field
        assert (await http.put(path, content=b"{nope")).status_code == 400
        assert (
            await http.put(f"/v1/users/{user}/devices/bad%20id/push", json={})
        ).status_code == 400
        assert (await http.delete(path)).status_code == 204
        assert (await http.delete(path)).status_code == 404
        unauthorized = await http.put(path, json={}, headers={"Authorization": "Bearer wrong"})
        assert unauthorized.status_code == 401
    assert (await devices_of(server, user))["p"] is None
    await phone.close()


async def test_publish_takes_the_push_fields_and_names_bad_ones(server: ServerProcess) -> None:
    user = unique()
    key = unique("grab")
    fields = {"push_after": 30, "notification": {"title": "Block grabbed", "body": "10:00-12:00"}}
    first = await server.publish(user, id=key, **fields)
    assert (await server.publish(user, id=key, **fields))["duplicate"] is True
    for other in ({"push_after": 31}, {"push": False}, {"notification": {"title": "t"}}):
        clash = await server.post({"user": user, "kind": "block.grabbed", "id": key, **other})
        assert clash.status_code == 409, other
    cases = [
        ({"push_after": -1}, "push_after"),
        ({"push_after": "10"}, "push_after"),
        ({"push": "yes"}, "push"),
        ({"notification": {"title": ""}}, "notification"),
        ({"notification": {"subtitle": "x"}}, "notification"),
        ({"notification": "hi"}, "notification"),
    ]
    for extra, field in cases:
        refused = await server.post({"user": user, "kind": "k", **extra})
        assert refused.status_code == 422 and refused.json()["error"]["field"] == field, extra
    silent = await server.publish(user, push=False)
    assert silent["seq"] > first["seq"]

    async def no_push_decided() -> bool:
        body = (await server.get(f"/v1/events/{key}")).json()
        return all(d["push"] is None for d in body["deliveries"])

    await until(no_push_decided)  # no provider configured: nothing is ever decided
