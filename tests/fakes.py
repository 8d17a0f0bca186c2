"""In-process stand-ins, used only where a unit test needs to control timing."""

from __future__ import annotations

import asyncio
import json
from typing import Any


class Sink:
    """A socket stand-in whose sends can be stalled like a phone that stopped reading."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.closed: tuple[int, str | None] | None = None
        self.open = asyncio.Event()
        self.open.set()
        self.closed_event = asyncio.Event()
        self.first_send = asyncio.Event()
        self.changed = asyncio.Condition()

    async def send_text(self, data: str) -> None:
        self.first_send.set()
        await self.open.wait()
        self.sent.append(data)
        async with self.changed:
            self.changed.notify_all()

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        self.closed = (code, reason)
        self.closed_event.set()

    def frames(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.sent]

    def events(self) -> list[dict[str, Any]]:
        return [f for f in self.frames() if f["type"] == "event"]

    async def wait_events(self, n: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """Wait until at least ``n`` event frames were written; answers all of them."""
        async with asyncio.timeout(timeout), self.changed:
            await self.changed.wait_for(lambda: len(self.events()) >= n)
        return self.events()
