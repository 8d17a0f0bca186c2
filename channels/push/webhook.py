"""The webhook sender: one signed JSON POST per push, for backends that send their own
pushes (APNs, HMS, SMS). docs/push.md describes the body and the signature."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any

import httpx

from channels.push.message import PushMessage, PushOutcome, network_outcome, retry_after_header

TOLERANCE = 300.0
"""Seconds a receiver accepts between ``Courier-Timestamp`` and its own clock."""


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def webhook_signature(secret: str, timestamp: str, body: bytes) -> str:
    """``v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return f"v1={mac.hexdigest()}"


def verify_webhook(
    secret: str, timestamp: str, signature: str, body: bytes, now: float,
    tolerance: float = TOLERANCE,
) -> bool:  # fmt: skip
    """A receiver's check: the signature over these exact bytes, and a fresh timestamp
    (an old one is a replay)."""
    if not timestamp.isdigit() or abs(now - int(timestamp)) > tolerance:
        return False
    return hmac.compare_digest(webhook_signature(secret, timestamp, body), signature)


def webhook_body(message: PushMessage) -> dict[str, Any]:
    return {
        "type": "courier.push",
        "user": message.user,
        "device": message.device,
        "provider": message.provider,
        "token": message.token,
        "event": {
            "id": message.event_id,
            "seq": message.seq,
            "kind": message.kind,
            "data": json.loads(message.data),
            "created_at": _iso(message.created_at),
            "expires_at": _iso(message.expires_at),
            "collapse": message.collapse,
        },
        "notification": message.notification,
        "high_priority": message.high_priority,
        "carried": message.carried,
    }


class WebhookSender:
    name = "webhook"

    def __init__(
        self,
        url: str,
        secret: str,
        *,
        timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self.secret = secret
        self._timeout = timeout
        self._client = client or httpx.AsyncClient(timeout=timeout)

    async def send(self, message: PushMessage, now_ms: int) -> PushOutcome:
        try:
            body = json.dumps(webhook_body(message), separators=(",", ":")).encode()
        except ValueError:  # the event's data is not JSON text: no request can carry it
            return PushOutcome("failed", "invalid_data")
        timestamp = str(now_ms // 1000)
        headers = {
            "Content-Type": "application/json",
            "Courier-Timestamp": timestamp,
            "Courier-Signature": webhook_signature(self.secret, timestamp, body),
        }
        try:
            response = await self._client.post(
                self.url, content=body, headers=headers, timeout=self._timeout
            )
        except httpx.HTTPError as exc:
            return network_outcome(exc)
        code = response.status_code
        if 200 <= code < 300:
            return PushOutcome("sent", "ok")
        if code == 410:
            return PushOutcome("unregistered", "http_410")
        if code in (429, 503):
            return PushOutcome("retry", f"http_{code}", retry_after_header(response))
        if code >= 500:
            return PushOutcome("retry", f"http_{code}")
        return PushOutcome("failed", f"http_{code}")

    async def aclose(self) -> None:
        await self._client.aclose()
