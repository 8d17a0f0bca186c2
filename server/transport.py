"""uvicorn's HTTP and WebSocket protocols, hardened for clients on the open internet.

``courier serve`` runs uvicorn with these two classes (``http=`` and ``ws=`` of
``uvicorn.Config`` take protocol classes by import path, so workers use them too).
Under any other ASGI server the app works as before, without these guarantees.

``CourierHttpProtocol`` (httptools) guarantees:

* A request head (request line and headers) must be complete within
  ``COURIER_HANDSHAKE_TIMEOUT`` of the connection opening, or of the first byte of
  the next request on a kept-alive connection; otherwise ``408`` and the connection
  is closed. Half-open handshakes cannot pile up and exhaust file descriptors.
* A URL over ``COURIER_MAX_URL_BYTES`` is answered ``414``, a head whose headers
  total over ``COURIER_MAX_HEADER_BYTES`` ``431``; both written to the client with
  ``Connection: close`` before the connection is closed.

``CourierWebSocketProtocol`` (websockets sans-I/O) guarantees:

* A refused handshake (an HTTP answer instead of the upgrade) is complete: no ERROR.
* A text frame that is not UTF-8 closes the connection with 1007 and one INFO line;
  whatever else arrived in the same read (a close frame) is handled, never raised.
* No exception escapes ``data_received``: a protocol error drops that connection
  only, with one WARNING.
* A connection holds less: uvicorn's per-connection ``asyncio.Queue`` and flow-control
  ``asyncio.Event`` are replaced by equivalents that allocate only while something
  waits, nothing of the handshake's request is kept once the connection is open, and
  its heartbeat timers are deadlines on one shared timer (``channels/deadlines.py``).
* Text messages are offered to the app's ``on_text`` first (acks are read there, in
  the protocol's own callback); whatever it declines goes the ASGI way.
* Pings from the peer are charged to the connection's frame budget, the token bucket
  of ``COURIER_RATE_LIMIT`` per second (``COURIER_RATE_BURST`` at once) that its data
  frames are charged to too (handed to the app in ``scope["extensions"]``); a peer
  past it with a ping, or one whose unread
  output (pongs and frames) exceeds ``COURIER_MAX_OUTPUT_BYTES``, is dropped: it
  does not read, so it could not take a close frame either.

Every refusal and drop is one log line (the client's address, never its URL, which
may carry a token) and a count in ``courier_transport_refusals_total{reason}``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.protocol import Protocol, State

try:  # the websockets library's unmasking, in C when its extension is built
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover
    from websockets.utils import apply_mask

from channels import deadlines
from channels.deadlines import Deadline
from channels.limits import SCOPE_KEY, TokenBucket

FAST_KEY = "courier.fast_send"
"""Where a connection's ``FastWriter`` (this protocol) is offered in ``scope["extensions"]``."""

log = logging.getLogger("courier.transport")

REASONS = ("head_timeout", "url_too_long", "headers_too_large", "bad_request", "ping_flood",
           "output_overflow", "invalid_utf8", "protocol_error")  # fmt: skip
"""The only labels of the refusals metric."""

_count: Callable[[str], None] | None = None


def count_refusals(counter: Callable[[str], None] | None) -> None:
    """Where refusals are counted (the app's metrics, set by its lifespan)."""
    global _count
    _count = counter


def _refused(reason: str) -> None:
    if _count is not None:
        _count(reason)


@dataclass(frozen=True, slots=True)
class TransportLimits:
    head_timeout: float
    max_url_bytes: int
    max_header_bytes: int
    max_output_bytes: int
    ping_rate: float
    ping_burst: int


@functools.cache
def limits() -> TransportLimits:
    """Read once per process from the environment (workers are processes of their own)."""
    from server.settings import Settings

    s = Settings.from_env()
    return TransportLimits(
        s.handshake_timeout,
        s.max_url_bytes,
        s.max_header_bytes,
        s.max_output_bytes,
        s.rate_limit_per_second,
        s.rate_limit_burst,
    )


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "unknown peer"


class _HeadTooLarge(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message


class CourierHttpProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._limits = limits()
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._limits.head_timeout, self._head_late)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse(408, "head_timeout", "the request head did not arrive in time")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        log.info("%s refused %d (%s)", _peer(self.client), status, reason)
        _refused(reason)
        body = json.dumps({"error": {"code": reason, "message": message}}).encode()
        self.transport.write(
            b"".join(
                [
                    STATUS_LINE[status],
                    b"content-type: application/json\r\n",
                    b"content-length: " + str(len(body)).encode() + b"\r\n",
                    b"connection: close\r\n\r\n",
                    body,
                ]
            )
        )
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            self._disarm()
            cause = exc.__context__
            if isinstance(cause, _HeadTooLarge):
                self._refuse(cause.status, cause.reason, cause.message)
            else:
                self._refuse(400, "bad_request", "the request is not valid HTTP/1.1")

    def handle_websocket_upgrade(self) -> None:
        ws = self.ws_protocol_class
        if (
            isinstance(ws, type)
            and issubclass(ws, CourierWebSocketProtocol)
            and (request := self._handshake_request()) is not None
        ):
            self.connections.discard(self)
            protocol = ws(
                config=self.config, server_state=self.server_state, app_state=self.app_state
            )
            protocol.connection_made(self.transport)
            self.transport.set_protocol(protocol)
            protocol.upgrade(request)
        else:
            # uvicorn's way: the head written out again for websockets to parse.
            super().handle_websocket_upgrade()
        # The connection belongs to the WebSocket protocol now. uvicorn keeps this
        # protocol's parser, which holds this protocol's callbacks: a reference cycle of
        # some 60 objects per connection that only the collector's passes free (at 10,000
        # handshakes, dozens of full collections of the whole heap). Let it go now.
        self._disarm()
        self.parser = None  # type: ignore[assignment]

    def _handshake_request(self) -> Request | None:
        """The upgrade request as websockets' parser would read it, built from what the
        HTTP parser read already (a reconnect storm spent a twentieth of its CPU parsing
        each head a second time). None for anything but a GET over HTTP/1.1 with an ASCII
        URL and no body: those go uvicorn's way, and websockets refuses them as before."""
        scope = self.scope
        if scope["method"] != "GET" or scope["http_version"] != "1.1" or not self.url.isascii():
            return None
        headers = Headers()
        for name, value in scope["headers"]:
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return None
            headers[name.decode("ascii")] = value.decode("latin-1")
        return Request(self.url.decode("ascii"), headers)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._arm()

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self._limits.max_url_bytes:
            raise _HeadTooLarge(414, "url_too_long", "the URL is too long")
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._limits.max_header_bytes:
            raise _HeadTooLarge(431, "headers_too_large", "the request headers are too large")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and cycle.transport is self.transport:  # a new request's
            one = _OneWrite(self.transport, cycle.on_response)
            cycle.transport = one  # type: ignore[assignment]
            cycle.on_response = one.completed


class _OneWrite:
    """A response's view of its connection: the head (written by uvicorn at
    ``http.response.start``) waits for the first piece of the body, so that a response is
    one write, one system call, instead of two. A response without a body part (HEAD, an
    error) is flushed when it completes or its connection closes; an interim
    ``100 Continue`` is written at once. What uvicorn's response cycle uses of a
    transport: ``write``, ``close``, ``is_closing``."""

    __slots__ = ("_head", "_on_response", "_transport")

    def __init__(self, transport: asyncio.Transport, on_response: Callable[[], None]) -> None:
        self._transport = transport
        self._head: bytes | None = None
        self._on_response = on_response

    def completed(self) -> None:
        """The cycle's ``on_response``: the response is complete."""
        self.flush()
        self._on_response()

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self._transport.write(head + data)
        elif data.startswith(b"HTTP/1.1 ") and not data.startswith(b"HTTP/1.1 100 "):
            self._head = data
        else:
            self._transport.write(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()


class _Inbox:
    """The connection's queue of ASGI messages for its one reader, the app: a deque made
    only while messages wait and a future only while the app waits (``asyncio.Queue``
    holds three deques for the connection's whole life). What uvicorn's protocol uses of
    a queue: ``put_nowait``, ``get``, ``empty``."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque[Any] | None = None
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        if self._items is None:
            self._items = deque()
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = self._items.popleft()
        if not self._items:
            self._items = None
        return item

    def empty(self) -> bool:
        return not self._items


class _Flag:
    """``asyncio.Event`` without its per-instance deque: flow control's "writable" flag,
    with a future only while a send waits for the socket to drain."""

    __slots__ = ("_set", "_waiter")

    def __init__(self) -> None:
        self._set = True
        self._waiter: asyncio.Future[None] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        while not self._set:
            if self._waiter is None or self._waiter.done():
                self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._waiter)


class _TimersOnTheWheel:
    """The event loop as uvicorn's protocol sees it: its timers (the heartbeat's next
    ping, the pong deadline, the wait for the peer's close) are deadlines on the loop's
    shared ``Deadlines`` (see ``channels/deadlines.py``), not a loop timer each; all else
    is the loop itself."""

    __slots__ = ("_loop", "_wheel")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._wheel = deadlines.for_loop(loop)

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Deadline:
        return self._wheel.call_later(
            delay, functools.partial(callback, *args) if args else callback
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


_LOOP_VIEWS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _TimersOnTheWheel] = (
    weakref.WeakKeyDictionary()
)


def _loop_view(loop: asyncio.AbstractEventLoop) -> _TimersOnTheWheel:
    view = _LOOP_VIEWS.get(loop)
    if view is None:
        view = _LOOP_VIEWS[loop] = _TimersOnTheWheel(loop)
    return view


class CourierWebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loop = _loop_view(self.loop)  # type: ignore[assignment]
        # Lighter equivalents of uvicorn's per-connection queue and flow-control event.
        self.queue = _Inbox()  # type: ignore[assignment]
        self.writable = _Flag()  # type: ignore[assignment]
        self._limits = limits()
        self._budget = TokenBucket(self._limits.ping_rate, self._limits.ping_burst)
        self.on_text: Callable[[bytes], bool] | None = None
        self._raw = False  # every byte goes to the websockets parser (see data_received)
        self._partial = b""  # the start of a frame whose end has not arrived

    def upgrade(self, request: Request) -> None:
        """Take the connection over with its handshake request already read (see
        ``CourierHttpProtocol._handshake_request``): what follows the request is frames,
        so the websockets protocol's parser starts there."""
        conn = self.conn
        conn.parser = Protocol.parse(conn)
        next(conn.parser)
        self.handle_connect(request)

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        extensions: dict[str, Any] = self.scope["extensions"]
        # The application charges the device's data frames to the same bucket as its pings.
        extensions[SCOPE_KEY] = self._budget
        extensions[FAST_KEY] = self  # the FastWriter of channels.client

    # -- the fast send path (channels.client.FastWriter) -------------------------------------

    def fast_ready(self) -> bool:
        """Pre-encoded frames may be written now: the connection is open, nothing is being
        closed, flow control does not hold writes back, and no extension (deflate) makes
        this connection's frame bytes differ from the shared ones."""
        return (
            self.handshake_complete
            and not self.close_sent
            and self.writable.is_set()
            and not self.conn.extensions
            and self.conn.state is State.OPEN
            and not self.transport.is_closing()
        )

    def fast_write(self, wire: bytes) -> None:
        self.transport.write(wire)

    # ``on_text`` (set by the app): offered each whole text message first; True means it was
    # handled here, without an ASGI message, a queue hop, or pausing the socket's reads.

    def data_received(self, data: bytes) -> None:
        try:
            if self.on_text is None or self._raw:
                started = self.handshake_initiated
                super().data_received(data)
                if started or (self.handshake_initiated and not data.endswith(b"\r\n\r\n")):
                    # Frames went to the parser before the app took over: it may be in
                    # the middle of one, so this connection keeps the parser's path.
                    self._raw = True
                return
            self._frames_received(data)
        except Exception as exc:  # a peer's bytes must never raise into the event loop
            self._drop("protocol_error", f"{type(exc).__name__}: {exc}")

    def _frames_received(self, data: bytes) -> None:
        """Split ``data`` into whole frames. Small masked text frames (an ack is 20-odd
        bytes) are unmasked here and offered to ``on_text``; every other frame, and one
        ``on_text`` declines, goes to the websockets parser, whole and in order. So the
        parser is always between frames, and the common small frame costs a header check
        and an unmask instead of the parser's generators. A partial frame waits for the
        rest of its bytes; a frame longer than the size limit switches the connection to
        the parser's path (which refuses it with 1009)."""
        buf = self._partial + data if self._partial else data
        n, pos, fed = len(buf), 0, 0
        limit = self.conn.max_message_size
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, head = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if b1 & 0x80:
                head += 4
            if limit is not None and length > limit:
                self._raw = True
                self._partial = b""
                super().data_received(buf[fed:])
                return
            end = pos + head + length
            if end > n:
                break
            if b0 == 0x81 and head == 6:  # whole, unfragmented, masked, under 126 bytes
                if fed < pos:
                    super().data_received(buf[fed:pos])  # the frames before it, first
                    fed = pos
                on_text = self.on_text
                if (
                    on_text is not None
                    and self._fast_frames_ok()
                    and on_text(apply_mask(buf[pos + 6 : end], buf[pos + 2 : pos + 6]))
                ):
                    fed = end
            pos = end
        if fed < pos:
            super().data_received(buf[fed:pos])
        self._partial = buf[pos:]

    def _fast_frames_ok(self) -> bool:
        conn = self.conn
        return (
            conn.state is State.OPEN
            and not self.close_sent
            and conn.current_size is None  # not inside a fragmented message
            and not self.frames
            and not conn.extensions
        )

    def _drop(self, reason: str, detail: str) -> None:
        log.warning("%s dropped (%s): %s", _peer(self.client), reason, detail)
        _refused(reason)
        self.transport.abort()

    async def send(self, message: Any) -> None:
        await super().send(message)
        kind = message["type"]
        if kind == "websocket.accept":
            # The upgrade is written: the handshake's request and response objects (headers
            # parsed twice over) are not read again; the scope keeps what the app reads.
            self.request = None  # type: ignore[assignment]
            self.response = None  # type: ignore[assignment]
            if not self._raw:
                # Only the request head reached the parser: it waits for the first byte of
                # the first frame. A frame parser takes its place, so that the handshake's
                # generator, which holds the parsed request, is let go too.
                self.conn.parser = Protocol.parse(self.conn)
                next(self.conn.parser)
        elif kind == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True  # a refusal answered in full is a finished handshake

    def send_receive_event_to_app(self) -> None:
        if self.curr_msg_data_type == "text":
            data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
            if self.on_text is not None and not self.close_sent and self.on_text(data):
                self.frames = []
                return
            try:
                data.decode()
            except UnicodeDecodeError:
                self.frames = []
                log.info("%s sent a text frame that is not UTF-8: closing 1007", _peer(self.client))
                _refused("invalid_utf8")
                if self.conn.state is State.OPEN:
                    self.conn.fail(1007, "invalid UTF-8")
                    self.handle_parser_exception()
                return
        super().send_receive_event_to_app()

    def handle_ping(self) -> None:
        if not self._budget.take():
            self._drop("ping_flood", "pings over the frame rate limit")
            return
        super().handle_ping()
        if self.transport.get_write_buffer_size() > self._limits.max_output_bytes:
            self._drop("output_overflow", "the peer does not read what it is sent")
