"""The objects one app instance is built from, hung on ``app.state.services``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from starlette.requests import HTTPConnection

from channels.metrics import Metrics
from channels.node import Node
from channels.presence import Presence
from models.pushes import PushStore
from server.auth import Auth
from server.guard import Guard
from server.settings import Settings


@dataclass(frozen=True, slots=True)
class Limits:
    """Input limits of the publish API."""

    max_data_bytes: int
    max_batch: int
    max_ttl: int
    body_timeout: float = 10.0
    """Seconds a publish body has to arrive in full (a trickled body is a 408)."""
    push_after: int = 10
    """Default seconds after which a device that has not acked an event gets a push."""

    @classmethod
    def of(cls, settings: Settings) -> Limits:
        return cls(
            settings.max_data_bytes,
            settings.max_batch,
            settings.retention_seconds,
            body_timeout=settings.handshake_timeout,
            push_after=settings.push_after_seconds,
        )


@dataclass
class Services:
    settings: Settings
    auth: Auth
    node: Node
    presence: Presence
    metrics: Metrics
    limits: Limits
    guard: Guard
    pushes: PushStore


def services_of(conn: HTTPConnection) -> Services:
    return cast(Services, conn.app.state.services)
