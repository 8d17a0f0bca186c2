"""The machine-readable contracts, as the tests use them.

``docs/asyncapi.yaml`` publishes open schemas (clients ignore unknown fields); the tests
hold the server to the closed form (:func:`closed`), so a field the documents do not list
fails the test that received it.
"""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parent.parent
ASYNCAPI = ROOT / "docs" / "asyncapi.yaml"


def closed(schema: Any) -> Any:
    """A copy of ``schema`` in which every object schema that lists its ``properties`` and
    says nothing of others takes no others (``additionalProperties: false``)."""
    schema = copy.deepcopy(schema)

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema


@functools.cache
def asyncapi() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(ASYNCAPI.read_text())
    return doc


def resolve(doc: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    """Follow local ``$ref``s (``#/a/b``) until a node that is not one."""
    while "$ref" in node:
        target: Any = doc
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def frame_schemas(action: str) -> dict[str, str]:
    """Frame ``type`` -> schema name, for the messages of the operations with ``action``
    (``send``: server to device; ``receive``: device to server)."""
    doc = asyncapi()
    found: dict[str, str] = {}
    for operation in doc["operations"].values():
        if operation["action"] != action:
            continue
        for ref in operation["messages"]:
            payload = resolve(doc, ref)["payload"]
            name = payload["$ref"].rsplit("/", 1)[1]
            found[resolve(doc, payload)["properties"]["type"]["const"]] = name
    return found


class FrameMismatch(AssertionError):
    """A frame the server sent is not what docs/asyncapi.yaml describes."""


@functools.cache
def _validators(action: str) -> dict[str, Draft202012Validator]:
    """Server frames (``send``) are checked closed; device frames as published (open: the
    server ignores extra fields in them)."""
    components = asyncapi()["components"]
    if action == "send":
        components = {**components, "schemas": closed(components["schemas"])}
    return {
        kind: Draft202012Validator(
            {"$ref": f"#/components/schemas/{name}", "components": components}
        )
        for kind, name in frame_schemas(action).items()
    }


def check_frame(raw: str | bytes, action: str = "send") -> dict[str, Any]:
    """The frame ``raw`` decoded, or ``FrameMismatch`` saying how it breaks the contract."""
    if not isinstance(raw, str):
        raise FrameMismatch(f"a binary frame: every frame is JSON text ({raw[:80]!r})")
    try:
        frame = json.loads(raw)
    except ValueError as exc:
        raise FrameMismatch(f"a frame that is not JSON ({exc}): {raw[:200]!r}") from None
    if not isinstance(frame, dict):
        raise FrameMismatch(f"a frame that is not a JSON object: {raw[:200]!r}")
    validators = _validators(action)
    kind = frame.get("type")
    if kind not in validators:
        raise FrameMismatch(
            f"frame type {kind!r} is not in docs/asyncapi.yaml (known: {sorted(validators)}):"
            f" {raw[:200]}"
        )
    errors = sorted(validators[kind].iter_errors(frame), key=lambda e: list(e.absolute_path))
    if errors:
        problems = "; ".join(
            f"at {'/'.join(map(str, e.absolute_path)) or 'top level'}: {e.message}" for e in errors
        )
        raise FrameMismatch(
            f"{kind!r} frame does not match docs/asyncapi.yaml: {problems}\n  frame: {raw[:500]}"
        )
    return frame
