"""One push to send, and what the provider answered."""

from __future__ import annotations

import email.utils
import math
import time
from dataclasses import dataclass
from typing import Literal

import httpx


@dataclass(frozen=True, slots=True)
class PushMessage:
    user: str
    device: str
    provider: str
    """``fcm`` for FCM; any provider name for the webhook."""
    token: str
    event_id: str
    seq: int
    kind: str
    data: str
    """The event's data, JSON object text."""
    created_at: int
    expires_at: int | None
    collapse: str | None
    notification: dict[str, str] | None
    high_priority: bool
    carried: int = 1
    """How many due events of this device the push stands for (it carries the newest)."""


@dataclass(frozen=True, slots=True)
class PushOutcome:
    status: Literal["sent", "retry", "failed", "unregistered"]
    reason: str
    """Short and machine-friendly: ``ok``, ``UNREGISTERED``, ``http_429``, ``timeout``, ..."""
    retry_after: float | None = None
    message_id: str | None = None


def retry_after_header(response: httpx.Response, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds (delta-seconds or an HTTP date), or None."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def network_outcome(exc: httpx.HTTPError) -> PushOutcome:
    """A request that got no answer: always worth a retry."""
    if isinstance(exc, httpx.TimeoutException):
        return PushOutcome("retry", "timeout")
    return PushOutcome("retry", "connect_error")
