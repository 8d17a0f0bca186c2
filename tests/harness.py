"""Real parts for tests: a Courier server in its own process and WebSocket devices.

Nothing here fakes the network: the server is ``python -m server.cli serve`` on a
free loopback port, and devices are ``websockets`` clients over real sockets.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import jwt
from websockets.asyncio.client import ClientConnection, connect
from websockets.typing import Data

from tests.specs import FrameMismatch, check_frame

ROOT = Path(__file__).resolve().parent.parent
JWT_SECRET = "test-secret-" + uuid.uuid4().hex
API_KEY = "test-key-" + uuid.uuid4().hex
OPS_TOKEN = "test-ops-" + uuid.uuid4().hex


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThreadServer:
    """An ASGI app served by uvicorn in a thread of its own on 127.0.0.1.

    The socket listens before uvicorn runs, so the port takes connections from the moment
    this object exists (they wait in the backlog): there is nothing to wait for. A handler
    that must not answer awaits :meth:`hold`; :meth:`stop` lets those go first.
    """

    def __init__(self, app: Any, port: int = 0) -> None:
        import threading

        import uvicorn

        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", port))
        self.socket.listen(128)
        self.port = int(self.socket.getsockname()[1])
        self._held: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._released = False
        self._lock = threading.Lock()
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def hold(self) -> None:
        """In a handler: wait until the server stops (a request never answered)."""
        event = asyncio.Event()
        with self._lock:
            if self._released:
                return
            self._held.append((asyncio.get_running_loop(), event))
        await event.wait()

    def stop(self) -> None:
        with self._lock:
            self._released, held, self._held = True, self._held, []
        for loop, event in held:
            loop.call_soon_threadsafe(event.set)
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()
        if self.thread.is_alive():
            raise RuntimeError("the test server's thread did not stop")


def unique(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def token(
    user: str, device: str, ttl: float = 3600, secret: str = JWT_SECRET, **claims: Any
) -> str:
    body: dict[str, Any] = {"sub": user, "did": device, "exp": int(time.time() + ttl)}
    body.update(claims)
    return jwt.encode(body, secret, algorithm="HS256")


UNLIMITED = {
    "COURIER_HANDSHAKE_RATE": "1000000",
    "COURIER_HANDSHAKE_BURST": "1000000",
    "COURIER_AUTH_FAIL_RATE": "1000000",
    "COURIER_AUTH_FAIL_BURST": "1000000",
    "COURIER_RECONNECT_RATE": "1000000",
    "COURIER_RECONNECT_BURST": "1000000",
    "COURIER_MAX_DEVICES_PER_USER": "0",
}


def upgrade_request(path: str = "/v1/ws", method: str = "GET", headers: str = "") -> bytes:
    """The head of a WebSocket upgrade request, as bytes for a raw socket; ``headers``
    are more header lines, each ending in CRLF."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        f"{headers}\r\n"
    ).encode()


class ServerProcess:
    """``courier serve`` in a subprocess, on its own port, logging to a file."""

    def __init__(
        self,
        database_url: str,
        workdir: Path,
        redis_url: str | None = None,
        env: dict[str, str] | None = None,
        workers: int | None = 1,
        args: Sequence[str] = (),
        log_level: str = "info",
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.workdir = workdir
        self.workers = workers
        self.args = list(args)
        self.log_level = log_level
        self.log_path = workdir / f"server-{self.port}.log"
        self.env = {
            **os.environ,
            "COURIER_ENV": "production",
            "COURIER_DATABASE_URL": database_url,
            "COURIER_JWT_SECRET": JWT_SECRET,
            "COURIER_API_KEYS": API_KEY,
            "COURIER_OPS_TOKEN": OPS_TOKEN,
            "COURIER_DRAIN_SECONDS": "3",
            "PYTHONUNBUFFERED": "1",
            # Every test client comes from 127.0.0.1: the abuse limits are tested on their
            # own (tests/test_limits.py) and out of the way everywhere else.
            **UNLIMITED,
            **({"COURIER_REDIS_URL": redis_url} if redis_url else {}),
            **(env or {}),
        }
        self.env.pop("COURIER_PORT", None)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> ServerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--port",
                str(self.port),
                *(["--workers", str(self.workers)] if self.workers else []),
                "--log-level",
                self.log_level,
                *self.args,
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill() reaches every worker
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling a process that has no other readiness signal
        self.kill()
        raise RuntimeError(f"server not ready within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 20.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL the server and every worker process it started."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)

    # -- HTTP helpers -------------------------------------------------------------------

    async def post(
        self,
        body: Any,
        key: str = API_KEY,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=15) as http:
            h = {"Authorization": f"Bearer {key}", **(headers or {})}
            if raw is not None:
                return await http.post("/v1/events", content=raw, headers=h)
            return await http.post("/v1/events", json=body, headers=h)

    async def publish(
        self, user: str, kind: str = "block.grabbed", **fields: Any
    ) -> dict[str, Any]:
        response = await self.post({"user": user, "kind": kind, **fields})
        assert response.status_code in (200, 201), response.text
        result: dict[str, Any] = response.json()
        return result

    async def publish_many(self, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        response = await self.post(events)
        assert response.status_code in (200, 201), response.text
        result: list[dict[str, Any]] = response.json()
        return result

    async def get(self, path: str, key: str = API_KEY) -> httpx.Response:
        async with httpx.AsyncClient(base_url=self.url, timeout=15) as http:
            return await http.get(path, headers={"Authorization": f"Bearer {key}"} if key else {})


BREACHES: list[FrameMismatch] = []
"""Every frame a device received that broke docs/asyncapi.yaml; the test that received it
fails even if it swallowed the error (tests/conftest.py checks this after each test)."""


class CheckedConnection(ClientConnection):
    """A client connection that checks every message the server sends against the frame
    schema of its ``type`` in docs/asyncapi.yaml (closed: no undocumented field)."""

    async def recv(self, decode: bool | None = None) -> Data:  # type: ignore[override]
        message = await super().recv(decode)
        try:
            check_frame(message)
        except FrameMismatch as exc:
            BREACHES.append(exc)
            raise
        return message


class Device:
    """One phone: a WebSocket connection that reads frames and acks. Every frame it gets
    is checked against docs/asyncapi.yaml (``CheckedConnection``)."""

    def __init__(self, ws: ClientConnection, hello: dict[str, Any]) -> None:
        self.ws = ws
        self.hello = hello

    @classmethod
    async def connect(
        cls,
        server: ServerProcess,
        user: str,
        device: str,
        after: int | None = None,
        tok: str | None = None,
        via_query: bool = False,
        **kwargs: Any,
    ) -> Device:
        tok = token(user, device) if tok is None else tok  # "" sends no token at all
        params = []
        if after is not None:
            params.append(f"after={after}")
        headers = {}
        if via_query and tok:
            params.append(f"token={tok}")
        elif tok:
            headers["Authorization"] = f"Bearer {tok}"
        query = ("?" + "&".join(params)) if params else ""
        ws = await connect(
            f"{server.ws_url}/v1/ws{query}",
            additional_headers=headers,
            open_timeout=10,
            create_connection=CheckedConnection,
            **kwargs,
        )
        hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
        assert hello["type"] == "hello", hello
        return cls(ws, hello)

    async def frame(self, timeout: float = 10.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: dict[str, Any] = json.loads(raw)
        return frame

    async def event(self, timeout: float = 10.0) -> dict[str, Any]:
        frame = await self.frame(timeout)
        assert frame["type"] == "event", frame
        return frame

    async def events(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        async def take() -> list[dict[str, Any]]:
            return [await self.event(timeout) for _ in range(n)]

        return await asyncio.wait_for(take(), timeout)

    async def ack(self, seq: int) -> None:
        await self.ws.send(json.dumps({"type": "ack", "seq": seq}))

    async def send(self, frame: Any) -> None:
        await self.ws.send(frame if isinstance(frame, (str, bytes)) else json.dumps(frame))

    async def close(self) -> None:
        """Hang up, as a phone does: frames not read yet are dropped.

        They must be read meanwhile: past ``max_queue`` unread frames (16 by default) the
        client library stops reading the socket, so it would never see the server's close
        frame behind them and ``close()`` would wait out its ``close_timeout`` (10 s)."""
        from websockets.exceptions import ConnectionClosed

        async def drop_unread() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await self.ws.recv()

        reader = asyncio.create_task(drop_unread())
        try:
            await self.ws.close()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def closed_with(self, timeout: float = 15.0) -> int:
        """Read (and drop) frames until the server closes; answers the close code."""
        from websockets.exceptions import ConnectionClosed

        async def until_closed() -> int:
            try:
                while True:
                    await self.ws.recv()
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else 1006

        return await asyncio.wait_for(until_closed(), timeout)


async def until(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> None:
    """Poll an external state (a database row, an HTTP answer) that has no event to await."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)
