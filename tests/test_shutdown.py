"""The shutdown's steps are bounded: one that hangs is left after its time, and the log
names the step and where it waited, so a worker always exits."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.app import bounded_step


async def test_a_step_that_hangs_is_left_with_its_name_and_stack_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cancelled = asyncio.Event()

    async def waits_for_a_peer_that_never_answers() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    with caplog.at_level(logging.ERROR, logger="courier"):
        await bounded_step("the stuck step", waits_for_a_peer_that_never_answers(), seconds=0.2)
    assert cancelled.is_set()  # the step was cancelled, not left running
    [record] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    message = record.getMessage()
    assert "the stuck step did not finish within 0.2s" in message
    assert "waits_for_a_peer_that_never_answers" in message


async def test_a_step_that_finishes_or_fails_is_as_it_was(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done: list[str] = []

    async def quick() -> None:
        done.append("quick")

    async def broken() -> None:
        raise RuntimeError("a failure of the step")

    await bounded_step("a quick step", quick())
    assert done == ["quick"]
    with pytest.raises(RuntimeError, match="a failure of the step"):
        await bounded_step("a broken step", broken())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
