"""docs/asyncapi.yaml: its frame schemas are sound JSON Schema, agree with docs/protocol.md's
examples and with the frames the code builds, and the harness checks real frames with them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from jsonschema import Draft7Validator, Draft202012Validator

from channels.frames import PONG, error_frame, event_frame, hello_frame
from models.ledger import StoredEvent, migrate
from tests.harness import CheckedConnection, Device, ServerProcess, unique
from tests.specs import ROOT, FrameMismatch, asyncapi, check_frame, frame_schemas, resolve

SERVER_TYPES = {"hello", "event", "pong", "error", "auth_ok", "push_ok"}
DEVICE_TYPES = {"ack", "ping", "auth", "push"}


@pytest.mark.parametrize("name", sorted(asyncapi()["components"]["schemas"]))
def test_every_frame_schema_is_valid_json_schema(name: str) -> None:
    schema = asyncapi()["components"]["schemas"][name]
    Draft202012Validator.check_schema(schema)
    Draft7Validator.check_schema(schema)  # AsyncAPI's own schema format is draft-07 based


def test_every_frame_of_protocol_md_has_a_schema_in_each_direction() -> None:
    assert set(frame_schemas("send")) == SERVER_TYPES
    assert set(frame_schemas("receive")) == DEVICE_TYPES


def test_every_message_is_a_frame_with_a_required_type_and_is_used() -> None:
    doc = asyncapi()
    used = {
        ref["$ref"]
        for operation in doc["operations"].values()
        for ref in operation["messages"]
        if resolve(doc, operation["channel"]) is doc["channels"]["device"]
    }
    channel = doc["channels"]["device"]["messages"]
    assert used == {f"#/channels/device/messages/{name}" for name in channel}
    for name, ref in channel.items():
        message = resolve(doc, ref)
        payload = resolve(doc, message["payload"])
        assert payload["type"] == "object", name
        assert "type" in payload["required"], name
        assert message["name"] == payload["properties"]["type"]["const"], name


def test_schema_examples_match_their_schemas() -> None:
    schemas = asyncapi()["components"]["schemas"]
    checked = 0
    for schema in schemas.values():
        for example in schema.get("examples", []):
            check_frame(json.dumps(example))
            checked += 1
    assert checked >= 2


def _protocol_examples() -> list[dict[str, Any]]:
    """The JSON frames of docs/protocol.md's ```json blocks (one object per line or block)."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    frames = []
    for block in re.findall(r"```json\n(.*?)```", text, re.S):
        try:
            found = [json.loads(block)]
        except ValueError:
            found = [json.loads(line) for line in block.splitlines() if line.strip()]
        frames += [f for f in found if isinstance(f, dict) and "type" in f]
    return frames


def test_protocol_md_examples_match_the_schemas() -> None:
    examples = _protocol_examples()
    assert {f["type"] for f in examples} >= {"hello", "event", "pong", "error", "ack", "ping"}
    for frame in examples:
        action = "receive" if frame["type"] in DEVICE_TYPES else "send"
        check_frame(json.dumps(frame), action)


def _event(**fields: Any) -> StoredEvent:
    base: dict[str, Any] = {
        "user": "u1",
        "seq": 7,
        "id": "evt-1",
        "kind": "plan.changed",
        "data": '{"plan":"pro"}',
        "created_at": 1_700_000_000_123,
    }
    return StoredEvent(**{**base, **fields})


@pytest.mark.parametrize(
    "frame",
    [
        hello_frame("u1", "d1", 0, 25.0, "node-1"),
        hello_frame("u1", "d1", 41, 0.5, "node-1", truncated=True),
        event_frame(_event()),
        event_frame(_event(device="d1", collapse="plan", expires_at=1_700_000_600_123)),
        PONG,
        error_frame("bad_frame", "the frame is not valid JSON"),
        error_frame("bad_ack", "ack 9 is beyond the last event sent (7)"),
    ],
)
def test_frames_the_code_builds_match_the_schemas(frame: str) -> None:
    check_frame(frame)


@pytest.mark.parametrize(
    "frame",
    [
        # Frames being added alongside: optional collapse/device, auth_ok, auth.
        {
            "type": "event",
            "seq": 1,
            "id": "a",
            "kind": "k",
            "data": {},
            "created_at": "2026-11-22T09:58:01.123Z",
            "expires_at": None,
            "collapse": "plan",
            "device": "d1",
        },
        {"type": "auth_ok", "exp": 1_900_000_000},
    ],
)
def test_frames_being_added_match_the_schemas(frame: dict[str, Any]) -> None:
    check_frame(json.dumps(frame))


@pytest.mark.parametrize(
    ("frame", "action"),
    [
        ({"type": "ack", "seq": 42}, "receive"),
        ({"type": "ping"}, "receive"),
        ({"type": "auth", "token": "a.b.c"}, "receive"),
        ({"type": "ack", "seq": 1, "extra": "ignored by the server"}, "receive"),
    ],
)
def test_device_frames_match_the_schemas(frame: dict[str, Any], action: str) -> None:
    check_frame(json.dumps(frame), action)


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        (b'{"type":"pong"}', "binary frame"),
        ("not json", "not JSON"),
        ("[1]", "not a JSON object"),
        ('{"type":"welcome"}', "'welcome' is not in docs/asyncapi.yaml"),
        ('{"type":"pong","extra":1}', "'extra' was unexpected"),
        ('{"type":"error","code":"oops","message":"m"}', "'oops' is not one of"),
        ('{"type":"auth_ok","exp":"1900000000"}', "at exp"),
        ('{"type":"hello","user":"u1"}', "'device' is a required property"),
        (
            '{"type":"event","seq":0,"id":"a","kind":"K","data":[],'
            '"created_at":"2026-11-22T09:58:01Z","expires_at":null,"collapse":null}',
            "at seq",
        ),
    ],
)
def test_a_frame_off_the_contract_is_refused_with_a_clear_message(
    raw: str | bytes, complaint: str
) -> None:
    with pytest.raises(FrameMismatch, match=re.escape(complaint)):
        check_frame(raw)


def test_an_event_frame_off_the_contract_names_each_problem() -> None:
    raw = (
        '{"type":"event","seq":0,"id":"a","kind":"K","data":[],'
        '"created_at":"2026-11-22T09:58:01Z","expires_at":null,"collapse":null}'
    )
    with pytest.raises(FrameMismatch) as caught:
        check_frame(raw)
    for where in ("at seq", "at kind", "at data", "at created_at", "'device' is a required"):
        assert where in str(caught.value)


# -- real frames from a real server ---------------------------------------------------------


@pytest.fixture(scope="module")
def ws_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("asyncapi")
    url = f"sqlite+aiosqlite:///{workdir / 'ledger.db'}"
    migrate(url)
    proc = ServerProcess(url, workdir).start()
    yield proc
    proc.stop()


async def test_devices_check_every_frame_they_receive(ws_server: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(ws_server, user, "phone")
    assert isinstance(phone.ws, CheckedConnection)
    await ws_server.publish(user, "plan.changed", collapse="plan", ttl=600, data={"a": 1})
    await ws_server.publish(user, "block.grabbed", device="phone")
    first, second = await phone.events(2)
    assert first["expires_at"] is not None
    assert second["device"] == "phone"
    await phone.send({"type": "ping"})
    assert await phone.frame() == {"type": "pong"}
    await phone.send("not json")
    assert (await phone.frame())["code"] == "bad_frame"
    await phone.ack(second["seq"] + 1000)
    assert (await phone.frame())["code"] == "bad_ack"
    await phone.close()
