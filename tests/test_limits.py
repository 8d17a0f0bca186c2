"""Abuse limits against a real server process: every limit answers what the docs say,
counts in a metric, logs one line, and leaves other clients alone.

Each address-keyed check uses a loopback source address of its own (127.0.0.x), so the
checks do not spend each other's budgets.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from channels.limits import KeyedBuckets
from tests.conftest import assert_graceful_stop
from tests.harness import Device, ServerProcess, unique, until

pytestmark = pytest.mark.e2e

ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def guarded(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        postgres_url,
        tmp_path_factory.mktemp("limits"),
        env={
            "COURIER_ALLOWED_ORIGINS": f"{ORIGIN},https://ops.example.com",
            "COURIER_HANDSHAKE_RATE": "0.01",
            "COURIER_HANDSHAKE_BURST": "30",
            "COURIER_AUTH_FAIL_RATE": "0.01",
            "COURIER_AUTH_FAIL_BURST": "3",
            "COURIER_RECONNECT_RATE": "0.01",
            "COURIER_RECONNECT_BURST": "3",
            "COURIER_MAX_DEVICES_PER_USER": "2",
            "COURIER_RATE_LIMIT": "0.1",
            "COURIER_RATE_BURST": "20",
        },
    ).start()
    yield proc
    assert_graceful_stop(proc)


@pytest.fixture(scope="module")
def evicting(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(
        postgres_url,
        tmp_path_factory.mktemp("evict"),
        env={
            "COURIER_MAX_DEVICES_PER_USER": "2",
            "COURIER_DEVICE_LIMIT_POLICY": "evict",
            "COURIER_MAX_CONNECTIONS": "3",
        },
    ).start()
    yield proc
    assert_graceful_stop(proc)


def source(n: int) -> dict[str, Any]:
    """Connect from 127.0.0.n."""
    return {"local_addr": (f"127.0.0.{n}", 0)}


async def refused(server: ServerProcess, user: str, device: str, **kw: Any) -> tuple[int, Any]:
    with pytest.raises(InvalidStatus) as info:
        await Device.connect(server, user, device, **kw)
    response = info.value.response
    return response.status_code, (json.loads(response.body), response.headers)


async def metric(server: ServerProcess, name: str) -> float:
    for line in (await server.get("/metrics")).text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name:
            return float(value)
    return 0.0


async def connections_are(server: ServerProcess, n: int) -> None:
    async def check() -> bool:
        return await metric(server, "courier_connections") == n

    await until(check)


async def test_origins_not_on_the_list_are_refused(guarded: ServerProcess) -> None:
    user = unique()
    status, (body, _) = await refused(
        guarded, user, "web", origin="https://evil.example.net", **source(2)
    )
    assert status == 403 and body["error"]["code"] == "origin_not_allowed"
    allowed = await Device.connect(guarded, user, "web", origin=ORIGIN, **source(2))
    native = await Device.connect(guarded, user, "app", **source(2))  # no Origin at all
    await allowed.close()
    await native.close()
    assert (
        await metric(guarded, 'courier_handshake_refusals_total{reason="origin_not_allowed"}') >= 1
    )


async def test_handshakes_per_address_are_limited_with_retry_after(guarded: ServerProcess) -> None:
    for i in range(30):  # the burst; the refill is far too slow to matter here
        try:
            device = await Device.connect(guarded, unique(), "p", **source(3))
        except InvalidStatus as exc:
            raise AssertionError(f"handshake {i} refused: {exc.response.body!r}") from exc
        await device.close()
    status, (body, headers) = await refused(guarded, unique(), "p", **source(3))
    assert status == 429 and body["error"]["code"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1
    other = await Device.connect(guarded, unique(), "p", **source(4))  # another address
    await other.close()


async def test_failed_authentications_per_address_stop_token_guessing(
    guarded: ServerProcess,
) -> None:
    user = unique()
    for _ in range(3):
        status, (body, _) = await refused(guarded, user, "p", tok="not-a-token", **source(5))
        assert status == 401
    # Out of failures: refused before its token is even looked at, valid or not.
    status, (body, headers) = await refused(guarded, user, "p", **source(5))
    assert status == 429 and body["error"]["code"] == "rate_limited"
    assert "authentications" in body["error"]["message"] and "Retry-After" in headers
    fine = await Device.connect(guarded, user, "p", **source(6))
    await fine.close()
    assert await metric(guarded, 'courier_handshake_refusals_total{reason="auth_rate"}') >= 1


async def test_reconnects_per_device_are_limited(guarded: ServerProcess) -> None:
    user = unique()
    for _ in range(3):
        phone = await Device.connect(guarded, user, "loop", after=0, **source(7))
        await phone.close()
    status, (body, headers) = await refused(guarded, user, "loop", after=0, **source(7))
    assert status == 429 and body["error"]["code"] == "reconnect_rate"
    assert int(headers["Retry-After"]) >= 1
    sibling = await Device.connect(guarded, user, "other", **source(7))  # another device
    await sibling.close()


async def test_devices_past_the_cap_are_refused_and_logged_with_the_user(
    guarded: ServerProcess,
) -> None:
    user = unique()
    first = await Device.connect(guarded, user, "d1", **source(8))
    second = await Device.connect(guarded, user, "d2", **source(8))
    status, (body, _) = await refused(guarded, user, "d3", **source(8))
    assert status == 403 and body["error"]["code"] == "device_limit"
    await first.close()
    again = await Device.connect(guarded, user, "d1", **source(8))  # a known device is fine
    devices = (await guarded.get(f"/v1/users/{user}/devices")).json()["devices"]
    assert [d["device"] for d in devices] == ["d1", "d2"]
    assert f"user {user} has 2 devices already; new device d3 refused" in guarded.log()
    assert await metric(guarded, 'courier_device_limit_total{action="refused"}') >= 1
    await again.close()
    await second.close()


async def test_a_burst_of_new_devices_of_one_user_never_passes_the_cap(
    guarded: ServerProcess,
) -> None:
    user = unique()
    results = await asyncio.gather(
        *(Device.connect(guarded, user, f"b{i}", **source(9)) for i in range(8)),
        return_exceptions=True,
    )
    admitted = [r for r in results if isinstance(r, Device)]
    assert len(admitted) == 2
    assert all(isinstance(r, InvalidStatus) and r.response.status_code == 403
               for r in results if not isinstance(r, Device))  # fmt: skip
    for d in admitted:
        await d.close()


async def test_evict_policy_closes_the_least_recently_seen_device_with_4010(
    evicting: ServerProcess,
) -> None:
    user = unique()
    old = await Device.connect(evicting, user, "old")
    mid = await Device.connect(evicting, user, "mid")
    await mid.close()
    new = await Device.connect(evicting, user, "new")
    assert await old.closed_with() == 4010
    await until(lambda: "evicted old" in evicting.log())
    devices = (await evicting.get(f"/v1/users/{user}/devices")).json()["devices"]
    assert [d["device"] for d in devices] == ["mid", "new"]
    assert await metric(evicting, 'courier_device_limit_total{action="evicted"}') == 1
    await new.close()


async def test_a_full_node_answers_503_before_the_upgrade(evicting: ServerProcess) -> None:
    await connections_are(evicting, 0)
    phones = [await Device.connect(evicting, unique(), "p") for _ in range(3)]
    status, (body, headers) = await refused(evicting, unique(), "p")
    assert status == 503 and body["error"]["code"] == "node_full" and "Retry-After" in headers
    await phones[0].close()
    await connections_are(evicting, 2)
    late = await Device.connect(evicting, unique(), "p")
    for p in [*phones[1:], late]:
        await p.close()


async def test_websocket_pings_and_frames_share_one_budget(guarded: ServerProcess) -> None:
    phone = await Device.connect(guarded, unique(), "p", **source(10))
    for _ in range(15):  # control frames: 15 of the budget of 20
        await asyncio.wait_for(await phone.ws.ping(), 5)
    for _ in range(10):
        await phone.send({"type": "ping"})
    frames = []
    with pytest.raises(Exception):  # noqa: B017 (the close ends the reading)
        while True:
            frames.append(await phone.frame(timeout=5))
    # Separate budgets (15 of 20 pings, 10 of 20 frames) would never close. Pongs still
    # queued when the budget ran out are dropped with the close, so at most 5 arrive.
    assert phone.ws.close_code == 4029
    assert len(frames) <= 5 and all(f == {"type": "pong"} for f in frames)


def test_keyed_buckets_refill_and_forget_in_bounded_memory() -> None:
    now = [0.0]
    buckets = KeyedBuckets(rate=2.0, burst=3, max_keys=100, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    now[0] += 0.5
    assert buckets.take("a") == 0.0 and buckets.take("a") > 0
    for i in range(1000):
        buckets.take(f"k{i}")
    assert len(buckets) <= 100  # a flood of distinct keys is bounded
    now[0] += 10.0
    buckets.take("z")
    assert len(buckets) == 1  # refilled keys are forgotten
    buckets.charge("x")
    assert buckets.wait("x") == 0.0
    for _ in range(10):
        buckets.charge("x")
    assert buckets.wait("x") == pytest.approx(2.0)  # charged past empty, down to -burst
