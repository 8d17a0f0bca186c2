"""SIGTERM drains before the server stops.

uvicorn answers SIGTERM by closing every WebSocket at once. Courier first closes
its device connections with 1012 in batches spread over ``COURIER_DRAIN_SECONDS``
(so phones reconnect across the other nodes instead of as one herd), flushes the
ack cursors, and only then hands the signal to the server's own handler. This
works the same under ``courier serve``, ``--workers N`` and a bare ``uvicorn asgi:app``:
the hook is installed by the app's lifespan, after the server installed its own.
A second SIGTERM, or SIGINT, goes straight to the server.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from channels.disconnect import RESTART
from channels.node import Node

log = logging.getLogger("courier.drain")

Handler = Callable[[int, FrameType | None], Any] | int | None


class DrainOnTerm:
    def __init__(self, node: Node, batch: int, seconds: float) -> None:
        self.node = node
        self.batch = batch
        self.seconds = seconds
        self._previous: Handler = None
        self._installed = False
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be handled in the main thread (e.g. not under a test client)
        self._loop = asyncio.get_running_loop()
        self._previous = signal.signal(signal.SIGTERM, self._on_term)
        self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous)
            self._installed = False

    def _on_term(self, sig: int, frame: FrameType | None) -> None:
        if self._task is not None or self._loop is None:
            self._hand_over(sig, frame)
            return
        log.info("SIGTERM: draining connections before shutdown")
        self._loop.call_soon_threadsafe(self._start, sig)

    def _start(self, sig: int) -> None:
        self._task = asyncio.create_task(self._drain(sig))

    async def _drain(self, sig: int) -> None:
        try:
            await self.node.drain(RESTART, self.batch, self.seconds)
        except Exception:
            log.exception("drain failed; shutting down anyway")
        finally:
            self._hand_over(sig, None)

    def _hand_over(self, sig: int, frame: FrameType | None) -> None:
        previous = self._previous
        if callable(previous):
            previous(sig, frame)
            return
        self.uninstall()
        signal.raise_signal(sig)
