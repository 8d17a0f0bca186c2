"""Platform pushes: what one push is, the providers' senders, and the retry rule.

A sender turns one due push (a :class:`PushMessage`) into one HTTP request to its
provider and classifies the answer as a :class:`PushOutcome`. It never raises for a
provider or network fault and never retries by itself: the dispatcher
(``channels.pushing``) schedules retries with :func:`retry_delay`, the same rule for every
provider.
"""

from __future__ import annotations

import random
from typing import Protocol

from channels.push.fcm import FcmSender
from channels.push.message import PushMessage, PushOutcome
from channels.push.webhook import WebhookSender, verify_webhook, webhook_signature

MAX_ATTEMPTS = 5
"""Attempts of one push (the first and four retries); then it is given up as failed."""

RETRY_CAP = 300.0


def retry_delay(attempt: int, retry_after: float | None = None) -> float:
    """Seconds before the next attempt after failed attempt number ``attempt`` (1 for the
    first): exponential backoff with full jitter, at least what ``Retry-After`` asked."""
    jittered = random.random() * min(RETRY_CAP, 2.0 ** max(0, attempt))
    return min(RETRY_CAP, max(jittered, retry_after or 0.0))


class PushSender(Protocol):
    name: str

    async def send(self, message: PushMessage, now_ms: int) -> PushOutcome: ...

    async def aclose(self) -> None: ...


__all__ = [
    "MAX_ATTEMPTS",
    "FcmSender",
    "PushMessage",
    "PushOutcome",
    "PushSender",
    "WebhookSender",
    "retry_delay",
    "verify_webhook",
    "webhook_signature",
]
