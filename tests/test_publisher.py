"""The publisher package (clients/python, ``courier_publisher``), installed from its folder
as a backend would install it: against the real server, and its one retry policy."""

from __future__ import annotations

import email.utils
import json
import os
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from courier_publisher import (
    AsyncPublisher,
    AsyncStreamPublisher,
    Publisher,
    PublishError,
    RetryPolicy,
    StreamPublisher,
    event,
    retry_after,
)

from tests.conftest import fresh_redis_db
from tests.harness import API_KEY, ROOT, Device, ServerProcess, unique

pytestmark = pytest.mark.e2e

NO_WAIT = RetryPolicy(rng=lambda: 1.0)


async def test_async_publisher_against_the_server(server: ServerProcess) -> None:
    user = unique()
    phone = await Device.connect(server, user, "p")
    async with AsyncPublisher(server.url, API_KEY) as courier:
        first = await courier.publish(user, "block.grabbed", {"block_id": "B9"}, id=f"g-{user}")
        again = await courier.publish(user, "block.grabbed", {"block_id": "B9"}, id=f"g-{user}")
        many = await courier.publish_many(
            [event(user, "block.released", collapse="b"), {"user": user, "kind": "k"}]
        )
        with pytest.raises(PublishError) as refused:
            await courier.publish("bad user", "k")
        with pytest.raises(PublishError) as clash:
            await courier.publish(user, "block.grabbed", {"block_id": "B10"}, id=f"g-{user}")
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    assert [r.duplicate for r in many] == [False, False]
    assert (refused.value.status, refused.value.code) == (422, "invalid")
    assert (clash.value.status, clash.value.code) == (409, "id_conflict")
    events = await phone.events(3)
    assert [e["seq"] for e in events] == [first.seq, many[0].seq, many[1].seq]
    assert events[1]["collapse"] == "b"
    await phone.close()


def test_sync_publisher_against_the_server(server: ServerProcess) -> None:
    user = unique()
    with Publisher(server.url, API_KEY) as courier:
        result = courier.publish(
            user, "plan.changed", {"plan": "pro"}, ttl=60, collapse="plan", push_after=30
        )
        assert result.seq == 1 and not result.duplicate
    with (
        Publisher(server.url, "wrong-key", retry=RetryPolicy(retries=0)) as bad,
        pytest.raises(PublishError) as info,
    ):
        bad.publish(user, "k")
    assert info.value.status == 401 and info.value.code == "unauthorized"


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
    await phone.close()


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
    waits: list[float] = []
    refused = httpx.ConnectError("connection refused")
    transport = _answers(refused, 503, 429, 201, retry_after="2")
    with Publisher("http://courier.test", "k", transport=transport, sleep=waits.append) as c:
        result = c.publish("u1", "block.grabbed")
    seen = transport.seen  # type: ignore[attr-defined]
    assert len(seen) == 4 and len(set(seen)) == 1  # the same idempotency key every time
    assert result.id == seen[0] and result.seq == 7
    assert len(waits) == 3 and waits[0] <= 0.1 and waits[1] >= 2 and waits[2] >= 2


async def test_async_retries_give_up_after_the_policy_and_refusals_are_not_retried() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    policy = RetryPolicy(retries=2, base=1.0, cap=3.0, rng=lambda: 1.0)
    transport = _answers(502, 503, 504)
    async with AsyncPublisher(
        "http://courier.test", "k", transport=transport, retry=policy, sleep=sleep
    ) as c:
        with pytest.raises(PublishError) as info:
            await c.publish_many([{"user": "u1", "kind": "k"}])
    assert info.value.status == 504 and waits == [1.0, 2.0]  # full jitter at its top
    waits.clear()
    async with AsyncPublisher(
        "http://courier.test", "k", transport=_answers(422), retry=policy, sleep=sleep
    ) as c:
        with pytest.raises(PublishError, match="HTTP 422 c422"):
            await c.publish("u1", "Bad Kind")
    assert waits == []


def test_the_policy_is_exponential_with_full_jitter_and_reads_retry_after() -> None:
    top = RetryPolicy(base=0.1, cap=5.0, rng=lambda: 1.0)
    assert [top.delay(n) for n in range(8)] == [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert RetryPolicy(rng=lambda: 0.0).delay(3) == 0.0
    assert top.delay(0, retry_after=600) == 60.0  # bounded by max_retry_after
    assert retry_after("7") == 7.0 and retry_after(None) is None and retry_after("soon") is None
    later = email.utils.formatdate(1_000_030, usegmt=True)
    assert retry_after(later, now=1_000_000) == 30.0


def test_a_backend_needs_nothing_of_the_server(
    stream_server: tuple[ServerProcess, str], tmp_path: Path
) -> None:
    """Installed alone from its folder, the package publishes, and none of the server's
    packages (``server``, ``channels``, ``models``) is importable beside it."""
    server, _ = stream_server
    target = tmp_path / "site"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(ROOT / "clients" / "python")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    assert sorted(p.name for p in target.iterdir() if not p.name.endswith("-info")) == [
        "courier_publisher"
    ]
    user = unique()
    script = (
        "import importlib.util, json, sys\n"
        "missing = [m for m in ('server', 'channels', 'models')"
        " if importlib.util.find_spec(m) is None]\n"
        "from courier_publisher import Publisher\n"
        f"with Publisher({server.url!r}, {API_KEY!r}) as c:\n"
        f"    r = c.publish({user!r}, 'block.grabbed', {{'block_id': 'B9'}})\n"
        "print(json.dumps({'missing': missing, 'seq': r.seq, 'file': c.__module__}))\n"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        # No site: the server's own installation is invisible; only the package and the
        # libraries it depends on (httpx and its dependencies) are on the path.
        "PYTHONPATH": os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]]),
    }
    ran = subprocess.run(
        [sys.executable, "-S", "-c", script], env=env, cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    out = json.loads(ran.stdout)
    assert out["missing"] == ["server", "channels", "models"] and out["seq"] == 1
