"""Event bodies as Courier's publish API takes them, and its answers."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any


class PublishError(Exception):
    """The server refused the event (``status`` 4xx), or it could not be reached after
    every retry (``status`` None, or the last 5xx)."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    @property
    def code(self) -> str | None:
        """The server's error code (``id_conflict``, ``invalid``, ...), if it sent one."""
        error = self.body.get("error") if isinstance(self.body, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        return code if isinstance(code, str) else None


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The answer for one event: its ``seq``, and whether it was recorded before."""

    id: str
    seq: int
    duplicate: bool


def new_id() -> str:
    return f"evt-{uuid.uuid4().hex}"


def event(
    user: str,
    kind: str,
    data: dict[str, Any] | None = None,
    *,
    id: str | None = None,
    device: str | None = None,
    ttl: int | None = None,
    collapse: str | None = None,
    push: bool | None = None,
    push_after: int | None = None,
    notification: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One event object as the API takes it, with an idempotency key: a retry of the same
    object can never record the event twice."""
    body: dict[str, Any] = {"user": user, "kind": kind, "data": data or {}, "id": id or new_id()}
    optional = {
        "device": device,
        "ttl": ttl,
        "collapse": collapse,
        "push": push,
        "push_after": push_after,
        "notification": notification,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def with_ids(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each event with an ``id`` (given ones are kept), before the first attempt."""
    return [e if e.get("id") else {**e, "id": new_id()} for e in events]
