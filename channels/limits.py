"""Token buckets per key (a client address, a device), in bounded memory.

A bucket holds up to ``burst`` tokens and refills at ``rate`` tokens per second;
each event takes one. Only keys seen recently are kept: a key whose bucket
would be full again is forgotten (it is the same as a new one), and past
``max_keys`` the least recently used key is forgotten first, so a flood of
distinct addresses costs a bounded amount of memory.

Written here rather than taken from a rate-limiting library because the whole
of it is this one structure: no storage backend, no timer thread, O(1) per
call, and the same rate-and-burst semantics as the per-connection frame limit.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class TokenBucket:
    """One bucket: a connection's frame budget. ``take()`` is True when a token was taken.

    A device's data frames and its WebSocket pings draw on the same bucket (the
    transport hands the connection's bucket to the application in the ASGI scope)."""

    __slots__ = ("_at", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


SCOPE_KEY = "courier.frame_budget"
"""Where ``courier serve``'s WebSocket protocol puts a connection's ``TokenBucket`` in
``scope["extensions"]``."""


class KeyedBuckets:
    """``take(key)`` answers 0.0 when allowed, else the seconds until a token is back."""

    def __init__(
        self,
        rate: float,
        burst: int,
        max_keys: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def __len__(self) -> int:
        return len(self._buckets)

    def _tokens(self, key: str, now: float) -> float:
        found = self._buckets.get(key)
        if found is None:
            return self.burst
        tokens, at = found
        return min(self.burst, tokens + (now - at) * self.rate)

    def wait(self, key: str) -> float:
        """Seconds until ``key`` may take a token (0.0: it may now). Takes nothing."""
        tokens = self._tokens(key, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, key: str) -> float:
        """Take a token for ``key`` if there is one; answers as :meth:`wait` did before."""
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            return (1.0 - tokens) / self.rate
        self._store(key, tokens - 1.0, now)
        return 0.0

    def charge(self, key: str) -> None:
        """Take a token for ``key`` even past empty (down to -burst): failures keep
        counting while a client is refused, so hammering only lengthens its wait."""
        now = self._clock()
        self._store(key, max(-self.burst, self._tokens(key, now) - 1.0), now)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        self._sweep(now)

    def _sweep(self, now: float) -> None:
        """Forget the oldest keys while they are full again, and any past ``max_keys``."""
        buckets = self._buckets
        while buckets:
            key, (tokens, at) = next(iter(buckets.items()))
            if len(buckets) <= self.max_keys and tokens + (now - at) * self.rate < self.burst:
                break
            del buckets[key]
