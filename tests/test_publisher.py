"""The publisher package (clients/python, ``courier_publisher``), installed from its folder
as a backend would install it: against the real server, over HTTP and the Redis stream,
and its one retry policy (with recorded waits: no test sleeps)."""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from courier_publisher import (
    AsyncPublisher,
    AsyncStreamPublisher,
    Publisher,
    PublishError,
    PublishResult,
    RetryPolicy,
    StreamPublisher,
    event,
    retry_after,
)

from tests.conftest import fresh_redis_db
from tests.harness import API_KEY, ROOT, Device, ServerProcess, free_port, unique

pytestmark = pytest.mark.e2e


def recording(**options: Any) -> tuple[RetryPolicy, list[float]]:
    """A policy whose jitter is at its top and whose sleeps only record the wait."""
    waits: list[float] = []

    async def async_sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = RetryPolicy(rng=lambda: 1.0, sleep=waits.append, async_sleep=async_sleep, **options)
    return policy, waits


class LosesFirstAnswer(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Sends every request to the real server, but loses the server's first answer (a read
    timeout), as a network can: the event is recorded and the publisher retries it."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.async_inner = httpx.AsyncHTTPTransport()
        self.ids: list[str] = []

    def _lose(self, request: httpx.Request) -> bool:
        self.ids.append(json.loads(request.content)["id"])
        return len(self.ids) == 1

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if self._lose(request):
            response.close()
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.async_inner.handle_async_request(request)
        if self._lose(request):
            await response.aclose()
            raise httpx.ReadTimeout("the answer was lost", request=request)
        return response

    def close(self) -> None:
        self.inner.close()

    async def aclose(self) -> None:
        await self.async_inner.aclose()


class InThread:
    """A sync ``Publisher`` driven from the test's event loop, each call in a thread."""

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher

    async def publish(self, *args: Any, **options: Any) -> PublishResult:
        return await asyncio.to_thread(self.publisher.publish, *args, **options)

    async def publish_many(self, events: list[dict[str, Any]]) -> list[PublishResult]:
        return await asyncio.to_thread(self.publisher.publish_many, events)


@asynccontextmanager
async def http_publisher(
    flavour: str, url: str, retry: RetryPolicy, key: str = API_KEY, lossy: bool = False
) -> AsyncIterator[AsyncPublisher | InThread]:
    transport = LosesFirstAnswer() if lossy else None
    if flavour == "async":
        async with AsyncPublisher(url, key, retry=retry, transport=transport) as courier:
            yield courier
    else:
        with Publisher(url, key, retry=retry, transport=transport) as sync:
            yield InThread(sync)


@pytest.mark.parametrize("flavour", ["sync", "async"])
async def test_http_publishers_against_the_server(server: ServerProcess, flavour: str) -> None:
    user = unique()
    phone = await Device.connect(server, user, "p")
    policy, waits = recording()
    async with http_publisher(flavour, server.url, policy, lossy=True) as lossy:
        first = await lossy.publish(user, "block.grabbed", {"block_id": "B9"})
    # The first answer was lost after the server recorded the event: the retry carried the
    # same id, and the server answered it as a duplicate of the one event.
    assert first.duplicate and first.id.startswith("evt-") and waits == [0.1]
    async with http_publisher(flavour, server.url, policy) as courier:
        again = await courier.publish(user, "block.grabbed", {"block_id": "B9"}, id=first.id)
        many = await courier.publish_many(
            [event(user, "block.released", collapse="b"), {"user": user, "kind": "k"}]
        )
        with pytest.raises(PublishError) as refused:
            await courier.publish("bad user", "k")
        with pytest.raises(PublishError) as clash:
            await courier.publish(user, "block.grabbed", {"block_id": "B10"}, id=first.id)
    async with http_publisher(flavour, server.url, policy, key="wrong-key") as stranger:
        with pytest.raises(PublishError) as unauthorized:
            await stranger.publish(user, "k")
    assert again.duplicate and again.seq == first.seq
    assert [r.duplicate for r in many] == [False, False] and many[0].seq == first.seq + 1
    assert (refused.value.status, refused.value.code) == (422, "invalid")
    assert (clash.value.status, clash.value.code) == (409, "id_conflict")
    assert (unauthorized.value.status, unauthorized.value.code) == (401, "unauthorized")
    assert waits == [0.1]  # refusals (4xx) are never retried
    got = await phone.events(3)
    assert [e["seq"] for e in got] == [first.seq, many[0].seq, many[1].seq]  # B9 once
    assert got[0]["data"] == {"block_id": "B9"} and got[1]["collapse"] == "b"
    await phone.close()


@pytest.fixture(scope="module")
def stream_server(
    postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ServerProcess, str]]:
    url = fresh_redis_db(redis_url, 6)  # a database of its own: its own ingest stream
    server = ServerProcess(postgres_url, tmp_path_factory.mktemp("pub"), redis_url=url).start()
    yield server, url
    server.stop()


async def test_stream_publishers_reach_a_device(stream_server: tuple[ServerProcess, str]) -> None:
    server, url = stream_server
    user = unique()
    phone = await Device.connect(server, user, "p")
    with StreamPublisher(url) as sync:
        first = sync.publish(user, "block.grabbed", {"n": 1})
        pair = [sync.publish(user, "k"), sync.publish(user, "k", id=f"k-{user}")]
    async with AsyncStreamPublisher(url) as courier:
        last = await courier.publish(user, "block.released", {"n": 2}, id=f"rel-{user}")
        await courier.publish(user, "block.released", {"n": 2}, id=f"rel-{user}")  # a retry
    got = await phone.events(4)
    assert [e["id"] for e in got] == [first, *pair, last]  # the repeat recorded nothing
    assert got[0]["data"] == {"n": 1}
    await phone.close()


async def test_stream_publishers_retry_an_unreachable_redis_then_give_up() -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    policy, waits = recording(retries=2)
    with (
        StreamPublisher(nowhere, retry=policy, timeout=2) as sync,
        pytest.raises(PublishError, match="redis unreachable") as info,
    ):
        sync.publish("u1", "k")
    assert info.value.status is None and waits == [0.1, 0.2]
    async with AsyncStreamPublisher(nowhere, retry=policy, timeout=2) as courier:
        with pytest.raises(PublishError, match="redis unreachable"):
            await courier.publish("u1", "k")
    assert waits == [0.1, 0.2] * 2


def _answers(*steps: int | Exception, retry_after: str | None = None) -> httpx.MockTransport:
    """A transport answering each attempt with the next step: a status or an exception."""
    queue = list(steps)
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body["id"] if isinstance(body, dict) else body[0]["id"])
        step = queue.pop(0)
        if isinstance(step, Exception):
            raise step
        if step in (200, 201):
            return httpx.Response(step, json={"id": seen[0], "seq": 7, "duplicate": False})
        headers = {"Retry-After": retry_after} if retry_after else {}
        error = {"error": {"code": f"c{step}", "message": "no"}}
        return httpx.Response(step, json=error, headers=headers)

    transport = httpx.MockTransport(answer)
    transport.seen = seen  # type: ignore[attr-defined]
    return transport


def test_retries_keep_the_id_and_honour_retry_after() -> None:
    policy, waits = recording()
    refused = httpx.ConnectError("connection refused")
    transport = _answers(refused, 503, 429, 201, retry_after="2")
    with Publisher("http://courier.test", "k", transport=transport, retry=policy) as c:
        result = c.publish("u1", "block.grabbed")
    seen = transport.seen  # type: ignore[attr-defined]
    assert len(seen) == 4 and len(set(seen)) == 1  # the same idempotency key every time
    assert result.id == seen[0] and result.seq == 7
    assert waits == [0.1, 2.0, 2.0]  # backoff, then at least what Retry-After asked


async def test_async_retries_give_up_after_the_policy_and_refusals_are_not_retried() -> None:
    policy, waits = recording(retries=2, base=1.0, cap=3.0)
    transport = _answers(502, 503, 504)
    async with AsyncPublisher("http://courier.test", "k", transport=transport, retry=policy) as c:
        with pytest.raises(PublishError) as info:
            await c.publish_many([{"user": "u1", "kind": "k"}])
    assert info.value.status == 504 and info.value.code == "c504" and waits == [1.0, 2.0]
    waits.clear()
    async with AsyncPublisher(
        "http://courier.test", "k", transport=_answers(422), retry=policy
    ) as c:
        with pytest.raises(PublishError, match="HTTP 422 c422"):
            await c.publish("u1", "Bad Kind")
    assert waits == []


def _refused(transport: httpx.MockTransport, policy: RetryPolicy) -> PublishError:
    with (
        Publisher("http://courier.test", "k", transport=transport, retry=policy) as c,
        pytest.raises(PublishError) as info,
    ):
        c.publish("u1", "k")
    return info.value


def test_connection_errors_are_retried_then_surface_as_publish_error() -> None:
    policy, waits = recording(retries=3)
    down = [httpx.ConnectError("refused"), httpx.ReadTimeout("slow"), httpx.ConnectError("x")]
    assert _refused(_answers(*down, 503), policy).status == 503
    assert waits == [0.1, 0.2, 0.4]
    waits.clear()
    gone = _refused(_answers(*down), dataclasses.replace(policy, retries=2))
    assert gone.status is None and str(gone) == "courier unreachable: x"
    assert isinstance(gone.__cause__, httpx.ConnectError) and waits == [0.1, 0.2]


def test_retry_after_as_a_date_is_read_on_the_policy_clock() -> None:
    policy, waits = recording(clock=lambda: 1_000_000.0)
    later = email.utils.formatdate(1_000_030, usegmt=True)
    transport = _answers(503, 201, retry_after=later)
    with Publisher("http://courier.test", "k", transport=transport, retry=policy) as c:
        assert c.publish("u1", "k").seq == 7
    assert waits == [30.0]


def test_the_policy_is_exponential_with_full_jitter_and_reads_retry_after() -> None:
    top = RetryPolicy(base=0.1, cap=5.0, retries=8, rng=lambda: 1.0)
    assert list(top.backoff()) == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert set(RetryPolicy(rng=lambda: 0.0).backoff()) == {0.0}
    assert top.wait(top.backoff(), 600) == 60.0  # bounded by max_retry_after
    assert top.wait(top.backoff(), None) is None  # a final answer
    assert top.wait(iter([]), 0.0) is None  # no retries left
    assert retry_after("7") == 7.0 and retry_after(None) is None and retry_after("soon") is None
    later = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after(later, now=1_000_000) == 30.0


BACKEND = """\
import json, sys
importable = []
for name in ("server", "channels", "models"):
    try:
        __import__(name)
        importable.append(name)
    except ImportError:
        pass
import courier_publisher
from courier_publisher import Publisher
with Publisher(sys.argv[1], sys.argv[2]) as courier:
    result = courier.publish(sys.argv[3], "block.grabbed", {"block_id": "B9"})
print(json.dumps({"importable": importable, "file": courier_publisher.__file__,
                  "id": result.id, "seq": result.seq}))
"""


async def test_a_backend_needs_nothing_of_the_server(
    stream_server: tuple[ServerProcess, str], tmp_path: Path
) -> None:
    """Installed alone from its folder, the package publishes to a real device, and none of
    the server's packages (``server``, ``channels``, ``models``) is importable beside it."""
    server, _ = stream_server
    target = tmp_path / "site"
    installed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT / "clients" / "python")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith("-info")) == [
        "courier_publisher"
    ]
    user = unique()
    phone = await Device.connect(server, user, "p")
    env = {
        "PATH": os.environ.get("PATH", ""),
        # No site (-S): the server's editable installation (a .pth file) is invisible; only
        # the package and the libraries it depends on (httpx and its own) are on the path.
        "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]),
    }
    ran = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-S", "-c", BACKEND, server.url, API_KEY, user],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["importable"] == [] and out["seq"] == 1
    assert Path(out["file"]).is_relative_to(target)
    got = await phone.event()
    assert (got["id"], got["seq"], got["data"]) == (out["id"], 1, {"block_id": "B9"})
    await phone.close()
