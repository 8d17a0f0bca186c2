"""Fan-out benchmark: idle memory per connection, frames/s, publish-to-receive latency, acks.

Starts a real server (``python -m server.cli serve``, production settings, a scratch
ledger), opens N device connections from K client processes bound to distinct loopback
source addresses (127.0.0.2, 127.0.0.3, ...), then:

(a) memory: the server's RSS (``/proc/PID/status``) before and after connecting, / N;
(b) fan-out: R rounds, each publishing one event per user through ``POST /v1/events``
    (batches of at most 1000); every device of the user receives it. Reports frames/s
    received across all clients and the latency from just before the POST to the frame
    arriving at the client (``data.t``, wall-clock microseconds, same machine);
(c) acks: every client acks every event; reports how long after the last frame the
    ledger shows every device's ``acked_seq`` at the last seq (acks are batched to the
    ledger by the server's cursor flush).

Scenarios: ``users`` (N/D users of D devices each; one event per user per round) and
``broadcast`` (few users of many devices: each event goes to N/U devices).

The clients are a minimal asyncio WebSocket client (handshake, frame parser, masked ack
frames; it offers permessage-deflate like browsers do, so ``--deflate`` takes effect),
so the client side costs little CPU: clients and server share the same machine.

    .venv/bin/python bench/fanout.py                      # both scenarios, 10k connections
    .venv/bin/python bench/fanout.py --matrix --scenario broadcast --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import os
import sys
import time
import zlib
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

import httpx
import jwt
import msgspec

from bench import benchlib

HANDSHAKE_CONCURRENCY = 50
"""Handshakes in flight per client process."""


# -- the client side (runs in the client processes) ---------------------------------------


class _Data(msgspec.Struct):
    t: int = 0


class _Frame(msgspec.Struct):
    type: str
    seq: int = 0
    data: _Data | None = None


_decode = msgspec.json.Decoder(_Frame).decode
_decode_sio_event = msgspec.json.Decoder(tuple[str, _Frame]).decode


class Stats:
    """What one client process saw; latencies in microseconds."""

    def __init__(self) -> None:
        self.frames = 0
        self.acks = 0
        self.latencies = array("q")
        self.last_recv_ns = 0
        self.closed = 0
        self.close_codes: dict[int, int] = {}
        self.out_of_order = 0
        """Events whose seq was not the one after the device's previous event."""


class Device(asyncio.Protocol):
    """One device connection: HTTP upgrade, then read frames, ack events, answer pings."""

    __slots__ = (
        "_buf",
        "_frag",
        "_frag_compressed",
        "_hello",
        "_inflate",
        "_last_seq",
        "_request",
        "_stats",
        "_transport",
        "_upgraded",
        "ack",
        "deflate",
        "open",
    )

    def __init__(
        self, request: bytes, stats: Stats, hello: asyncio.Future[None], ack: bool = True
    ) -> None:
        self._request = request
        self._stats = stats
        self._hello = hello
        self.ack = ack
        self._buf = bytearray()
        self._frag: list[bytes] | None = None
        self._frag_compressed = False
        self._inflate: Any = None
        self._last_seq = 0
        self._transport: asyncio.Transport | None = None
        self._upgraded = False
        self.deflate = False
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport.write(self._request)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.open:
            self._stats.closed += 1
        self.open = False
        if not self._hello.done():
            self._hello.set_exception(ConnectionError(f"closed before hello: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        if not self._upgraded:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(buf[:end])
            del buf[: end + 4]
            if not head.startswith(b"HTTP/1.1 101"):
                if not self._hello.done():
                    line = head.split(b"\r\n", 1)[0].decode(errors="replace")
                    self._hello.set_exception(ConnectionError(f"refused: {line}"))
                self.close()
                return
            self._upgraded = True
            self.open = True
            self.deflate = b"permessage-deflate" in head.lower()
        self._parse(time.time_ns())

    def _parse(self, now_ns: int) -> None:
        buf = self._buf
        n = len(buf)
        pos = 0
        while n - pos >= 2:
            b0 = buf[pos]
            length = buf[pos + 1] & 0x7F
            header = 2
            if length == 126:
                if n - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                header = 4
            elif length == 127:
                if n - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                header = 10
            if n - pos < header + length:
                break
            payload = bytes(buf[pos + header : pos + header + length])
            pos += header + length
            opcode = b0 & 0x0F
            if opcode in (0x1, 0x2, 0x0):
                if opcode != 0x0:
                    self._frag = []
                    self._frag_compressed = bool(b0 & 0x40)
                if self._frag is None:
                    continue
                self._frag.append(payload)
                if b0 & 0x80:  # FIN
                    message = b"".join(self._frag)
                    self._frag = None
                    if self._frag_compressed:
                        if self._inflate is None:
                            self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                        message = self._inflate.decompress(message + b"\x00\x00\xff\xff")
                    self._message(message, now_ns)
            elif opcode == 0x9:  # ping: answer with a pong carrying the same payload
                self._send(0x8A, payload)
            elif opcode == 0x8:  # close: answer and drop the connection
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self._stats.close_codes[code] = self._stats.close_codes.get(code, 0) + 1
                self._send(0x88, payload[:2])
                self.close()
                break
        del buf[:pos]

    def _message(self, message: bytes, now_ns: int) -> None:
        frame = _decode(message)
        if frame.type == "event":
            self._event(frame, now_ns)
            if self.ack:
                self._send(0x81, b'{"type":"ack","seq":%d}' % frame.seq)
                self._stats.acks += 1
        elif frame.type == "hello" and not self._hello.done():
            self._hello.set_result(None)

    def _event(self, frame: _Frame, now_ns: int) -> None:
        stats = self._stats
        stats.frames += 1
        if frame.seq and frame.seq != self._last_seq + 1:
            stats.out_of_order += 1
        self._last_seq = frame.seq
        stats.last_recv_ns = now_ns
        if frame.data is not None and frame.data.t:
            stats.latencies.append(now_ns // 1000 - frame.data.t)

    def _send(self, first: int, payload: bytes) -> None:
        # Client frames must be masked; an all-zero masking key leaves the payload as is.
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(bytes((first, 0x80 | len(payload))) + b"\0\0\0\0" + payload)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class SioDevice(Device):
    """A Socket.IO client: Engine.IO v4 over the same raw WebSocket. The server opens with
    ``0{...}``; the client connects to the default namespace with ``40{auth}`` and the
    server's ``40{"sid":...}`` is its hello. Events arrive as ``42["event",{...}]`` (the
    payload is shaped like Courier's event frame); an Engine.IO ping ``2`` gets a pong ``3``.
    Socket.IO has no delivery acks through the Redis emitter, so none are sent."""

    __slots__ = ("_auth",)

    def __init__(
        self, request: bytes, stats: Stats, hello: asyncio.Future[None], auth: bytes
    ) -> None:
        super().__init__(request, stats, hello, ack=False)
        self._auth = auth

    def _message(self, message: bytes, now_ns: int) -> None:
        if message.startswith(b"42"):
            name, frame = _decode_sio_event(message[2:])
            if name == "event":
                self._event(frame, now_ns)
        elif message == b"2":
            self._send(0x81, b"3")
        elif message.startswith(b"0"):
            self._send(0x81, b"40" + self._auth)
        elif message.startswith(b"40"):
            if not self._hello.done():
                self._hello.set_result(None)
        elif message.startswith((b"44", b"41", b"1")):  # connect error, disconnect, close
            if not self._hello.done():
                reason = message[:120].decode(errors="replace")
                self._hello.set_exception(ConnectionError(f"refused: {reason}"))
            self.close()


def _request(host: str, port: int, path: str, headers: str = "") -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        f"{headers}\r\n"
    ).encode()


SIO_PATH = "/socket.io/?EIO=4&transport=websocket"


@dataclass
class WorkerPlan:
    index: int
    source: str
    port: int
    devices: list[tuple[str, str]]
    connect_timeout: float
    secret: str = ""
    """Courier: the JWT secret the device tokens are signed with."""
    protocol: str = "courier"
    """``courier`` (/v1/ws with a device JWT) or ``socketio`` (Engine.IO v4, auth {user})."""
    ack: bool = True
    """Courier devices ack every event."""


def client_process(plan: WorkerPlan, ctrl: Connection, progress: Any) -> None:
    import uvloop

    uvloop.run(_client_main(plan, ctrl, progress))


async def _client_main(plan: WorkerPlan, ctrl: Connection, progress: Any) -> None:
    loop = asyncio.get_running_loop()
    stats = Stats()
    devices: list[Device] = []
    errors: dict[str, int] = {}
    sem = asyncio.Semaphore(HANDSHAKE_CONCURRENCY)
    exp = int(time.time()) + 3600

    def make(user: str, device: str, hello: asyncio.Future[None]) -> Device:
        if plan.protocol == "socketio":
            auth = msgspec.json.encode({"user": user})
            return SioDevice(_request("127.0.0.1", plan.port, SIO_PATH), stats, hello, auth)
        token = jwt.encode({"sub": user, "did": device, "exp": exp}, plan.secret, "HS256")
        request = _request("127.0.0.1", plan.port, "/v1/ws", f"Authorization: Bearer {token}\r\n")
        return Device(request, stats, hello, ack=plan.ack)

    async def open_one(user: str, device: str) -> None:
        hello: asyncio.Future[None] = loop.create_future()
        async with sem:
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(
                        lambda: make(user, device, hello),
                        "127.0.0.1",
                        plan.port,
                        local_addr=(plan.source, 0),
                    ),
                    plan.connect_timeout,
                )
                await asyncio.wait_for(hello, plan.connect_timeout)
                devices.append(proto)
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"[:160]
                errors[reason] = errors.get(reason, 0) + 1

    started = time.monotonic()
    started_ns = time.time_ns()
    await asyncio.gather(*(open_one(u, d) for u, d in plan.devices))
    ctrl.send(
        {
            "started_ns": started_ns,
            "connected": len(devices),
            "errors": errors,
            "seconds": time.monotonic() - started,
            "deflate": sum(1 for d in devices if d.deflate),
        }
    )

    async def report_progress() -> None:
        while True:
            progress.value = stats.frames
            await asyncio.sleep(0.05)

    reporter = asyncio.create_task(report_progress())
    try:
        while True:
            # A thread waits on the pipe, so the pipe stays blocking for large replies.
            command = await loop.run_in_executor(None, ctrl.recv)
            if command == "reset":
                stats.frames = stats.acks = 0
                stats.latencies = array("q")
                stats.last_recv_ns = 0
                ctrl.send("ok")
            elif command == "collect":
                ctrl.send(
                    {
                        "frames": stats.frames,
                        "acks": stats.acks,
                        "last_recv_ns": stats.last_recv_ns,
                        "latencies": stats.latencies.tobytes(),
                        "open": sum(1 for d in devices if d.open),
                        "close_codes": stats.close_codes,
                        "out_of_order": stats.out_of_order,
                    }
                )
            elif command == "close":
                break
    finally:
        reporter.cancel()
        for d in devices:
            d.close()
        await asyncio.sleep(0.2)
        ctrl.send("closed")


# -- the driver (parent process) ----------------------------------------------------------


@dataclass
class RunResult:
    scenario: str
    ws: str
    deflate: bool
    ledger: str
    connections_wanted: int
    connections: int
    users: int
    devices_per_user: int
    rounds: int
    connect_seconds: float = 0.0
    connect_errors: dict[str, int] = field(default_factory=dict)
    rss_before_kib: int = 0
    rss_idle_kib: int = 0
    rss_after_fanout_kib: int = 0
    kib_per_conn_idle: float = 0.0
    kib_per_conn_after_fanout: float = 0.0
    frames_expected: int = 0
    frames: int = 0
    fanout_seconds: float = 0.0
    frames_per_s: float = 0.0
    publish_seconds: float = 0.0
    server_cpu_fanout_s: float = 0.0
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    acks_sent: int = 0
    acks_counted_by_server: float = 0.0
    acks_durable_devices: int = 0
    acks_durable_after_s: float = float("nan")
    cursor_flush_failures: float = 0.0
    open_after: int = 0
    close_codes: dict[int, int] = field(default_factory=dict)
    error: str | None = None


def _plan(args: argparse.Namespace, scenario: str) -> tuple[list[tuple[str, str]], int, int]:
    n = args.connections
    if scenario == "users":
        per_user = max(1, args.devices_per_user)
    else:
        per_user = max(1, n // max(1, args.broadcast_users))
    users = max(1, (n + per_user - 1) // per_user)
    devices = [(f"u{i // per_user:06d}", f"d{i % per_user:05d}") for i in range(n)]
    return devices, users, per_user


def _recv(conn: Connection, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError(f"a client process did not answer within {timeout:.0f}s")
    return conn.recv()


def make_plans(
    devices: list[tuple[str, str]], clients: int, port: int, connect_timeout: float, **kw: Any
) -> list[WorkerPlan]:
    """Spread ``devices`` over ``clients`` processes, each on its own source address."""
    k = max(1, min(clients, len(devices)))
    return [
        WorkerPlan(
            index=i,
            source=f"127.0.0.{2 + i % 250}",
            port=port,
            devices=devices[i::k],
            connect_timeout=connect_timeout,
            **kw,
        )
        for i in range(k)
    ]


@dataclass
class Collected:
    """What every client process saw since the last reset, added up."""

    frames: int = 0
    acks: int = 0
    open: int = 0
    last_recv_ns: int = 0
    latencies: array[int] = field(default_factory=lambda: array("q"))
    close_codes: dict[int, int] = field(default_factory=dict)
    out_of_order: int = 0

    def percentiles_ms(self) -> dict[str, float]:
        """p50/p95/p99/max of the latencies, in ms (NaN without any)."""
        ordered = sorted(self.latencies)
        if not ordered:
            return {
                "p50_ms": float("nan"),
                "p95_ms": float("nan"),
                "p99_ms": float("nan"),
                "max_ms": float("nan"),
            }
        return {
            "p50_ms": benchlib.percentile(ordered, 50) / 1000,
            "p95_ms": benchlib.percentile(ordered, 95) / 1000,
            "p99_ms": benchlib.percentile(ordered, 99) / 1000,
            "max_ms": ordered[-1] / 1000,
        }


class Fleet:
    """The client processes holding the device connections, driven over pipes. Leaving the
    ``with`` block closes every connection and stops every process (killed if it lingers)."""

    def __init__(self, plans: list[WorkerPlan]) -> None:
        self.plans = plans
        self.procs: list[Any] = []
        self.ctrls: list[Connection] = []
        self.progress: list[Any] = []

    def __enter__(self) -> Fleet:
        ctx = mp.get_context("spawn")
        try:
            for plan in self.plans:
                parent, child = ctx.Pipe()
                counter = ctx.Value("q", 0, lock=False)
                proc = ctx.Process(target=client_process, args=(plan, child, counter), daemon=True)
                proc.start()
                self.procs.append(proc)
                self.ctrls.append(parent)
                self.progress.append(counter)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self, deadline: float) -> dict[str, Any]:
        """Wait for every process to have opened its connections (or given up on some)."""
        hellos = [_recv(c, max(1.0, deadline - time.monotonic())) for c in self.ctrls]
        errors: dict[str, int] = {}
        for h in hellos:
            for reason, count in h["errors"].items():
                errors[reason] = errors.get(reason, 0) + count
        return {
            "connected": sum(h["connected"] for h in hellos),
            "seconds": max(h["seconds"] for h in hellos),
            "started_ns": min(h["started_ns"] for h in hellos),
            "deflate": sum(h["deflate"] for h in hellos),
            "errors": errors,
        }

    def reset(self) -> None:
        for c in self.ctrls:
            c.send("reset")
            _recv(c, 30)

    def wait_frames(self, expected: int, deadline: float) -> None:
        """Until the clients received ``expected`` frames in all, or ``deadline``."""
        while time.monotonic() < deadline:
            if sum(p.value for p in self.progress) >= expected:
                return
            time.sleep(0.02)

    def collect(self) -> Collected:
        out = Collected()
        for c in self.ctrls:
            c.send("collect")
            s = _recv(c, 60)
            out.frames += s["frames"]
            out.acks += s["acks"]
            out.open += s["open"]
            out.last_recv_ns = max(out.last_recv_ns, s["last_recv_ns"])
            out.out_of_order += s["out_of_order"]
            chunk = array("q")
            chunk.frombytes(s["latencies"])
            out.latencies.extend(chunk)
            for code, count in s["close_codes"].items():
                out.close_codes[code] = out.close_codes.get(code, 0) + count
        return out

    def close(self) -> None:
        for c in self.ctrls:
            with contextlib.suppress(OSError):
                c.send("close")
        for c in self.ctrls:
            with contextlib.suppress(TimeoutError, EOFError, OSError):
                _recv(c, 10)
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.ctrls.clear()
        self.procs.clear()


async def _publish_rounds(
    server: benchlib.Server, users: list[str], rounds: int, batch: int, deadline: float
) -> None:
    headers = {"Authorization": f"Bearer {server.api_key}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60.0) as http:
        for r in range(rounds):
            for i in range(0, len(users), batch):
                if time.monotonic() > deadline:
                    raise TimeoutError("publishing ran past the time budget")
                t = time.time_ns() // 1000
                body = [
                    {"user": u, "kind": "bench.fanout", "data": {"t": t, "r": r}}
                    for u in users[i : i + batch]
                ]
                response = await http.post("/v1/events", content=json.dumps(body))
                if response.status_code != 201:
                    raise RuntimeError(f"publish: HTTP {response.status_code} {response.text}")


async def _durable_acks(url: str, users: int, per_user: int, seq: int, timeout: float) -> int:
    """Poll the ledger until every device's acked_seq is ``seq``; answers how many are."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    deadline = time.monotonic() + timeout
    done = 0
    try:
        while True:
            async with engine.connect() as conn:
                result = await conn.execute(
                    text("SELECT count(*) FROM devices WHERE acked_seq >= :seq"), {"seq": seq}
                )
                done = int(result.scalar_one())
            if done >= users * per_user or time.monotonic() > deadline:
                return done
            await asyncio.sleep(0.05)
    finally:
        await engine.dispose()


def run_once(args: argparse.Namespace, scenario: str, ws: str, deflate: bool) -> RunResult:
    devices, users, per_user = _plan(args, scenario)
    result = RunResult(
        scenario=scenario,
        ws=ws,
        deflate=deflate,
        ledger=args.ledger,
        connections_wanted=len(devices),
        connections=0,
        users=users,
        devices_per_user=per_user,
        rounds=args.rounds,
    )
    budget = time.monotonic() + args.time_budget
    with benchlib.Ledger(args.ledger) as ledger:
        server = benchlib.Server(
            ledger.url,
            ledger.tmp,
            ws=ws,
            deflate=deflate,
            env={
                "COURIER_SEND_QUEUE": str(max(1024, 4 * args.rounds)),
                # Every client acks every event; the per-connection frame rate limit
                # (50/s by default) would close them when rounds come back to back.
                "COURIER_RATE_LIMIT": "100000",
                "COURIER_RATE_BURST": "100000",
            },
        )
        try:
            server.start()
            time.sleep(1.0)
            result.rss_before_kib = benchlib.rss_kib(server.pid)
            plans = make_plans(
                devices, args.clients, server.port, args.connect_timeout, secret=server.jwt_secret
            )
            with Fleet(plans) as fleet:
                _fan_out(args, result, server, ledger, fleet, budget, deflate)
        except Exception as exc:
            result.error = server.failure(exc)
        finally:
            server.stop()
    return result


def connect_idle(fleet: Fleet, pid: int, deadline: float, settle: float) -> dict[str, Any]:
    """Open every connection, let them sit ``settle`` seconds, then read the server's RSS
    (``rss_idle_kib`` in the answer, with ``connected``, ``seconds``, ``errors``)."""
    hello = fleet.connect(deadline)
    if hello["connected"] == 0:
        raise RuntimeError(f"no connection opened: {hello['errors']}")
    time.sleep(settle)
    hello["rss_idle_kib"] = benchlib.rss_kib(pid)
    return hello


@dataclass
class Window:
    """The fan-out window: from just before the first publish to the last frame."""

    t0_ns: int
    publish_seconds: float
    frames_done: float
    """``time.monotonic()`` when every expected frame had arrived (or the wait ended)."""
    server_cpu_s: float
    cpu0: float
    """The server's CPU seconds just before the first publish."""


def timed_fanout(
    fleet: Fleet,
    pid: int,
    publish: Callable[[], None],
    expected: int,
    drain_timeout: float,
    deadline: float,
) -> Window:
    """Reset the clients' counters, publish, wait for ``expected`` frames; the server's CPU
    time (``/proc/PID/stat``) is sampled before the first publish and after the last frame."""
    fleet.reset()
    cpu0 = benchlib.cpu_seconds(pid)
    t0 = time.time_ns()
    p0 = time.monotonic()
    publish()
    publish_seconds = time.monotonic() - p0
    fleet.wait_frames(expected, min(deadline, time.monotonic() + drain_timeout))
    frames_done = time.monotonic()
    return Window(t0, publish_seconds, frames_done, benchlib.cpu_seconds(pid) - cpu0, cpu0)


def _fan_out(
    args: argparse.Namespace,
    result: RunResult,
    server: benchlib.Server,
    ledger: benchlib.Ledger,
    fleet: Fleet,
    budget: float,
    deflate: bool,
) -> None:
    hello = connect_idle(fleet, server.pid, budget, args.settle)
    result.connections = hello["connected"]
    result.connect_seconds = hello["seconds"]
    result.connect_errors = hello["errors"]
    if deflate and hello["deflate"] != result.connections:
        raise RuntimeError("permessage-deflate was not negotiated on every connection")
    result.rss_idle_kib = hello["rss_idle_kib"]
    result.kib_per_conn_idle = (result.rss_idle_kib - result.rss_before_kib) / result.connections

    # Only fully connected users count; with errors, some devices are missing.
    user_names = sorted({u for plan in fleet.plans for u, _ in plan.devices})
    result.frames_expected = result.connections * args.rounds
    window = timed_fanout(
        fleet,
        server.pid,
        lambda: asyncio.run(_publish_rounds(server, user_names, args.rounds, args.batch, budget)),
        result.frames_expected,
        args.drain_timeout,
        budget,
    )
    result.publish_seconds = window.publish_seconds
    result.server_cpu_fanout_s = window.server_cpu_s
    # Acks: the ledger shows every device at the last seq once the flush ran.
    durable = asyncio.run(
        _durable_acks(
            ledger.url, result.users, result.devices_per_user, args.rounds, args.ack_timeout
        )
    )
    result.acks_durable_devices = durable
    if durable >= result.connections:
        result.acks_durable_after_s = time.monotonic() - window.frames_done
    result.rss_after_fanout_kib = benchlib.rss_kib(server.pid)
    result.kib_per_conn_after_fanout = (
        result.rss_after_fanout_kib - result.rss_before_kib
    ) / result.connections

    seen = fleet.collect()
    result.frames = seen.frames
    result.acks_sent = seen.acks
    result.open_after = seen.open
    result.close_codes = seen.close_codes
    if seen.last_recv_ns:
        result.fanout_seconds = (seen.last_recv_ns - window.t0_ns) / 1e9
        result.frames_per_s = result.frames / result.fanout_seconds
    for name, value in seen.percentiles_ms().items():
        setattr(result, name, value)
    metrics = server.metrics()
    result.acks_counted_by_server = metrics.get("courier_acks_total", 0.0)
    result.cursor_flush_failures = metrics.get("courier_cursor_flush_failures_total", 0.0)


# -- reporting -------------------------------------------------------------------------------

COLUMNS = (
    ("scenario", "scenario", "{}"),
    ("ws", "--ws", "{}"),
    ("deflate", "deflate", "{}"),
    ("connections", "conns", "{}"),
    ("devices_per_user", "dev/user", "{}"),
    ("kib_per_conn_idle", "KiB/conn idle", "{:.1f}"),
    ("kib_per_conn_after_fanout", "KiB/conn after", "{:.1f}"),
    ("frames_per_s", "frames/s", "{:,.0f}"),
    ("p50_ms", "p50 ms", "{:.0f}"),
    ("p95_ms", "p95 ms", "{:.0f}"),
    ("p99_ms", "p99 ms", "{:.0f}"),
    ("acks_durable_after_s", "acks durable s", "{:.2f}"),
)
NUMERIC = (
    "connect_seconds",
    "kib_per_conn_idle",
    "kib_per_conn_after_fanout",
    "frames_per_s",
    "fanout_seconds",
    "publish_seconds",
    "server_cpu_fanout_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "max_ms",
    "acks_durable_after_s",
)


def summarize(runs: list[RunResult]) -> dict[str, Any]:
    """Median of each measured figure over the repeats of one configuration."""
    first = runs[0]
    out: dict[str, Any] = {
        "scenario": first.scenario,
        "ws": first.ws,
        "deflate": first.deflate,
        "ledger": first.ledger,
        "connections": min(r.connections for r in runs),
        "devices_per_user": first.devices_per_user,
        "users": first.users,
        "rounds": first.rounds,
        "repeats": len(runs),
        "errors": [r.error for r in runs if r.error],
    }
    for name in NUMERIC:
        out[name] = benchlib.median([float(getattr(r, name)) for r in runs])
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        cells.append([fmt.format(row[key]) for key, _, fmt in COLUMNS])
    print_cells(cells)


def print_cells(cells: list[list[str]], label_column: bool = False) -> None:
    """A text table: the first row is the header; columns right-aligned, except the first
    one with ``label_column``."""
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    for i, r in enumerate(cells):
        line = [c.rjust(w) for c, w in zip(r, widths, strict=True)]
        if label_column:
            line[0] = r[0].ljust(widths[0])
        print("  ".join(line))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def print_run(r: RunResult) -> None:
    print(
        f"  run {r.scenario} ws={r.ws} deflate={r.deflate}: {r.connections}/"
        f"{r.connections_wanted} connected in {r.connect_seconds:.1f}s,"
        f" {r.kib_per_conn_idle:.1f} KiB/conn idle, {r.kib_per_conn_after_fanout:.1f} after;"
        f" {r.frames}/{r.frames_expected} frames in {r.fanout_seconds:.2f}s"
        f" = {r.frames_per_s:,.0f}/s (publish {r.publish_seconds:.2f}s, server CPU"
        f" {r.server_cpu_fanout_s:.2f}s); p50/p95/p99 {r.p50_ms:.0f}/{r.p95_ms:.0f}/"
        f"{r.p99_ms:.0f} ms; acks sent {r.acks_sent}, counted {r.acks_counted_by_server:.0f},"
        f" durable {r.acks_durable_devices} devices after {r.acks_durable_after_s:.2f}s,"
        f" flush failures {r.cursor_flush_failures:.0f}; open after {r.open_after}",
        flush=True,
    )
    print_problems(r)


def print_problems(r: Any) -> None:
    """A run's connect errors, close codes and error, one line each, if any."""
    if r.connect_errors:
        print(f"    connect errors: {r.connect_errors}", flush=True)
    if r.close_codes:
        print(f"    close codes: {r.close_codes}", flush=True)
    if r.error:
        print(f"    ERROR: {r.error}", flush=True)


def add_connection_args(p: argparse.ArgumentParser, what: str) -> None:
    """The options every device-connection benchmark shares."""
    p.add_argument("--connections", type=int, default=10_000, help=f"{what} (N)")
    p.add_argument("--clients", type=int, default=4, help="client processes (K)")
    p.add_argument("--settle", type=float, default=3.0, help="seconds before the idle RSS")
    p.add_argument("--connect-timeout", type=float, default=60.0)
    p.add_argument("--drain-timeout", type=float, default=120.0, help="wait for frames, s")
    p.add_argument("--time-budget", type=float, default=600.0, help="seconds per run, at most")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_connection_args(p, "device connections")
    p.add_argument("--scenario", choices=("users", "broadcast", "both"), default="both")
    p.add_argument("--devices-per-user", type=int, default=2, help="'users' scenario: D")
    p.add_argument("--broadcast-users", type=int, default=10, help="'broadcast' scenario: U")
    p.add_argument("--rounds", type=int, default=10, help="events per user (R)")
    p.add_argument("--batch", type=int, default=1000, help="events per POST (at most 1000)")
    p.add_argument("--ws", choices=benchlib.WS_IMPLEMENTATIONS, default="courier")
    p.add_argument("--deflate", action="store_true", help="COURIER_WS_DEFLATE=true")
    p.add_argument(
        "--matrix", action="store_true", help="every --ws implementation, deflate off and on"
    )
    p.add_argument("--ledger", choices=("sqlite", "postgres"), default="sqlite")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    p.add_argument("--ack-timeout", type=float, default=30.0, help="wait for durable acks, s")
    p.add_argument("--json", type=Path, default=None, help="write results to this file")
    args = p.parse_args(argv)
    if not 1 <= args.batch <= 1000:
        p.error("--batch must be 1-1000")

    limit = benchlib.raise_open_files_limit()
    if args.connections + 100 > limit:
        print(
            f"bench: warning: {args.connections} connections need as many sockets in the"
            f" server process; its open-files limit is {limit}",
            file=sys.stderr,
        )
    scenarios = ["users", "broadcast"] if args.scenario == "both" else [args.scenario]
    if args.matrix:
        configs = [(ws, d) for ws in benchlib.WS_IMPLEMENTATIONS for d in (False, True)]
    else:
        configs = [(args.ws, args.deflate)]
    info = benchlib.machine()
    print(
        f"fanout: {info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']},"
        f" open files {limit}; N={args.connections} from {args.clients} client processes,"
        f" R={args.rounds}, ledger={args.ledger}, repeats={args.repeat}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    all_runs: list[dict[str, Any]] = []
    for scenario in scenarios:
        for ws, deflate in configs:
            runs = []
            for _ in range(max(1, args.repeat)):
                r = run_once(args, scenario, ws, deflate)
                print_run(r)
                runs.append(r)
                all_runs.append(asdict(r))
            rows.append(summarize(runs))
    print()
    print_table(rows)
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "args": vars(args) | {"json": str(args.json)},
                    "summary": rows,
                    "runs": all_runs,
                },
                indent=2,
                default=str,
            )
        )
    failed = any(row["errors"] for row in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
