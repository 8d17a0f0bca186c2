"""Unit tests of one connection's queue and writer, the hub and the cursor buffer."""

from __future__ import annotations

import asyncio

import pytest

import channels.client
from channels.client import Client
from channels.cursors import CursorBuffer
from channels.disconnect import RESTART, SLOW
from channels.frames import wire_text
from channels.hub import Hub
from tests.fakes import Sink


def make(
    sink: Sink, max_queue: int = 4, user: str = "u", device: str = "d", conn: str = "n:1"
) -> Client:
    return Client(sink, user, device, conn, max_queue=max_queue)


async def test_writer_sends_in_order_and_reports_sent_seq() -> None:
    sink = Sink()
    seen: list[int] = []
    client = Client(
        sink, "u", "d", "n:1", max_queue=10, on_sent=lambda c, seq, ts: seen.append(seq)
    )
    client.start()
    for seq in (1, 2, 3):
        assert client.send(f"f{seq}", seq)
    client.send("not-an-event")
    writer = client.writer_task
    assert writer is not None
    client.close(RESTART)
    await asyncio.wait_for(writer, 5)
    # Closing drops what is still queued: only frames written before close count.
    assert sink.closed == (1012, "service restart")
    assert seen == [int(f[1:]) for f in sink.sent if f.startswith("f")]
    assert client.sent_seq == (seen[-1] if seen else 0)


async def test_full_queue_closes_with_4008_without_waiting_for_the_socket() -> None:
    sink = Sink()
    sink.open.clear()  # the phone stopped reading: the first send blocks forever
    client = make(sink, max_queue=4)
    client.start()
    assert client.send("f1", 1)
    writer = client.writer_task
    assert writer is not None
    await asyncio.wait_for(sink.first_send.wait(), 5)  # the writer is now stuck in send
    for seq in range(2, 6):
        assert client.send(f"f{seq}", seq)  # fills the queue: never blocks the caller
    assert client.queued == 4
    assert not client.send("f6", 6)  # overflow
    assert client.closed and client.disconnect is SLOW
    assert client.queued == 0
    assert not client.send("f7", 7)
    sink.open.set()  # the phone reads again: it gets the close frame after what was in flight
    await asyncio.wait_for(writer, 5)
    assert sink.sent == ["f1"]
    assert sink.closed == (4008, SLOW.reason)


async def test_peer_that_never_reads_is_dropped_after_close_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(channels.client, "CLOSE_TIMEOUT", 0.05)
    sink = Sink()
    sink.open.clear()
    client = make(sink)
    client.start()
    owner = client.owner = asyncio.create_task(asyncio.Event().wait())  # the reading task
    client.send("f1", 1)
    writer = client.writer_task
    assert writer is not None
    await asyncio.wait_for(sink.first_send.wait(), 5)
    client.close(SLOW)
    done, _ = await asyncio.wait({writer, owner}, timeout=5)
    # Both the stuck writer and the task reading the connection are ended, as a drop.
    assert done == {writer, owner} and writer.cancelled() and owner.cancelled()
    assert client.aborted and sink.closed is None


async def test_the_writer_runs_only_while_there_is_something_to_write() -> None:
    sink = Sink()
    client = make(sink, max_queue=10)
    assert client.send("hello") and client.send("e1", 1)  # before start: queued, not written
    assert client.writer_task is None and sink.sent == []
    client.start()
    writer = client.writer_task
    assert writer is not None
    await asyncio.wait_for(writer, 5)
    # Drained: the task ended, and an idle connection holds no queue either.
    assert sink.sent == ["hello", "e1"] and client.writer_task is None and client.queued == 0
    assert client.send("e2", 2)
    second = client.writer_task
    assert second is not None and second is not writer
    await asyncio.wait_for(second, 5)
    assert sink.sent == ["hello", "e1", "e2"] and client.sent_seq == 2
    client.close(RESTART)  # an idle connection's close frame gets a writer of its own
    assert client.writer_task is not None
    await asyncio.wait_for(client.writer_task, 5)
    assert sink.closed == (1012, "service restart")


async def test_rate_limit_token_bucket() -> None:
    client = Client(Sink(), "u", "d", "n:1", max_queue=1, rate=1.0, rate_burst=3)
    assert [client.allow_frame() for _ in range(4)] == [True, True, True, False]


async def test_hub_registry_and_device_replacement() -> None:
    hub = Hub()
    a1 = make(Sink(), user="a", device="p1", conn="n:1")
    a2 = make(Sink(), user="a", device="p2", conn="n:2")
    a1b = make(Sink(), user="a", device="p1", conn="n:3")
    assert hub.add(a1) is None
    assert hub.add(a2) is None
    assert hub.add(a1b) is a1  # same device again: the older one is answered for closing
    assert hub.device("a", "p1") is a1b
    assert set(hub.clients("a")) == {a1, a2, a1b}
    assert hub.has("a") and not hub.has("b")
    assert len(hub) == 3
    assert hub.add(a1b) is a1b and len(hub) == 3  # added again: still counted once
    assert hub.remove(a1)
    assert hub.device("a", "p1") is a1b  # removing the replaced one keeps the new mapping
    assert not hub.remove(a1)
    assert len(hub) == 2 == len(list(hub.all()))
    assert hub.remove(a2) and hub.remove(a1b)
    assert hub.users() == [] and len(hub) == 0
    assert hub.clients("a") == () and not hub.has("a")


def test_cursor_buffer_keeps_maxima_and_restores() -> None:
    buf = CursorBuffer()
    buf.ack("u", "d", 5)
    buf.ack("u", "d", 3)
    buf.sent("u", "d", 7)
    buf.seen("u", "d", 100)
    moves = buf.take()
    assert [(m.acked, m.sent, m.seen) for m in moves] == [(5, 7, 100)]
    assert len(buf) == 0
    buf.ack("u", "d", 9)
    buf.restore(moves)  # a failed flush is merged back, never moving a cursor backward
    assert [(m.acked, m.sent, m.seen) for m in buf.take()] == [(9, 7, 100)]


def test_cursor_buffer_counts_a_flush_in_flight_as_pending() -> None:
    buf = CursorBuffer()
    buf.ack("u", "d", 4)
    moves = buf.take()  # the flush's transaction has not committed yet
    assert buf.pending_ack("u", "d") == 4  # a reconnect now must not resume behind it
    buf.done()
    assert buf.pending_ack("u", "d") == 0
    buf.restore(moves)
    assert buf.pending_ack("u", "d") == 4


class Wire:
    """A fake transport door: records what the fast path wrote, into the same list as the
    sink (the socket), so the order of both paths together can be checked."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.ready = True
        self.writes = 0

    def fast_ready(self) -> bool:
        return self.ready

    def fast_write(self, wire: bytes) -> None:
        # Whole unmasked text frames with short payloads (what these tests send), one or
        # several in one write.
        self.writes += 1
        while wire:
            assert wire[0] == 0x81 and wire[1] < 126 and len(wire) >= 2 + wire[1], wire
            self.sink.sent.append(wire[2 : 2 + wire[1]].decode())
            wire = wire[2 + wire[1] :]


async def test_fast_path_writes_at_once_and_never_overtakes_queued_frames() -> None:
    sink = Sink()
    wire = Wire(sink)
    seen: list[int] = []
    client = Client(
        sink, "u", "d", "n:1", max_queue=10, fast=wire, on_sent=lambda c, s, t: seen.append(s)
    )
    client.start()
    assert client.send("e1", 1, wire=wire_text(b"e1"))  # idle, writable: at once, no queue
    assert sink.sent == ["e1"] and client.queued == 0 and client.sent_seq == 1 and not seen
    client.send("hello")  # no wire bytes (a control frame): goes through the queue
    assert client.send("e2", 2, wire=wire_text(b"e2"))  # something queued: queue behind it
    assert client.queued == 2
    await asyncio.wait_for(client.wait_drained(), 5)  # the writer, writable: the door too
    assert sink.sent == ["e1", "hello", "e2"] and sink.first_send.is_set() is False
    wire.ready = False  # flow control holds writes back: queue, and the writer waits
    sink.open.clear()
    assert client.send("e3", 3, wire=wire_text(b"e3")) and client.queued == 1
    await asyncio.wait_for(sink.first_send.wait(), 5)  # the writer took e3: stuck in send
    assert client.queued == 0  # e3 is off the queue, in flight, unwritten
    wire.ready = True
    client.send("e4", 4)  # queued behind the frame in flight
    assert client.send("e5", 5, wire=wire_text(b"e5"))  # writable, but e3 is in flight
    assert client.queued == 2
    sink.open.set()
    await asyncio.wait_for(client.wait_drained(), 5)
    assert sink.sent == ["e1", "hello", "e2", "e3", "e4", "e5"]
    assert seen == [2, 3, 4, 5] and client.sent_seq == 5  # e1 went by the fast path
    client.close(RESTART)
    assert client.writer_task is not None
    await asyncio.wait_for(client.writer_task, 5)


def test_sent_only_moves_wait_for_a_full_flush_and_acks_do_not() -> None:
    buf = CursorBuffer()
    buf.sent("u", "a", 5)  # only sent moved
    buf.sent("u", "b", 5)
    buf.ack("u", "b", 4)  # an ack: b goes in every flush, with its sent cursor
    taken = buf.take(include_sent=False)
    assert [(m.device, m.acked, m.sent) for m in taken] == [("b", 4, 5)]
    buf.done()
    assert len(buf) == 1
    buf.sent("u", "a", 6)
    assert [(m.device, m.acked, m.sent) for m in buf.take()] == [("a", 0, 6)]
    buf.done()
    assert len(buf) == 0


async def test_a_backlog_is_written_in_few_writes_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(channels.client, "WRITE_AT_ONCE", 40)  # bytes: a few frames a write
    sink = Sink()
    wire = Wire(sink)
    seen: list[int] = []
    client = Client(
        sink, "u", "d", "n:1", max_queue=100, fast=wire, on_sent=lambda c, s, t: seen.append(s)
    )
    client.send("hello")  # queued before the connection is open, like a backfill
    for seq in range(1, 31):
        client.send(f"e{seq}", seq)
    assert client.queued == 31 and wire.writes == 0
    client.start()
    await asyncio.wait_for(client.wait_drained(), 5)
    assert sink.sent == ["hello"] + [f"e{seq}" for seq in range(1, 31)]
    assert seen == list(range(1, 31)) and client.sent_seq == 30
    # 148 bytes on the wire in all, each write 40 bytes or a frame more: 4 writes, not 31.
    assert wire.writes == 4, wire.writes
