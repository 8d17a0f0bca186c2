"""The shared deadline timer that connections' expiries and heartbeats use."""

from __future__ import annotations

import asyncio
import gc
import logging
import weakref

import pytest

from channels import deadlines
from channels.deadlines import TICK, Deadlines


async def test_callbacks_run_in_time_order_never_early_and_at_most_a_tick_late() -> None:
    loop = asyncio.get_running_loop()
    wheel = Deadlines(loop)
    ran: list[tuple[str, float, float]] = []  # (name, due, ran at)
    done = loop.create_future()
    start = loop.time()
    plan = [("c", 0.30), ("a", 0.05), ("b", 0.12), ("b2", 0.12), ("d", 0.0)]
    for name, delay in plan:

        def record(name: str = name, due: float = start + delay) -> None:
            ran.append((name, due, loop.time()))
            if len(ran) == len(plan):
                done.set_result(None)

        wheel.call_at(start + delay, record)
    await asyncio.wait_for(done, 5)
    assert [name for name, _, _ in ran] == ["d", "a", "b", "b2", "c"]
    for name, due, at in ran:
        assert at >= due, f"{name} ran {due - at:.3f}s early"
        # a tick late at most, plus the loop's own scheduling (generous on a shared machine)
        assert at - due < TICK + 0.25, f"{name} ran {at - due:.3f}s late"
    assert len(wheel) == 0


async def test_a_cancelled_deadline_lets_go_of_its_callback_at_once() -> None:
    loop = asyncio.get_running_loop()
    wheel = Deadlines(loop)

    class Owner:
        def fire(self) -> None:
            raise AssertionError("a cancelled deadline ran")

    owner = Owner()
    gone = weakref.ref(owner)
    deadline = wheel.call_later(3600, owner.fire)
    assert len(wheel) == 1 and not deadline.cancelled()
    deadline.cancel()
    deadline.cancel()  # twice is harmless
    del owner
    gc.collect()
    assert gone() is None and deadline.cancelled() and len(wheel) == 0
    # A later deadline on the same loop still runs.
    fired = loop.create_future()
    wheel.call_later(0.01, lambda: fired.set_result(True))
    assert await asyncio.wait_for(fired, 5)


async def test_a_failing_callback_is_logged_and_the_others_still_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    wheel = Deadlines(loop)
    fired = loop.create_future()

    def fail() -> None:
        raise RuntimeError("boom")

    wheel.call_later(0.01, fail)
    wheel.call_later(0.01, lambda: fired.set_result(True))
    with caplog.at_level(logging.ERROR, "courier.deadlines"):
        assert await asyncio.wait_for(fired, 5)
    assert any("boom" in (r.exc_text or "") for r in caplog.records)


async def test_an_earlier_deadline_added_later_rearms_the_timer() -> None:
    loop = asyncio.get_running_loop()
    wheel = Deadlines(loop)
    order: list[str] = []
    both = loop.create_future()

    def note(name: str) -> None:
        order.append(name)
        if len(order) == 2:
            both.set_result(None)

    wheel.call_later(0.5, lambda: note("late"))
    wheel.call_later(0.02, lambda: note("early"))  # before the armed one
    await asyncio.wait_for(both, 5)
    assert order == ["early", "late"]


async def test_one_wheel_per_event_loop() -> None:
    assert deadlines.for_loop() is deadlines.for_loop(asyncio.get_running_loop())
