"""The upgrade from HTTP to WebSocket in the hardened protocols (server/transport.py),
checked in-process: what it leaves behind and what it parses.

A connection's objects are counted 10,000 times over, and every object left in a
reference cycle waits for the garbage collector, whose full passes walk the whole heap.
These tests drive the real uvicorn-based protocol classes over a fake socket, with the
collector off: what they check is freed by reference counting alone. The request head is
parsed once, by the HTTP protocol; requests the WebSocket library would refuse still go
its way and are refused.
"""

from __future__ import annotations

import asyncio
import gc
import os
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState
from websockets.http11 import Request

from server import transport
from server.transport import CourierHttpProtocol, CourierWebSocketProtocol, TransportLimits
from tests.harness import upgrade_request


class FakeSocket(asyncio.Transport):
    """The transport a protocol writes to: records writes, nothing goes anywhere."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.protocol: Any = None
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default
        )

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def _app(scope: Any, receive: Any, send: Any) -> None:
    """Accepts a WebSocket and waits until the peer goes."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass


@pytest.fixture
def collector_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(
        transport,
        "limits",
        lambda: TransportLimits(10.0, 8192, 16384, 1 << 20, 50.0, 200),
    )
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


async def _upgrade(head: bytes) -> tuple[FakeSocket, weakref.ref[CourierHttpProtocol]]:
    """Feed ``head`` to a new HTTP protocol; answers the socket (the app has answered)
    and a weak reference to that HTTP protocol."""
    config = uvicorn.Config(
        _app, http=CourierHttpProtocol, ws=CourierWebSocketProtocol, lifespan="off"
    )
    config.load()
    socket = FakeSocket()
    http = CourierHttpProtocol(config=config, server_state=ServerState(), app_state={})
    http.connection_made(socket)
    http.data_received(head)
    for _ in range(20):  # the app's task runs and answers
        if socket.written:
            break
        await asyncio.sleep(0)
    return socket, weakref.ref(http)


async def test_the_upgrades_http_protocol_is_freed_without_the_collector(
    collector_off: None,
) -> None:
    socket, http = await _upgrade(upgrade_request("/v1/ws?after=3"))
    assert isinstance(socket.protocol, CourierWebSocketProtocol)  # the upgrade happened
    assert socket.written and socket.written[0].startswith(b"HTTP/1.1 101 ")
    # Nothing refers to it any more, and no cycle keeps it: reference counting freed it.
    assert http() is None
    socket.protocol.connection_lost(None)
    await asyncio.sleep(0)


async def test_the_handshake_is_not_parsed_twice(
    collector_off: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def parsed_again(*args: Any) -> Any:
        raise AssertionError("websockets parsed the request head a second time")

    monkeypatch.setattr(Request, "parse", parsed_again)
    socket, _ = await _upgrade(upgrade_request("/v1/ws?after=3"))
    assert socket.written[0].startswith(b"HTTP/1.1 101 "), socket.written
    ws = socket.protocol
    assert ws.scope["query_string"] == b"after=3" and ws.scope["path"] == "/v1/ws"
    assert (b"upgrade", b"websocket") in ws.scope["headers"]
    # Frames after the handshake go to the frame parser (a masked ping gets its pong).
    mask = os.urandom(4)
    ws.data_received(
        bytes([0x89, 0x80 | 2]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"hi"))
    )
    assert socket.written[-1] == bytes([0x8A, 2]) + b"hi"
    ws.connection_lost(None)
    await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("method", "extra"),
    [("POST", ""), ("GET", "Content-Length: 5\r\n"), ("GET", "Transfer-Encoding: chunked\r\n")],
)
async def test_an_unusual_upgrade_takes_the_parsers_way_and_is_refused(
    collector_off: None, method: str, extra: str
) -> None:
    socket, _ = await _upgrade(upgrade_request(method=method, headers=extra))
    assert socket.written and not socket.written[0].startswith(b"HTTP/1.1 101 "), socket.written
    assert socket.closing
