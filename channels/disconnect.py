"""Every close code Courier itself sends, in one place (docs/protocol.md lists them all).

The WebSocket layer (uvicorn) sends the others: 1009 for a frame over
``COURIER_MAX_FRAME_BYTES``, 1007 for invalid UTF-8, 1011 when a keepalive ping
goes unanswered. 4000-4999 are Courier's own codes; a client should reconnect
(with backoff and jitter) after any code except where ``reconnect`` is False.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Disconnect:
    code: int
    reason: str
    reconnect: bool = True


INTERNAL = Disconnect(1011, "internal error")
RESTART = Disconnect(1012, "service restart")
TRY_AGAIN = Disconnect(1013, "try again later: ledger unavailable")
TOKEN_EXPIRED = Disconnect(4001, "token expired", reconnect=False)
TOKEN_REFUSED = Disconnect(4001, "token refused: invalid, expired or another identity", False)
SLOW = Disconnect(4008, "too slow: send queue overflowed")
REPLACED = Disconnect(4009, "replaced by a newer connection of this device", reconnect=False)
EVICTED = Disconnect(4010, "evicted: the user connected more devices than allowed", reconnect=False)
RATE_LIMITED = Disconnect(4029, "rate limited")

_OURS = (INTERNAL, RESTART, TRY_AGAIN, TOKEN_EXPIRED, SLOW, REPLACED, EVICTED, RATE_LIMITED)
_STANDARD = (1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1010, 1011)
METRIC_CODES = frozenset(_STANDARD) | {d.code for d in _OURS}
"""Close codes counted by their own label; a peer may send any code, and any other one is
counted as ``other`` so that clients cannot create metric series at will."""


def code_label(code: int) -> str:
    """The metric label of a close code: the code itself if known, else ``other``."""
    return str(code) if code in METRIC_CODES else "other"
