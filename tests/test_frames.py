"""The cheap ack reader agrees with the full frame decoder on everything it accepts."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from channels.frames import Delivery, ack_seq, decode_bus, encode_delivery, in_frame_decoder
from models.ledger import StoredEvent


@pytest.mark.parametrize(
    ("data", "seq"),
    [
        (b'{"type":"ack","seq":0}', 0),
        (b'{"type":"ack","seq":12}', 12),
        (b'{"type": "ack", "seq": 987654321}', 987654321),
        (b'{"type":"ack","seq":999999999999999999}', 999999999999999999),
    ],
)
def test_the_forms_clients_write_are_read(data: bytes, seq: int) -> None:
    assert ack_seq(data) == seq
    frame = in_frame_decoder.decode(data)
    assert (frame.type, frame.seq) == ("ack", seq)


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"ack","seq":01}',  # not JSON
        b'{"type":"ack","seq":-1}',
        b'{"type":"ack","seq":1.0}',
        b'{"type":"ack","seq":1e3}',
        b'{"type":"ack","seq":"1"}',
        b'{"type":"ack","seq":}',
        b'{"type":"ack","seq":1}}',
        b'{"type":"ack","seq":1 }',  # valid JSON, but left to the full decoder
        b'{"seq":1,"type":"ack"}',
        b'{"type":"ack","seq":1234567890123456789}',  # past 18 digits
        b'{"type":"ack","seq":\xd9\xa3}',  # a non-ASCII digit
        b'{"type":"ack","seq":1',
        b"",
    ],
)
def test_anything_else_is_left_to_the_full_decoder(data: bytes) -> None:
    assert ack_seq(data) is None


@given(st.integers(min_value=0, max_value=10**18 - 1), st.booleans())
def test_every_ack_a_client_encodes_is_read(seq: int, compact: bool) -> None:
    separators = (",", ":") if compact else (", ", ": ")
    assert ack_seq(json.dumps({"type": "ack", "seq": seq}, separators=separators).encode()) == seq


@given(
    st.one_of(
        st.binary(max_size=40),
        st.text(alphabet='{}":, ackseqtype0123456789-.e', max_size=40).map(str.encode),
        st.text(max_size=12).map(lambda t: ('{"type":"ack","seq":' + t + "}").encode()),
    )
)
def test_whatever_it_accepts_the_full_decoder_reads_the_same(data: bytes) -> None:
    seq = ack_seq(data)
    if seq is not None:
        frame = in_frame_decoder.decode(data)
        assert (frame.type, frame.seq) == ("ack", seq)


def test_a_node_drops_its_own_events_from_the_bus() -> None:
    delivery = Delivery.of(StoredEvent("u1", 7, "e7", "block.grabbed", '{"b":1}', 1795400000000))
    payload = encode_delivery(delivery, "node-a")
    assert decode_bus(payload, "node-a") is None  # its own devices had it at once
    other = decode_bus(payload, "node-b")
    assert isinstance(other, Delivery)
    assert (other.user, other.seq, other.frame) == ("u1", 7, delivery.frame)
    assert other.wire == delivery.wired().wire
    # A message from a node that does not say who published it is delivered.
    older = json.loads(payload)
    del older["node"]
    assert isinstance(decode_bus(json.dumps(older).encode(), "node-a"), Delivery)
