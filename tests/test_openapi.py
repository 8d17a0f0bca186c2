"""The OpenAPI document against the code: the routes it lists, and a real server under
schemathesis (no 5xx for any input, every answer as documented)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from schemathesis.config import SchemathesisConfig
from starlette.routing import Route, WebSocketRoute

from server.api import InputError, parse_event
from server.app import create_app
from server.openapi import document
from server.services import Limits
from server.settings import Settings
from tests.harness import API_KEY, OPS_TOKEN, ServerProcess, unique
from tests.specs import asyncapi, closed

PROD = {
    "COURIER_ENV": "production",
    "COURIER_JWT_SECRET": "s" * 32,
    "COURIER_API_KEYS": "k",
    "COURIER_OPS_TOKEN": "o",
}
MAX_EXAMPLES = 100
"""Per operation and generation phase: the whole run stays well under a minute."""


def _app_routes() -> tuple[set[tuple[str, str]], set[str]]:
    """(path, method) of every HTTP route the app serves, and its WebSocket paths.

    Starlette adds HEAD to every GET route by itself; HEAD is not listed separately."""
    http: set[tuple[str, str]] = set()
    sockets: set[str] = set()
    for route in create_app(Settings.from_env(PROD)).routes:
        path = re.sub(r"\{(\w+):\w+\}", r"{\1}", getattr(route, "path", ""))
        if isinstance(route, WebSocketRoute):
            sockets.add(path)
        elif isinstance(route, Route) and route.methods:
            http |= {(path, m.lower()) for m in route.methods if m != "HEAD"}
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
    return http, sockets


def test_openapi_lists_exactly_the_routes_the_app_serves() -> None:
    doc = document(Limits.of(Settings()))
    methods = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
    documented = {
        (path, method) for path, ops in doc["paths"].items() for method in ops if method in methods
    }
    served, _ = _app_routes()
    assert documented == served, (
        f"served, not documented: {sorted(served - documented)}; "
        f"documented, not served: {sorted(documented - served)} (server/openapi.py)"
    )


def test_asyncapi_lists_exactly_the_websocket_routes() -> None:
    _, sockets = _app_routes()
    assert {c["address"] for c in asyncapi()["channels"].values()} == sockets


def test_openapi_document_limits_follow_the_settings() -> None:
    doc = document(Limits(max_data_bytes=100, max_batch=7, max_ttl=60))
    event = doc["components"]["schemas"]["NewEvent"]
    assert event["properties"]["ttl"]["maximum"] == 60
    body = doc["paths"]["/v1/events"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["oneOf"][1]["maxItems"] == 7


# -- schemathesis against a real server ---------------------------------------------------


@pytest.fixture(scope="module")
def api_server(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    proc = ServerProcess(postgres_url, tmp_path_factory.mktemp("openapi")).start()
    yield proc
    proc.stop()


def test_served_document_is_the_one_of_the_code(api_server: ServerProcess) -> None:
    response = httpx.get(f"{api_server.url}/openapi.json", timeout=10)  # no credentials
    assert response.status_code == 200
    assert response.json() == document(Limits.of(Settings()))


# The document comes from the code (as the server serves it, checked above), so the schema
# is built at import; the server's address is given per call. (schemathesis's lazy
# ``from_fixture`` loader does not run under this pytest version.)
schema = schemathesis.openapi.from_dict(
    closed(document(Limits.of(Settings()))),  # closed: answers carry no undocumented field
    config=SchemathesisConfig.from_dict(
        {
            "generation": {
                "max-examples": int(os.environ.get("COURIER_SPEC_EXAMPLES", MAX_EXAMPLES)),
                "mode": "all",
            },
            "auth": {
                "openapi": {
                    "publisherKey": {"bearer": API_KEY},
                    "opsToken": {"bearer": OPS_TOKEN},
                }
            },
        }
    ),
)


@schema.parametrize()
def test_api_conforms_to_its_document(case: Any, api_server: ServerProcess) -> None:
    case.call_and_validate(base_url=api_server.url)


def test_documented_error_codes_are_the_ones_answered(api_server: ServerProcess) -> None:
    """A few answers by hand, on top of the generated ones: 404 and 405 are JSON errors."""
    missing = httpx.get(f"{api_server.url}/nowhere", timeout=10)
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "not_found"
    wrong = httpx.delete(f"{api_server.url}/v1/events", timeout=10)
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert wrong.headers["allow"] == "POST"
    user = unique()
    assert httpx.get(f"{api_server.url}/v1/users/{user}/devices", timeout=10).status_code == 401


def test_asyncapi_file_is_where_the_openapi_document_says(tmp_path: Path) -> None:
    assert "docs/asyncapi.yaml" in document(Limits.of(Settings()))["info"]["description"]


# -- regressions found by schemathesis ----------------------------------------------------


def test_a_whole_ttl_written_as_a_float_is_whole_seconds() -> None:
    """JSON has one kind of number: ``600.0`` is the integer 600 to JSON Schema, and was
    refused with 422 as a fraction."""
    limits = Limits.of(Settings())
    as_float = parse_event({"user": "u", "kind": "k", "ttl": 600.0, "id": "x"}, "", limits)
    as_int = parse_event({"user": "u", "kind": "k", "ttl": 600, "id": "x"}, "", limits)
    assert as_float.ttl == 600 and isinstance(as_float.ttl, int)
    assert as_float.digest == as_int.digest  # a retry written either way is a duplicate
    with pytest.raises(InputError, match="ttl"):
        parse_event({"user": "u", "kind": "k", "ttl": 600.5}, "", limits)


async def test_a_whole_float_ttl_is_published(api_server: ServerProcess) -> None:
    event = {"user": unique(), "kind": "k", "id": unique("ttl"), "ttl": 600.0}
    first = await api_server.post(event)
    assert first.status_code == 201, first.text
    again = await api_server.post({**event, "ttl": 600})
    assert again.status_code == 200 and again.json()["duplicate"], again.text


def test_deployment_guide_lists_exactly_the_metrics() -> None:
    from channels.metrics import Metrics

    guide = (Path(__file__).parent.parent / "docs" / "deployment.md").read_text()
    section = guide.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    listed = {
        cells[1].strip("` ")
        for line in section.splitlines()
        if line.startswith("| `") and len(cells := line.split("|")) > 2
    }
    served = set()
    for family in Metrics().registry.collect():
        served.add(family.name + ("_total" if family.type == "counter" else ""))
    assert listed == served
