"""The Android reference client (clients/android, Java on OkHttp), compiled here and run
as a device against a real server: live events, a drop and resume, the acks a drop lost
sent on the next hello, a stored seq beyond the server's stream, a token refreshed in band,
a 4001 answered with a new token, a bad token refused twice, a push as a hint to connect,
and a 4009 that stops it."""

from __future__ import annotations

import asyncio
import json
import queue
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import IN_CI
from tests.harness import ROOT, Device, ServerProcess, token, unique, until

pytestmark = [pytest.mark.postgres, pytest.mark.e2e]

ANDROID = ROOT / "clients" / "android"
JARS = Path("/usr/share/java")
NEEDED = ("okhttp.jar", "okio.jar", "json-android.jar")


@pytest.fixture(scope="module")
def classpath() -> str:
    missing = [str(JARS / j) for j in NEEDED if not (JARS / j).exists()]
    missing += [tool for tool in ("javac", "jar", "java") if shutil.which(tool) is None]
    if missing:
        why = (
            f"{', '.join(missing)} (Debian: default-jdk-headless, libokhttp-java,"
            " libokio-java, libandroid-json-org-java)"
        )
        if IN_CI:
            pytest.fail(f"CI=true and {why} are missing: the Android client must be tested")
        pytest.skip(f"!!! SKIPPED: {why} are missing; install them to run these tests")
    built = subprocess.run([str(ANDROID / "build.sh")], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    parts = built.stdout.strip().splitlines()[-1].split(":")
    return ":".join(p if p.startswith("/") else str(ANDROID / p) for p in parts)


@pytest.fixture(scope="module")
def node(postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(postgres_url, tmp_path_factory.mktemp("android")).start()
    yield server
    server.stop()


class JavaDevice:
    """The driver program: one CourierClient, its output read line by line."""

    def __init__(self, cp: str, server: ServerProcess, tokens: Path, **named: object) -> None:
        args = [server.url, str(tokens), *(f"{k.replace('_', '-')}={v}" for k, v in named.items())]
        self.proc = subprocess.Popen(
            ["java", "-cp", cp, "com.courier.client.Driver", *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.lines.put(json.loads(line))

    async def expect(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 15) -> Any:
        """The next line that ``wanted`` accepts (every line read is kept in ``seen``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                raise AssertionError(f"no such line within {timeout}s; saw {self.seen}")
            try:
                line = await asyncio.to_thread(self.lines.get, True, min(left, 1.0))
            except queue.Empty:
                continue
            self.seen.append(line)
            if wanted(line):
                return line

    def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.command("quit")
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self._reader.join(10)
        self.proc.stdout.close()

    def events(self) -> list[int]:
        return [line["event"] for line in self.seen if "event" in line]


def state(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda line: line.get("state") == name


def event_seq(seq: int) -> Callable[[dict[str, Any]], bool]:
    return lambda line: line.get("event") == seq


def logged(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda line: text in line.get("log", "")


@pytest.fixture
def java(classpath: str, node: ServerProcess, tmp_path: Path) -> Iterator[Any]:
    started: list[JavaDevice] = []

    def start(user: str, device: str, ttl: float = 3600, **named: object) -> JavaDevice:
        """A driver; ``named`` become its options (``in_band=False`` → ``in-band=False``)."""
        tokens = tmp_path / f"{device}.jwt"
        tokens.write_text(token(user, device, ttl=ttl))
        started.append(JavaDevice(classpath, node, tokens, **named))
        return started[-1]

    yield start
    for device in started:
        device.close()


async def acked(server: ServerProcess, user: str, seq: int) -> None:
    async def done() -> bool:
        body = (await server.get(f"/v1/users/{user}/devices")).json()
        return bool(body["devices"]) and body["devices"][0]["acked_seq"] >= seq

    await until(done, timeout=10)


async def test_live_events_arrive_in_order_and_are_acked(node: ServerProcess, java: Any) -> None:
    user = unique()
    phone = java(user, "android")
    await phone.expect(state("CONNECTED"))
    published = [await node.publish(user, collapse="plan" if i == 1 else None) for i in range(3)]
    for p in published:
        await phone.expect(event_seq(p["seq"]))
    assert phone.events() == [p["seq"] for p in published]
    assert [line["collapse"] for line in phone.seen if "event" in line][1] == "plan"
    await acked(node, user, published[-1]["seq"])
    phone.command("push fcm-token-from-firebase-123456")

    async def registered() -> bool:
        body = (await node.get(f"/v1/users/{user}/devices")).json()
        return body["devices"][0]["push"] == {"provider": "fcm", "token": "…123456"}

    await until(registered)


async def test_a_dropped_connection_resumes_with_nothing_lost_or_repeated(
    node: ServerProcess, java: Any
) -> None:
    user = unique()
    phone = java(user, "android")
    await phone.expect(state("CONNECTED"))
    first = await node.publish(user)
    await phone.expect(event_seq(first["seq"]))
    await acked(node, user, first["seq"])
    phone.command("drop")
    await phone.expect(state("WAITING"))
    missed = [await node.publish(user) for _ in range(3)]  # while it is away
    await phone.expect(state("CONNECTED"))
    after = await node.publish(user)
    await phone.expect(event_seq(after["seq"]))
    assert phone.events() == [first["seq"], *(m["seq"] for m in missed), after["seq"]]


async def test_the_token_is_refreshed_in_band_before_it_expires(
    node: ServerProcess, java: Any, tmp_path: Path
) -> None:
    user = unique()
    phone = java(user, "android", ttl=4)
    await phone.expect(state("CONNECTED"))
    (tmp_path / "android.jwt").write_text(token(user, "android", ttl=600))
    await phone.expect(lambda line: line.get("refresh") == 1)  # at half its life
    await phone.expect(logged("token renewed until"))  # the server's auth_ok
    await asyncio.sleep(3)  # the subject: the first token's expiry passes
    late = await node.publish(user)
    await phone.expect(event_seq(late["seq"]))
    assert [line["state"] for line in phone.seen if "state" in line] == ["CONNECTING", "CONNECTED"]


async def test_a_4001_gets_a_new_token_and_reconnects(
    node: ServerProcess, java: Any, tmp_path: Path
) -> None:
    user = unique()
    phone = java(user, "android", ttl=2, in_band=False)
    await phone.expect(state("CONNECTED"))
    (tmp_path / "android.jwt").write_text(token(user, "android", ttl=600))
    await phone.expect(lambda line: line.get("refresh") == 1, timeout=10)  # on the 4001
    await phone.expect(state("CONNECTED"))
    event = await node.publish(user)
    await phone.expect(event_seq(event["seq"]))


async def test_a_4009_stops_the_client(node: ServerProcess, java: Any) -> None:
    user = unique()
    phone = java(user, "android")
    await phone.expect(state("CONNECTED"))
    other = await Device.connect(node, user, "android")  # the same device elsewhere
    stopped = await phone.expect(lambda line: "stopped" in line)
    assert "4009" in stopped["stopped"]
    # It did not reconnect: the other connection is still the device's, and gets events.
    event = await node.publish(user)
    assert (await other.event())["seq"] == event["seq"]
    await other.close()


async def test_acks_lost_with_a_connection_are_sent_on_the_next_hello(
    node: ServerProcess, java: Any
) -> None:
    user = unique()
    phone = java(user, "android", ack_delay=60_000)  # no ack before the drop
    await phone.expect(state("CONNECTED"))
    event = await node.publish(user)
    await phone.expect(event_seq(event["seq"]))
    phone.command("drop")
    await phone.expect(state("WAITING"))
    await phone.expect(state("CONNECTED"))  # resumed with after=seq: nothing comes again
    await acked(node, user, event["seq"])  # the server's cursor caught up all the same
    assert phone.events() == [event["seq"]]


async def test_a_stored_seq_beyond_the_stream_does_not_swallow_new_events(
    node: ServerProcess, java: Any
) -> None:
    user = unique()
    first = await node.publish(user)
    phone = java(user, "android", seq=first["seq"] + 1000)  # a stale or foreign local state
    resync = await phone.expect(lambda line: "resync" in line)
    assert str(first["seq"]) in resync["resync"]
    event = await node.publish(user)  # its seq is below the stored one
    await phone.expect(event_seq(event["seq"]))
    await acked(node, user, event["seq"])
    assert phone.events() == [event["seq"]]


async def test_a_bad_token_refused_again_after_a_refresh_stops_the_client(
    node: ServerProcess, java: Any, tmp_path: Path
) -> None:
    user = unique()
    phone = java(user, "android")
    await phone.expect(state("CONNECTED"))
    phone.command("disconnect")
    await phone.expect(state("IDLE"))
    (tmp_path / "android.jwt").write_text(
        token(user, "android", secret="not-the-server-secret-but-32-bytes-long")
    )
    phone.command("connect")
    stopped = await phone.expect(lambda line: "stopped" in line)
    assert stopped["stopped"] == "refused: HTTP 401 bad_token"
    assert [line["refresh"] for line in phone.seen if "refresh" in line] == [1]  # once only
    assert [line["state"] for line in phone.seen if "state" in line][-2:] == [
        "CONNECTING",
        "STOPPED",
    ]


async def test_a_push_is_a_hint_to_connect_and_fetch(node: ServerProcess, java: Any) -> None:
    user = unique()
    phone = java(user, "android")
    await phone.expect(state("CONNECTED"))
    phone.command("disconnect")  # the app went to the background
    await phone.expect(state("IDLE"))
    waiting = await node.publish(user)
    phone.command("pushed")  # what FirebaseMessagingService.onMessageReceived calls
    await phone.expect(event_seq(waiting["seq"]))
    await acked(node, user, waiting["seq"])
