"""``POST /v1/events`` is a bare ASGI endpoint that the app calls directly; under a
``root_path`` the router reaches the same endpoint. Both ways answer alike, and a bug is a
logged 500 that closes the connection, never a traceback to the publisher.

In-process (httpx's ASGI transport, the app's own lifespan on an embedded SQLite ledger):
what is tested here is the dispatch, which no socket changes; the end-to-end tests
publish over real sockets to a real server.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from models.ledger import migrate
from server.app import create_app
from server.services import Services
from server.settings import Settings
from tests.harness import API_KEY, unique

KEY = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    url = f"sqlite+aiosqlite:///{tmp_path / 'courier.db'}"
    migrate(url)
    return url


@pytest.fixture
async def app(sqlite_url: str) -> AsyncIterator[Starlette]:
    url = sqlite_url
    settings = Settings.from_env(
        {"COURIER_DATABASE_URL": url, "COURIER_API_KEYS": API_KEY, "COURIER_ENV": "development"}
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


def client(app: Starlette, root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://courier" + root_path)


async def answers(app: Starlette, root_path: str, body: Any) -> list[tuple[int, Any]]:
    async with client(app, root_path) as http:
        seen = []
        for headers in ({}, KEY, KEY):
            r = await http.post("/v1/events", json=body, headers=headers)
            assert r.headers["content-type"] == "application/json"
            seen.append((r.status_code, r.json()))
        bad = await http.post("/v1/events", json={"user": "u", "kind": "Bad Kind"}, headers=KEY)
        seen.append((bad.status_code, bad.json()))
        wrong = await http.get("/v1/events", headers=KEY)
        seen.append((wrong.status_code, wrong.json()))
        return seen


async def test_a_publish_under_a_root_path_answers_as_the_direct_one(app: Starlette) -> None:
    user = unique()
    direct = await answers(app, "", {"user": user, "kind": "block.grabbed", "id": "a"})
    routed = await answers(app, "/courier", {"user": user, "kind": "block.grabbed", "id": "b"})
    assert [status for status, _ in direct] == [401, 201, 200, 422, 405]
    for (status, body), (status2, body2) in zip(direct, routed, strict=True):
        assert status == status2
        if status in (201, 200):  # the same answer for the other id
            assert body == {**body2, "id": "a", "seq": body["seq"]}
        else:
            assert body == body2
    assert [body["seq"] for status, body in routed if status in (200, 201)] == [2, 2]


async def test_a_bug_while_publishing_is_a_logged_500_that_closes_the_connection(
    app: Starlette, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    services: Services = app.state.services

    async def broken(batch: Any) -> Any:
        raise RuntimeError("a bug in the publish path")

    monkeypatch.setattr(services.node, "publish", broken)
    for root_path in ("", "/courier"):
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            async with client(app, root_path) as http:
                r = await http.post("/v1/events", json={"user": "u", "kind": "k"}, headers=KEY)
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "internal"
        assert r.headers["connection"] == "close"
        assert "a bug in the publish path" not in r.text
        [record] = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
        assert record.exc_info is not None and "/v1/events" in record.getMessage()
