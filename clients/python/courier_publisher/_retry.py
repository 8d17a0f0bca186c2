"""The one retry policy of every publisher, sync and async, HTTP and stream.

The schedule is sans-IO: :meth:`RetryPolicy.backoff` yields the delays of one publish and
:meth:`RetryPolicy.wait` weighs an attempt's outcome against the next of them. The thin
loops :meth:`RetryPolicy.call` (sync) and :meth:`RetryPolicy.acall` (asyncio) only make
the attempt and sleep, so the four publishers share every rule. The sleep functions and
the clock are fields of the policy: a test injects recorders and never waits.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")
E = TypeVar("E", bound=BaseException)

RETRY_STATUSES = frozenset({429, 502, 503, 504})
"""HTTP answers worth another attempt: the server was busy, restarting or unreachable."""


def final(outcome: object) -> float | None:
    """The ``again`` of an attempt whose every answer is final (only errors are retried)."""
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` more attempts after the first, each after a random wait between 0 and
    ``min(cap, base * 2**n)`` seconds (exponential backoff with full jitter), and at least
    what a ``Retry-After`` answer asks for (up to ``max_retry_after``). Connection errors
    of the transport and the HTTP ``statuses`` are retried; any other answer is final."""

    retries: int = 4
    base: float = 0.1
    cap: float = 5.0
    max_retry_after: float = 60.0
    statuses: frozenset[int] = RETRY_STATUSES
    rng: Callable[[], float] = field(default=random.random, repr=False, compare=False)
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False, compare=False)
    async_sleep: Callable[[float], Awaitable[None]] = field(
        default=asyncio.sleep, repr=False, compare=False
    )
    clock: Callable[[], float] = field(default=time.time, repr=False, compare=False)
    """Wall-clock seconds, to read a ``Retry-After`` given as an HTTP date."""

    def backoff(self) -> Iterator[float]:
        """The jittered delays of one publish, one before each retry."""
        for n in range(self.retries):
            yield self.rng() * min(self.cap, self.base * 2.0**n)

    def wait(self, delays: Iterator[float], at_least: float | None) -> float | None:
        """After a failed attempt: seconds to wait before the next one, or None to stop.
        ``at_least`` is None for a final outcome, else the wait the server asked (or 0)."""
        delay = next(delays, None) if at_least is not None else None
        if delay is None or at_least is None:
            return None
        return max(delay, min(at_least, self.max_retry_after))

    def retry_after(self, value: str | None) -> float:
        """The least wait a ``Retry-After`` header asks for (0 if absent or unreadable)."""
        return retry_after(value, self.clock()) or 0.0

    def call(
        self,
        attempt: Callable[[], T],
        again: Callable[[T], float | None],
        errors: tuple[type[E], ...],
    ) -> T | E:
        """Attempts until an answer is final or the retries run out: the last answer, or
        the last of ``errors`` (connection errors: always retried) an attempt raised."""
        delays = self.backoff()
        while True:
            outcome: T | E
            at_least: float | None
            try:
                answer = attempt()
            except errors as exc:
                outcome, at_least = exc, 0.0
            else:
                outcome, at_least = answer, again(answer)
            wait = self.wait(delays, at_least)
            if wait is None:
                return outcome
            self.sleep(wait)

    async def acall(
        self,
        attempt: Callable[[], Awaitable[T]],
        again: Callable[[T], float | None],
        errors: tuple[type[E], ...],
    ) -> T | E:
        """The asyncio twin of :meth:`call`."""
        delays = self.backoff()
        while True:
            outcome: T | E
            at_least: float | None
            try:
                answer = await attempt()
            except errors as exc:
                outcome, at_least = exc, 0.0
            else:
                outcome, at_least = answer, again(answer)
            wait = self.wait(delays, at_least)
            if wait is None:
                return outcome
            await self.async_sleep(wait)


def retry_after(value: str | None, now: float | None = None) -> float | None:
    """A ``Retry-After`` header in seconds: delta-seconds or an HTTP date; None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
