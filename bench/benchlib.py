"""Shared parts of the benchmarks: a scratch ledger, a real server process, small statistics.

Nothing here is faked: the server is ``python -m server.cli serve`` in its own process
on a free loopback port, with a ledger made for the run and removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import resource
import secrets
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tests.harness import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres", "database": "postgres"}
WS_IMPLEMENTATIONS = ("courier", "websockets-sansio", "websockets", "wsproto")


def raise_open_files_limit() -> int:
    """Soft open-files limit up to the hard one (inherited by the server and client processes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    return int(soft)


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[1],
    }


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and of its live descendants (a server's worker processes)."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += cpu_seconds(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return total


def percentile(sorted_values: Sequence[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return float(sorted_values[k])


def save_results(
    name: str, path: Path | None, started: datetime, args: Any, fields: dict[str, Any]
) -> Path:
    """Write a run's results as JSON: ``path``, or ``bench/results/<name>-<started>.json``;
    with the start time, the machine and the arguments. Answers the path written."""
    path = path or ROOT / "bench" / "results" / f"{name}-{started:%Y%m%d-%H%M%S}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "started": started.isoformat(timespec="seconds"),
        "machine": machine(),
        "args": vars(args) | {"json": str(path)},
        **fields,
    }
    path.write_text(json.dumps(body, indent=2, default=str) + "\n")
    return path


def finish(name: str, args: Any, started: datetime, runs: Sequence[Any]) -> int:
    """Save the runs (dataclasses with an ``error``), say where; the exit status: 1 if any
    run failed."""
    path = save_results(name, args.json, started, args, {"runs": [asdict(r) for r in runs]})
    print(f"{name}: results in {path}")
    if name == "soak":
        plot(path)
    return 1 if any(r.error for r in runs) else 0


def plot(results: Path) -> None:
    """The results' PNG figures (bench/plots.py), beside the results file; a hint instead
    when matplotlib is missing (``make bench`` installs it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("plots: matplotlib is not installed (pip install -e '.[bench]'); no figures")
        return
    from bench import plots

    for written in plots.figures(results, results.parent):
        print(f"plots: {written}")


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return float(statistics.median(clean)) if clean else float("nan")


def _failure(exc: BaseException, alive: bool, log: Callable[[], str]) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if alive else f"{text}\nserver log:\n{log()}"


class Ledger:
    """A scratch ledger: a SQLite file in a temporary folder, or a PostgreSQL database."""

    def __init__(self, kind: str) -> None:
        if kind not in ("sqlite", "postgres"):
            raise ValueError(f"unknown ledger {kind!r}")
        self.kind = kind
        self.tmp = Path(tempfile.mkdtemp(prefix="courier-bench-"))
        self.pg_name = f"courier_bench_{os.getpid()}_{secrets.token_hex(3)}"
        if kind == "sqlite":
            self.url = f"sqlite+aiosqlite:///{self.tmp / 'ledger.db'}"
        else:
            self.url = (
                f"postgresql+asyncpg://{PG_ADMIN['user']}@{PG_ADMIN['host']}:{PG_ADMIN['port']}"
                f"/{self.pg_name}"
            )

    def __enter__(self) -> Ledger:
        if self.kind == "postgres":
            asyncio.run(self._pg(f'CREATE DATABASE "{self.pg_name}"'))
        try:
            from models.ledger import migrate

            migrate(self.url)
        except BaseException:
            self.drop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop()

    def drop(self) -> None:
        if self.kind == "postgres":
            try:
                asyncio.run(self._pg(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)'))
            except Exception as exc:
                print(f"bench: could not drop {self.pg_name}: {exc}", file=sys.stderr)
        shutil.rmtree(self.tmp, ignore_errors=True)

    async def _pg(self, sql: str) -> None:
        import asyncpg

        conn = await asyncpg.connect(**PG_ADMIN)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()


class Server(ServerProcess):
    """``courier serve`` for a benchmark: the test harness's server process, with the
    WebSocket implementation and deflate chosen, fresh secrets, and Redis only when
    ``redis_url`` is given (never one inherited from the environment)."""

    def __init__(
        self,
        database_url: str,
        workdir: Path,
        ws: str = "courier",
        deflate: bool = False,
        env: dict[str, str] | None = None,
        redis_url: str | None = None,
        workers: int = 1,
    ) -> None:
        self.jwt_secret = secrets.token_urlsafe(32)
        self.api_key = "bench-" + secrets.token_urlsafe(16)
        self.ops_token = "ops-" + secrets.token_urlsafe(16)
        super().__init__(
            database_url,
            workdir,
            env={
                "COURIER_JWT_SECRET": self.jwt_secret,
                "COURIER_API_KEYS": self.api_key,
                "COURIER_OPS_TOKEN": self.ops_token,
                "COURIER_WS_DEFLATE": "true" if deflate else "false",
                "COURIER_DRAIN_SECONDS": "2",
                # Load comes from one address and thousands of devices of one user.
                "COURIER_HANDSHAKE_RATE": "1000000",
                "COURIER_HANDSHAKE_BURST": "1000000",
                "COURIER_RECONNECT_RATE": "1000000",
                "COURIER_RECONNECT_BURST": "1000000",
                "COURIER_MAX_DEVICES_PER_USER": "0",
                **(env or {}),
            },
            args=["--ws", ws],
            log_level="warning",
            workers=workers,
        )
        for name in ("PORT", "COURIER_REDIS_URL", "REDIS_URL", "WEB_CONCURRENCY"):
            self.env.pop(name, None)
        if redis_url is not None:
            self.env["COURIER_REDIS_URL"] = redis_url

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return super().log()[-4000:]

    def failure(self, exc: BaseException) -> str:
        """What went wrong in a run, with the end of the server's log if it died."""
        return _failure(exc, self.alive(), self.log)

    def stop(self, timeout: float = 15.0) -> int | None:  # type: ignore[override]
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            return super().stop(timeout)
        return None

    def metrics(self) -> dict[str, float]:
        """The server's Prometheus counters and gauges (unlabelled ones), by name."""
        text = httpx.get(f"{self.url}/metrics", timeout=10.0).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or "{" in line or " " not in line:
                continue
            name, _, value = line.partition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
        return out


class Poster:
    """One kept-alive HTTP/1.1 connection that POSTs publish bodies and reads the answers:
    a minimal client, so that the load generator's own CPU stays small next to the
    server's (httpx costs about as much per request as the server does)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: str):
        self.reader, self.writer = reader, writer
        self.head = (
            f"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}"
            "\r\nContent-Type: application/json\r\nContent-Length: "
        ).encode()

    @classmethod
    async def open(cls, port: int, key: str) -> Poster:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, key)

    async def post(self, body: bytes) -> tuple[int, bytes]:
        """The answer's status and body."""
        self.writer.write(self.head + b"%d\r\n\r\n" % len(body) + body)
        status = int((await self.reader.readuntil(b"\r\n")).split(b" ", 2)[1])
        length = 0
        while (line := await self.reader.readuntil(b"\r\n")) != b"\r\n":
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def courier_on_postgres(redis_url: str, workers: int = 1) -> Iterator[tuple[Server, Ledger]]:
    """A production-mode ``courier serve`` (``workers`` processes) on a scratch PostgreSQL
    ledger and its own Redis db (flushed before and after); stopped when the block ends."""
    flush_redis_db(redis_url)
    try:
        with Ledger("postgres") as ledger:
            server = Server(ledger.url, ledger.tmp, redis_url=redis_url, workers=workers)
            try:
                server.start()
                yield server, ledger
            finally:
                server.stop()
    finally:
        flush_redis_db(redis_url)


def flush_redis_db(url: str) -> None:
    """FLUSHDB on the benchmark's own Redis database, named by the db number in ``url``
    (``redis://127.0.0.1:6379/10``); db 0 and URLs without a db are refused."""
    import redis

    db = url.rstrip("/").rsplit("/", 1)[-1]
    if not db.isdigit() or int(db) == 0:
        raise ValueError(f"a benchmark flushes only its own numbered Redis db, not {url!r}")
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        client.flushdb()
    finally:
        client.close()


class LineProcess:
    """A helper process that talks in lines: commands on its stdin, answers on its stdout,
    stderr to ``log_path``. It runs in its own process group; every read is bounded, and
    leaving the ``with`` block ends it (SIGTERM, then SIGKILL for the whole group)."""

    def __init__(self, argv: Sequence[str], log_path: Path, cwd: Path = ROOT) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""

    def __enter__(self) -> LineProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                cwd=self.cwd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def failure(self, exc: BaseException) -> str:
        """What went wrong in a run, with the end of the process's log if it died."""
        return _failure(exc, self.alive(), self.log)

    def send(self, line: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def readline(self, timeout: float) -> str:
        """The next line of its stdout, without the newline; TimeoutError after ``timeout``
        seconds, EOFError if it exited."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.argv[:2]}: no line within {timeout:.0f}s: {self.log()}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise EOFError(f"{self.argv[:2]} exited: {self.log()}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode(errors="replace").rstrip("\r")

    def expect(self, prefix: str, timeout: float) -> str:
        """Read lines until one starts with ``prefix`` (within ``timeout`` in all)."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.readline(max(0.0, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
