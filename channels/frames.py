"""Wire frames (device side) and bus messages (node side), encoded once each.

An event's frame is encoded once at publish time; the bus carries it as a raw
JSON value inside a small envelope, so a node decodes the envelope once and
hands the very same frame text to every local connection.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass

import msgspec
from websockets.frames import Frame, Opcode

from models.ledger import StoredEvent

PONG = '{"type":"pong"}'


def iso_ms(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    return f"{_iso_seconds(seconds)}.{millis:03d}Z"


@functools.lru_cache(maxsize=4096)
def _iso_seconds(seconds: int) -> str:
    """Events come in bursts of the same second: a backfill formats thousands of times
    from a handful of seconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def event_frame(ev: StoredEvent) -> str:
    """The ``event`` frame of docs/protocol.md (``device``: the target, or null for all;
    ``collapse``: the event's collapse key, or null: a keyed event is a snapshot that a
    newer one of its key replaces)."""
    return msgspec.json.encode(
        {
            "type": "event",
            "seq": ev.seq,
            "id": ev.id,
            "kind": ev.kind,
            "data": msgspec.Raw(ev.data.encode()),
            "created_at": iso_ms(ev.created_at),
            "expires_at": None if ev.expires_at is None else iso_ms(ev.expires_at),
            "device": ev.device,
            "collapse": ev.collapse,
        }
    ).decode()


def hello_frame(
    user: str, device: str, after: int, heartbeat: float, node: str, truncated: bool = False
) -> str:
    """``truncated``: events after ``after`` were deleted by retention before this device
    got them (it was away longer than the retention period): resync from the backend."""
    return msgspec.json.encode(
        {
            "type": "hello",
            "user": user,
            "device": device,
            "after": after,
            "heartbeat": int(heartbeat) if float(heartbeat).is_integer() else heartbeat,
            "node": node,
            "truncated": truncated,
        }
    ).decode()


def error_frame(code: str, message: str) -> str:
    return msgspec.json.encode({"type": "error", "code": code, "message": message}).decode()


def wire_text(data: bytes) -> bytes:
    """A whole server-to-client WebSocket text frame carrying ``data`` (unmasked, no
    extension): the same bytes for every connection that negotiated no extension."""
    return Frame(Opcode.TEXT, data).serialize(mask=False)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event as a node fans it out: routing fields, the encoded frame, and the frame's
    bytes on the wire (built once per node, written as they are to every connection that
    can take them)."""

    user: str
    seq: int
    device: str | None
    expires_at: int | None
    created_at: int
    frame: str
    wire: bytes = b""

    @classmethod
    def of(cls, ev: StoredEvent) -> Delivery:
        return cls(ev.user, ev.seq, ev.device, ev.expires_at, ev.created_at, event_frame(ev))

    def wired(self) -> Delivery:
        """The same delivery with its frame's bytes on the wire."""
        return dataclasses.replace(self, wire=wire_text(self.frame.encode()))


@dataclass(frozen=True, slots=True)
class Replace:
    """A device connected (on some node) as connection ``conn``; others of it must go."""

    user: str
    device: str
    conn: str


@dataclass(frozen=True, slots=True)
class Evict:
    """A device was deleted under the device limit: its connections, anywhere, must go."""

    user: str
    device: str


class _Bus(msgspec.Struct, frozen=True):
    t: str
    user: str
    seq: int = 0
    device: str | None = None
    exp: int | None = None
    ts: int = 0
    conn: str = ""
    frame: msgspec.Raw = msgspec.Raw(b"null")
    node: str | None = None  # the node that published an event (absent: older nodes)


_bus_decoder = msgspec.json.Decoder(_Bus)


def encode_delivery(d: Delivery, node: str) -> bytes:
    """An event's bus message, published by ``node``."""
    return msgspec.json.encode(
        {
            "t": "event",
            "user": d.user,
            "seq": d.seq,
            "device": d.device,
            "exp": d.expires_at,
            "ts": d.created_at,
            "frame": msgspec.Raw(d.frame.encode()),
            "node": node,
        }
    )


def encode_replace(r: Replace) -> bytes:
    return msgspec.json.encode({"t": "replace", "user": r.user, "device": r.device, "conn": r.conn})


def encode_evict(e: Evict) -> bytes:
    return msgspec.json.encode({"t": "evict", "user": e.user, "device": e.device})


def decode_bus(payload: bytes, node: str | None = None) -> Delivery | Replace | Evict | None:
    """Decode a bus message; raises ``ValueError`` for anything malformed. None for an
    event that ``node`` published itself (its own devices had it at once)."""
    try:
        m = _bus_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from exc
    if m.t == "event":
        if node is not None and m.node == node:
            return None
        frame = bytes(m.frame)
        return Delivery(m.user, m.seq, m.device, m.exp, m.ts, frame.decode(), wire_text(frame))
    if m.t == "replace" and m.device is not None:
        return Replace(m.user, m.device, m.conn)
    if m.t == "evict" and m.device is not None:
        return Evict(m.user, m.device)
    raise ValueError(f"unknown bus message type {m.t!r}")


class InFrame(msgspec.Struct):
    """A frame from a device: ``{"type": "ack", "seq": N}``, ``{"type": "ping"}``,
    ``{"type": "auth", "token": "<JWT>"}`` or ``{"type": "push", "provider": "fcm",
    "token": "<push token>"}``."""

    type: str
    seq: int | None = None
    token: str | None = None
    provider: str | None = None


PUSH_OK = '{"type":"push_ok"}'


def auth_ok_frame(expires_at: float) -> str:
    """The answer to an accepted in-band token refresh: the connection's new expiry."""
    return msgspec.json.encode({"type": "auth_ok", "exp": int(expires_at)}).decode()


in_frame_decoder = msgspec.json.Decoder(InFrame)

_ACK_HEADS = (b'{"type":"ack","seq":', b'{"type": "ack", "seq": ')


def ack_seq(data: bytes) -> int | None:
    """The seq of an ack written the way clients write one, compact
    (``{"type":"ack","seq":12}``) or with Python's default spacing; None for anything
    else, which ``in_frame_decoder`` then reads in full. This is the frame a device sends
    most: it is read without a JSON decoder."""
    if data[-1:] != b"}":
        return None
    for head in _ACK_HEADS:
        if data.startswith(head):
            digits = data[len(head) : -1]
            # JSON's form of a non-negative integer: ASCII digits, no leading zero.
            if 0 < len(digits) <= 18 and digits.isdigit() and (digits[0] != 48 or len(digits) == 1):
                return int(digits)
            return None
    return None
