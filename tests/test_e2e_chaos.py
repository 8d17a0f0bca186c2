"""No event is ever lost across repeated random disconnects.

Devices of one user drop their connection at random points (a clean close or a
cut transport, as on a bad mobile network), sometimes before acking what they
processed, and resume either with ``after=`` or from the server's acked cursor,
while events keep being published. Every device must end with every event
processed exactly once and in order, repeats dropped by ``seq`` as the protocol
asks, and its acked cursor at the last event.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import pytest
from websockets.exceptions import ConnectionClosed

from tests.harness import Device, ServerProcess, unique, until

pytestmark = pytest.mark.e2e

EVENTS = 300
DEVICES = 3


@dataclass
class Phone:
    name: str
    processed: list[int] = field(default_factory=list)
    repeats: int = 0
    connections: int = 0
    acked: int = 0


async def run_phone(
    server: ServerProcess, user: str, phone: Phone, rng: random.Random, final: asyncio.Future[int]
) -> None:
    last = 0
    while not (final.done() and last >= final.result()):
        after = last if rng.random() < 0.5 else None
        device = await Device.connect(server, user, phone.name, after=after)
        phone.connections += 1
        budget = rng.randint(1, 40)  # frames this connection lives for
        try:
            while budget > 0 and not (final.done() and last >= final.result()):
                try:
                    frame = await device.event(timeout=0.5)
                except TimeoutError:
                    continue  # nothing new yet: check whether we are done
                seq = frame["seq"]
                if seq <= last:
                    phone.repeats += 1  # at-least-once: drop repeats by seq
                    continue
                phone.processed.append(seq)
                last = seq
                if rng.random() < 0.7:
                    await device.ack(seq)
                    phone.acked = seq
                budget -= 1
        except ConnectionClosed:
            pass
        finally:
            if rng.random() < 0.5:
                device.ws.transport.abort()  # the network vanished: no close frame
            else:
                await device.close()
    # Done: ack the last one for good, on a clean connection.
    device = await Device.connect(server, user, phone.name, after=last)
    await device.ack(last)
    await device.send({"type": "ping"})
    assert (await device.frame())["type"] == "pong"
    phone.acked = last
    await device.close()


@pytest.mark.parametrize("seed", [1, 2])
async def test_no_event_lost_across_random_disconnects(server: ServerProcess, seed: int) -> None:
    rng = random.Random(seed)
    user = unique()
    loop = asyncio.get_running_loop()
    final: asyncio.Future[int] = loop.create_future()
    phones = [Phone(f"phone{i}") for i in range(DEVICES)]
    published: list[int] = []
    ids: list[str] = []

    async def publisher() -> None:
        while len(published) < EVENTS:
            n = min(rng.randint(1, 12), EVENTS - len(published))
            batch = await server.publish_many(
                [
                    {"user": user, "kind": "block.grabbed", "data": {"i": len(published) + i}}
                    for i in range(n)
                ]
            )
            published.extend(r["seq"] for r in batch)
            ids.extend(r["id"] for r in batch)
            await asyncio.sleep(rng.uniform(0, 0.02))  # spread publishes over the run
        final.set_result(published[-1])

    tasks = [run_phone(server, user, p, random.Random(rng.random()), final) for p in phones]
    await asyncio.wait_for(asyncio.gather(publisher(), *tasks), 150)

    for phone in phones:
        assert phone.processed == published, phone.name
        assert phone.connections > 3, phone  # the run really did drop and resume

    async def all_acked() -> bool:
        body = (await server.get(f"/v1/events/{ids[-1]}")).json()
        return {d["device"]: d["status"] for d in body["deliveries"]} == {
            p.name: "acked" for p in phones
        }

    await until(all_acked, timeout=15)


async def test_a_phone_hangs_up_at_once_with_frames_it_never_read(server: ServerProcess) -> None:
    """A phone that hangs up with more frames unread than its client library buffers
    (websockets' ``max_queue``, 16 by default: past it the library stops reading the socket)
    must not wait behind them for the server's close frame until ``close_timeout`` (10 s).
    In the test above a phone far behind gets its backlog in one burst and hangs up after
    ``budget`` frames: each such close cost 10 s, and a run of them 90 s under CPU load."""
    user = unique()
    phone = await Device.connect(server, user, "phone")
    await server.publish_many([{"user": user, "kind": "block.grabbed"} for _ in range(40)])
    assert (await phone.event())["seq"] == 1  # the backlog arrived; the phone reads no more
    await until(lambda: phone.ws.recv_messages.paused)  # the library stopped reading
    started = time.monotonic()
    await phone.close()
    assert time.monotonic() - started < 5, "close() waited out the client's close_timeout"
