"""The one retry policy of every publisher, sync and async, HTTP and stream.

It is sans-IO: :meth:`RetryPolicy.tries` gives a :class:`Tries` that, told the outcome of
an attempt, answers whether to try again and after how long. The publishers' loops only
perform the attempt and the wait, so the four of them share every rule.
"""

from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

RETRY_STATUSES = frozenset({429, 502, 503, 504})
"""HTTP answers worth another attempt: the server was busy, restarting or unreachable."""


@dataclass(frozen=True)
class RetryPolicy:
    """``retries`` more attempts after the first, waiting a random time between 0 and
    ``min(cap, base * 2**attempt)`` seconds (exponential backoff with full jitter), and at
    least what a ``Retry-After`` answer asks for (up to ``max_retry_after``)."""

    retries: int = 4
    base: float = 0.1
    cap: float = 5.0
    max_retry_after: float = 60.0
    statuses: frozenset[int] = RETRY_STATUSES
    rng: Callable[[], float] = field(default=random.random, repr=False)

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (0 for the first)."""
        jittered = self.rng() * min(self.cap, self.base * 2.0**attempt)
        if retry_after is None:
            return jittered
        return max(jittered, min(retry_after, self.max_retry_after))

    def tries(self) -> Tries:
        return Tries(self)


class Tries:
    """The attempts of one publish under a policy."""

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.attempt = 0

    def again(self, retryable: bool, retry_after: float | None = None) -> float | None:
        """After an attempt: the seconds to wait before the next one, or None to stop."""
        if not retryable or self.attempt >= self.policy.retries:
            return None
        wait = self.policy.delay(self.attempt, retry_after)
        self.attempt += 1
        return wait


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
