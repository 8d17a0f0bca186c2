"""Abuse limits of device handshakes, checked before the upgrade.

In the order a handshake meets them:

1. ``COURIER_ALLOWED_ORIGINS``: a handshake with an ``Origin`` header not on the
   list is refused ``403 origin_not_allowed`` (native apps send no Origin).
2. Handshakes per client address (``COURIER_HANDSHAKE_RATE``/``_BURST``) and failed
   authentications per address (``COURIER_AUTH_FAIL_RATE``/``_BURST``): ``429
   rate_limited`` with ``Retry-After``. An address out of failures is refused before
   its token is even checked, so guessing tokens runs at the refill rate.
3. Connections per node (``COURIER_MAX_CONNECTIONS``): ``503 node_full`` with
   ``Retry-After``, before any work is done for the handshake.
4. Reconnects per device (``COURIER_RECONNECT_RATE``/``_BURST``), once the token
   says which device it is: ``429 reconnect_rate`` with ``Retry-After``.

The device limit (``COURIER_MAX_DEVICES_PER_USER``) needs the ledger and is applied
where devices are registered (``channels.node``). Every refusal is counted in
``courier_handshake_refusals_total{reason}`` and logged, at most one line per
reason per second (with how many more there were), so a flood cannot flood the log.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from channels.limits import KeyedBuckets
from channels.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("courier.guard")

REASONS = (
    "origin_not_allowed",
    "rate_limited",
    "auth_rate",
    "node_full",
    "reconnect_rate",
    "device_limit",
)
"""Labels of the refusals this module (and the device limit) adds to the metric."""


@dataclass(frozen=True, slots=True)
class Refusal:
    status: int
    code: str
    message: str
    retry_after: float | None = None
    label: str = ""

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class Guard:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.origins = frozenset(settings.allowed_origins)
        self.max_connections = settings.max_connections
        self.handshakes = KeyedBuckets(settings.handshake_rate, settings.handshake_burst)
        self.auth_failures = KeyedBuckets(settings.auth_fail_rate, settings.auth_fail_burst)
        self.reconnects = KeyedBuckets(settings.reconnect_rate, settings.reconnect_burst)
        self.metrics = metrics
        self._logged: dict[str, tuple[float, int]] = {}  # reason -> (last line at, untold)
        for reason in REASONS:
            metrics.handshake_refusals.labels(reason)

    def before_auth(self, address: str, origin: str | None, connections: int) -> Refusal | None:
        """Checks that need nothing but the request; ``None`` means go on."""
        if origin is not None and self.origins and origin not in self.origins:
            return self.refuse(
                Refusal(403, "origin_not_allowed", "this Origin may not connect"), address
            )
        wait = self.handshakes.take(address)
        if wait:
            return self.refuse(
                Refusal(429, "rate_limited", "too many handshakes from this address", wait),
                address,
            )
        wait = self.auth_failures.wait(address)
        if wait:
            return self.refuse(
                Refusal(
                    429,
                    "rate_limited",
                    "too many failed authentications from this address",
                    wait,
                    label="auth_rate",
                ),
                address,
            )
        if connections >= self.max_connections:
            return self.refuse(
                Refusal(503, "node_full", "this node has all the connections it takes", 5.0),
                address,
            )
        return None

    def auth_failed(self, address: str) -> None:
        self.auth_failures.charge(address)

    def reconnect(self, user: str, device: str, address: str) -> Refusal | None:
        wait = self.reconnects.take(f"{user}\x00{device}")
        if wait:
            return self.refuse(
                Refusal(429, "reconnect_rate", "this device reconnects too often", wait),
                f"{address} ({user}/{device})",
            )
        return None

    def refuse(self, refusal: Refusal, who: str) -> Refusal:
        label = refusal.label or refusal.code
        self.metrics.handshake_refusals.labels(label).inc()
        now = time.monotonic()
        last, untold = self._logged.get(label, (0.0, 0))
        if now - last >= 1.0:
            more = f" ({untold} more since the last line)" if untold else ""
            log.info("handshake from %s refused %d %s%s", who, refusal.status, label, more)
            self._logged[label] = (now, 0)
        else:
            self._logged[label] = (last, untold + 1)
        return refusal
