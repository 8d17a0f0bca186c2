"""The hardened transport (server/transport.py) against hostile clients over raw sockets.

Each test talks bytes to a real ``courier serve`` process: half-open handshakes, oversized
heads, ping floods, frames that are not UTF-8, and checks both what the client sees and
that the server log stays free of ERROR lines, tracebacks and secrets.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from models.ledger import migrate
from tests.conftest import assert_graceful_stop
from tests.harness import (
    API_KEY,
    OPS_TOKEN,
    Device,
    ServerProcess,
    token,
    unique,
    until,
    upgrade_request,
)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir: Path = tmp_path_factory.mktemp("edge")
    url = f"sqlite+aiosqlite:///{workdir / 'ledger.db'}"
    migrate(url)
    proc = ServerProcess(
        url,
        workdir,
        env={"COURIER_HANDSHAKE_TIMEOUT": "1", "COURIER_MAX_HEADER_BYTES": "4096"},
        args=["--access-log"],
        log_level="debug",
    ).start()
    yield proc
    log = proc.log()
    assert_graceful_stop(proc)
    for bad in ("ERROR", "Traceback", "Fatal error"):
        assert bad not in log, log[max(0, log.index(bad) - 2000) : log.index(bad) + 1000]


async def _open(server: ServerProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def _read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything until the server closes the connection (raises TimeoutError if it does not)."""
    chunks = []
    async with asyncio.timeout(timeout):
        while chunk := await reader.read(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _upgrade(tok: str, path: str = "/v1/ws") -> bytes:
    return upgrade_request(path, headers=f"Authorization: Bearer {tok}\r\n")


def _frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame (mask 0: the payload goes as it is)."""
    assert len(payload) < 126
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + b"\0\0\0\0" + payload


async def _websocket(server: ServerProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await _open(server)
    writer.write(_upgrade(token(unique(), "raw")))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _rss(server: ServerProcess) -> int:
    assert server.proc is not None
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


async def test_half_open_handshakes_are_closed_while_devices_connect(edge: ServerProcess) -> None:
    user = unique()
    sockets = [await _open(edge) for _ in range(300)]
    for i, (_reader, writer) in enumerate(sockets):
        if i % 3 == 1:
            writer.write(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")  # half a head
        elif i % 3 == 2:
            writer.write(b"GET /v1/ws HTTP/1.1\r\nX-Slow: ")  # trickled, below
    # A real device connects and receives meanwhile.
    phone = await Device.connect(edge, user, "p")
    result = await edge.publish(user)
    assert (await phone.event())["seq"] == result["seq"]
    for _ in range(3):  # keep trickling: the timeout counts from the connection's start
        await asyncio.sleep(0.2)
        for i, (_reader, writer) in enumerate(sockets):
            if i % 3 == 2 and not writer.is_closing():
                writer.write(b"a")
    answers = await asyncio.gather(*(_read_all(r, timeout=5) for r, _ in sockets))
    for answer in answers:  # every one closed by the server, with a 408 written first
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"connection: close" in answer.lower()
    for _, writer in sockets:
        writer.close()
    await phone.send({"type": "ping"})
    assert (await phone.frame())["type"] == "pong"  # the device outlived them all
    await phone.close()


async def test_oversized_heads_are_answered_414_and_431(edge: ServerProcess) -> None:
    cases = {
        b"GET /healthz?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n": b"414",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"b" * 5000 + b"\r\n\r\n": b"431",
        b"GET /healthz HTTP/1.1\r\n" + b"X-A: 1\r\n" * 1000 + b"\r\n": b"431",
        b"NOT HTTP AT ALL\r\n\r\n": b"400",
    }
    for request, status in cases.items():
        reader, writer = await _open(edge)
        writer.write(request)
        answer = await _read_all(reader, timeout=5)
        assert answer.startswith(b"HTTP/1.1 " + status), answer[:200]
        assert b"connection: close" in answer.lower()
        writer.close()


async def test_a_trickled_publish_body_is_answered_408(edge: ServerProcess) -> None:
    reader, writer = await _open(edge)
    writer.write(
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b'\r\nContent-Length: 100\r\n\r\n{"us'
    )
    await writer.drain()
    answer = await _read_all(reader, timeout=5)  # the body timeout is 1 s here
    assert answer.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b'"body_timeout"' in answer and b"connection: close" in answer.lower()
    writer.close()


async def _answer(reader: asyncio.StreamReader, head_only: bool = False) -> tuple[int, bytes]:
    """One HTTP answer off a kept-alive connection: its status and body."""
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = b"" if head_only else await reader.readexactly(length)
    return int(head.split(b" ", 2)[1]), body


async def test_answers_are_whole_and_in_order_head_pipelined_and_after_100_continue(
    edge: ServerProcess,
) -> None:
    # A response is written at once, head and body; one without a body (HEAD) and the
    # interim 100 Continue must not wait for a body that never comes.
    reader, writer = await _open(edge)
    writer.write(
        b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert await _answer(reader, head_only=True) == (200, b"")
    status, body = await _answer(reader)
    assert status == 200 and b"ok" in body
    status, body = await _answer(reader)
    assert status == 404 and b'"not_found"' in body
    event = b'{"user": "%s", "kind": "block.grabbed"}' % unique().encode()
    writer.write(
        b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\nExpect: 100-continue\r\n"
        b"Content-Length: %d\r\n\r\n" % len(event)
    )
    async with asyncio.timeout(5):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(event)
    status, body = await _answer(reader)
    assert status == 201 and b'"seq":1' in body
    writer.close()


async def test_a_ping_flood_is_dropped_with_bounded_memory(edge: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(edge, user, "calm")
    before = _rss(edge)
    reader, writer = await _websocket(edge)
    ping = _frame(0x9, b"")
    try:
        for _ in range(2000):  # 200,000 pings, never reading a pong
            writer.write(ping * 100)
            await asyncio.wait_for(writer.drain(), 5)
    except (ConnectionError, TimeoutError):
        pass  # the server dropped us: what is expected
    with pytest.raises((ConnectionError, TimeoutError)):
        await _read_all(reader, timeout=5)  # nothing more: the connection is gone
        raise ConnectionError("closed")
    writer.close()
    assert _rss(edge) - before < 20 * 1024 * 1024
    result = await edge.publish(user)
    assert (await phone.event())["seq"] == result["seq"]
    await phone.close()
    assert "ping_flood" in edge.log()


async def test_text_that_is_not_utf8_closes_1007_even_with_a_close_in_the_same_write(
    edge: ServerProcess,
) -> None:
    for tail in (b"", _frame(0x8, b"\x03\xe8")):  # alone, then followed by a close frame
        reader, writer = await _websocket(edge)
        writer.write(_frame(0x1, b"\xff\xfe") + tail)
        answer = await _read_all(reader, timeout=5)
        writer.close()
        # The hello, then a close frame: 1007 alone; 1000 echoed when the peer's close came
        # in the same read (the peer had already closed; the protocol answers its close).
        close = answer[answer.rindex(b"\x88") :]
        code = int.from_bytes(close[2:4], "big")
        assert code == (1007 if not tail else 1000), answer


def _masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame with a random mask, of any length up to 64 KiB."""
    mask = os.urandom(4)
    n = len(payload)
    size = bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode]) + size + mask + body


async def _server_frames(
    reader: asyncio.StreamReader, done: Callable[[list[bytes]], bool]
) -> list[bytes]:
    """Read unmasked server frames (text payloads; b"<pong>" for a WebSocket pong) until
    ``done`` says the frames read so far are enough."""
    seen: list[bytes] = []
    async with asyncio.timeout(10):
        while not done(seen):
            b0, b1 = await reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await reader.readexactly(2), "big")
            payload = await reader.readexactly(n)
            seen.append(b"<pong>" if b0 & 0x0F == 0xA else payload)
    return seen


async def test_small_frames_read_by_the_transport_keep_order_across_any_split(
    edge: ServerProcess,
) -> None:
    """Acks are read by the transport itself (small masked text frames); frames around
    them, split across reads, fragmented, or longer, still take the websockets parser."""
    user = unique()
    for _ in range(4):
        await edge.publish(user)
    reader, writer = await _open(edge)
    writer.write(_upgrade(token(user, "raw")))
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    first = await _server_frames(reader, lambda seen: any(b'"seq":4,' in f for f in seen))
    assert [f[:8] for f in first] == [b'{"type":'] * 5  # hello and the 4 events

    def ack(seq: int) -> bytes:
        return b'{"type":"ack","seq":%d}' % seq

    padded = b'{"type":"ping","pad":"' + b"x" * 200 + b'"}'  # a 2-byte length field
    writer.write(
        _masked(0x1, ack(1))
        + _masked(0x9, b"p1")  # a WebSocket ping between two acks
        + _masked(0x1, ack(2)[:9], fin=False)  # an ack in two fragments
        + _masked(0x0, ack(2)[9:])
        + _masked(0x1, padded)
    )
    for byte in _masked(0x1, ack(3)) + _masked(0x1, b'{"type":"ping"}'):  # a byte per write
        writer.write(bytes([byte]))
        await writer.drain()
    seen = await _server_frames(
        reader, lambda seen: b"<pong>" in seen and seen.count(b'{"type":"pong"}') == 2
    )
    assert not [f for f in seen if b'"error"' in f], seen

    async def acked(seq: int) -> bool:
        devices = (await edge.get(f"/v1/users/{user}/devices")).json()["devices"]
        return [d["acked_seq"] for d in devices] == [seq]

    await until(lambda: acked(3))
    writer.write(_masked(0x1, ack(4)) + _masked(0x8, b"\x03\xe8"))
    answer = await _read_all(reader, timeout=5)
    writer.close()
    assert answer.endswith(b"\x88\x02\x03\xe8")  # the close, answered
    await until(lambda: acked(4))


async def test_no_secret_reaches_the_log(edge: ServerProcess) -> None:
    user = unique()
    tok = token(user, "p")
    header_phone = await Device.connect(edge, user, "p", tok=tok)
    query_phone = await Device.connect(edge, user, "q", via_query=True)
    published = await edge.publish(user, id=f"id-{user}")
    await header_phone.event()
    await query_phone.event()
    async with httpx.AsyncClient(base_url=edge.url) as http:
        for path in (
            f"/v1/events/id-{user}",
            f"/v1/users/{user}/devices",
            "/healthz",
            "/readyz",
            "/metrics",
            "/ops",
            "/v1/stats",
            f"/v1/stats?token={OPS_TOKEN}",
            f"/v1/events/id-{user}?key={API_KEY}",
        ):
            for auth in (API_KEY, OPS_TOKEN):
                await http.get(path, headers={"Authorization": f"Bearer {auth}"})
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidStatus

        for bad in (tok + "x", "garbage." + tok):
            with pytest.raises(InvalidStatus):
                await connect(f"{edge.ws_url}/v1/ws?token={bad}")
    await header_phone.close()
    await query_phone.close()
    log = edge.log()
    assert published["seq"] and "WebSocket /v1/ws?token=<redacted>" in log
    for secret in (tok, tok.split(".")[2], API_KEY, OPS_TOKEN):
        assert secret not in log
