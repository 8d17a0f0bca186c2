"""Every close code the server sends, in one place (PROTOCOL.md lists the public ones).

4000-4999 are Courier's own codes; a client should reconnect (with backoff and
jitter) after any of them except where noted.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Disconnect:
    code: int
    reason: str
    reconnect: bool = True


GOING_AWAY = Disconnect(1001, "server going away")
POLICY = Disconnect(1008, "policy violation")
TOO_BIG = Disconnect(1009, "frame too big")
INTERNAL = Disconnect(1011, "internal error")
RESTART = Disconnect(1012, "service restart")
TRY_AGAIN = Disconnect(1013, "try again later: ledger unavailable")
TOKEN_EXPIRED = Disconnect(4001, "token expired", reconnect=False)
SLOW = Disconnect(4008, "too slow: send queue overflowed")
REPLACED = Disconnect(4009, "replaced by a newer connection of this device", reconnect=False)
RATE_LIMITED = Disconnect(4029, "rate limited")
