"""Courier against Socket.IO 4.8: fan-out of single-event publishes to the devices of one user.

Scenario: one user (one room) with N connected devices (sockets), E single-event publishes
(default 10), no acks. With ``--acks`` every Courier device acks every event (Socket.IO's
devices still do not: the Redis emitter has no delivery acks), and Courier's CPU window
runs until the ledger shows every device's ack durable, so the acks' whole cost counts.

- Courier: ``courier serve`` in production mode on a scratch PostgreSQL ledger and Redis
  db 10 (``COURIER_REDIS_URL``); E requests ``POST /v1/events``, each with one event for
  the user, one after the other.
- Socket.IO: ``bench/socketio/server.js`` (one Node process, WebSocket transport only,
  ``@socket.io/redis-adapter`` on Redis db 9 with its own channel prefix; each socket
  joins its user's room) and ``bench/socketio/emit.js`` (``@socket.io/redis-emitter``,
  one emit per event to the room, driven over stdin).

The devices are the fan-out benchmark's client processes (bench/fanout.py): K processes,
each on its own loopback source address; Socket.IO devices speak Engine.IO v4 over the
same raw WebSocket client. Every payload carries ``data.t``, the wall-clock time in
microseconds just before the publish (the POST, or the emit).

Figures per run, the same for both systems:

- frames per server CPU-second: frames received by all clients / the server process's CPU
  time (``/proc/PID/stat`` utime + stime) from just before the first publish to the last
  frame. Courier's server process also records the events in its ledger; Socket.IO's
  publisher is a separate process, as the Redis emitter is meant to be used.
- RSS per idle connection: server ``VmRSS`` after connecting and ``--settle`` seconds idle,
  minus before connecting, / N.
- latency p50/p99: arrival - ``data.t``, over every frame.

The systems alternate (Courier, Socket.IO, Courier, ...) for ``--repeat`` rounds; the
summary gives each system's median and range and the Courier/Socket.IO ratio (median and
range of the per-round ratios). Results go to ``bench/results/compare-<date>.json``.

    .venv/bin/python bench/compare.py                       # N=10,000, 3 rounds (make bench)
    .venv/bin/python bench/compare.py --connections 2000 --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchlib
from bench.fanout import (
    Fleet,
    WorkerPlan,
    add_connection_args,
    connect_idle,
    make_plans,
    print_cells,
    print_problems,
    timed_fanout,
)
from bench.fanout import _durable_acks as durable_acks
from bench.fanout import _publish_rounds as publish_rounds
from tests.harness import free_port

SYSTEMS = ("courier", "socketio")
NAMES = {"courier": "Courier", "socketio": "Socket.IO"}
COURIER_REDIS = "redis://127.0.0.1:6379/10"
SIO_REDIS = "redis://127.0.0.1:6379/9"
SIO_KEY = "courier-bench-sio"
"""Channel prefix of the Socket.IO adapter and emitter (pub/sub channels are not per db)."""
SIO_DIR = benchlib.ROOT / "bench" / "socketio"
SIO_PACKAGES = ("socket.io", "@socket.io/redis-adapter", "@socket.io/redis-emitter", "redis")


@dataclass
class Run:
    system: str
    round: int
    connections_wanted: int
    events: int
    connections: int = 0
    connect_seconds: float = 0.0
    connect_errors: dict[str, int] = field(default_factory=dict)
    rss_before_kib: int = 0
    rss_idle_kib: int = 0
    kib_per_conn_idle: float = float("nan")
    frames_expected: int = 0
    frames: int = 0
    publish_seconds: float = 0.0
    server_cpu_s: float = 0.0
    frames_per_cpu_s: float = float("nan")
    fanout_seconds: float = 0.0
    frames_per_s: float = float("nan")
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    open_after: int = 0
    close_codes: dict[int, int] = field(default_factory=dict)
    acks_sent: int = 0
    acks_durable_after_s: float = float("nan")
    error: str | None = None


# -- the Socket.IO peer ------------------------------------------------------------------


def ensure_socketio() -> dict[str, str]:
    """Node and the peer's packages (``npm ci`` when node_modules is missing); answers the
    installed versions from package-lock.json."""
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        raise SystemExit("compare: the Socket.IO peer needs Node.js and npm; node/npm not on PATH")
    if not (SIO_DIR / "node_modules" / "socket.io").is_dir():
        print("compare: npm ci --prefix bench/socketio", flush=True)
        subprocess.run(
            [npm, "ci", "--prefix", str(SIO_DIR), "--no-audit", "--no-fund"],
            check=True,
            timeout=600,
        )
    lock = json.loads((SIO_DIR / "package-lock.json").read_text())["packages"]
    versions = {name: lock[f"node_modules/{name}"]["version"] for name in SIO_PACKAGES}
    versions["node"] = subprocess.run(
        ["node", "--version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    return versions


# -- one run of one system ---------------------------------------------------------------


def _devices(n: int) -> tuple[str, list[tuple[str, str]]]:
    """N devices of one user; a fresh user name per run (pub/sub channels span Redis dbs)."""
    user = f"bench-{secrets.token_hex(4)}"
    return user, [(user, f"d{i:05d}") for i in range(n)]


def _measure(
    args: argparse.Namespace,
    run: Run,
    pid: int,
    plans: list[WorkerPlan],
    publish: Callable[[], None],
    budget: float,
    durable_acks: Callable[[], bool] | None = None,
) -> None:
    time.sleep(1.0)
    run.rss_before_kib = benchlib.rss_kib(pid)
    with Fleet(plans) as fleet:
        hello = connect_idle(fleet, pid, budget, args.settle)
        run.connections = hello["connected"]
        run.connect_seconds = hello["seconds"]
        run.connect_errors = hello["errors"]
        run.rss_idle_kib = hello["rss_idle_kib"]
        run.kib_per_conn_idle = (run.rss_idle_kib - run.rss_before_kib) / run.connections
        run.frames_expected = run.connections * run.events
        window = timed_fanout(fleet, pid, publish, run.frames_expected, args.drain_timeout, budget)
        run.publish_seconds = window.publish_seconds
        run.server_cpu_s = window.server_cpu_s
        if durable_acks is not None:
            # Until every ack is durable: the CPU of reading and writing them all counts.
            if durable_acks():
                run.acks_durable_after_s = time.monotonic() - window.frames_done
            run.server_cpu_s = benchlib.cpu_seconds(pid) - window.cpu0
        seen = fleet.collect()
    run.frames = seen.frames
    run.acks_sent = seen.acks
    run.open_after = seen.open
    run.close_codes = seen.close_codes
    if run.server_cpu_s > 0:
        run.frames_per_cpu_s = run.frames / run.server_cpu_s
    if seen.last_recv_ns:
        run.fanout_seconds = (seen.last_recv_ns - window.t0_ns) / 1e9
        run.frames_per_s = run.frames / run.fanout_seconds
    for name, value in seen.percentiles_ms().items():
        setattr(run, name, value)
    if run.frames < run.frames_expected or run.connect_errors:
        run.error = (
            f"{run.frames}/{run.frames_expected} frames; connect errors {run.connect_errors}"
        )
    elif durable_acks is not None and run.acks_durable_after_s != run.acks_durable_after_s:
        run.error = "not every device's last ack was durable within --ack-timeout"


def run_courier(args: argparse.Namespace, run: Run, budget: float) -> None:
    user, devices = _devices(args.connections)
    benchlib.flush_redis_db(COURIER_REDIS)
    try:
        with benchlib.Ledger("postgres") as ledger:
            server = benchlib.Server(ledger.url, ledger.tmp, redis_url=COURIER_REDIS)
            try:
                server.start()
                plans = make_plans(
                    devices,
                    args.clients,
                    server.port,
                    args.connect_timeout,
                    secret=server.jwt_secret,
                    ack=args.acks,
                )

                def durable() -> bool:
                    done = asyncio.run(
                        durable_acks(ledger.url, 1, len(devices), run.events, args.ack_timeout)
                    )
                    return done >= len(devices)

                _measure(
                    args,
                    run,
                    server.pid,
                    plans,
                    lambda: asyncio.run(publish_rounds(server, [user], run.events, 1, budget)),
                    budget,
                    durable if args.acks else None,
                )
            except Exception as exc:
                run.error = server.failure(exc)
            finally:
                server.stop()
    finally:
        benchlib.flush_redis_db(COURIER_REDIS)


def run_socketio(args: argparse.Namespace, run: Run, budget: float) -> None:
    user, devices = _devices(args.connections)
    benchlib.flush_redis_db(SIO_REDIS)
    tmp = Path(tempfile.mkdtemp(prefix="courier-bench-sio-"))
    port = free_port()
    server = benchlib.LineProcess(
        ["node", "server.js", str(port), SIO_REDIS, SIO_KEY], tmp / "server.log", cwd=SIO_DIR
    )
    emitter = benchlib.LineProcess(
        ["node", "emit.js", SIO_REDIS, SIO_KEY], tmp / "emit.log", cwd=SIO_DIR
    )

    def publish() -> None:
        for seq in range(1, run.events + 1):
            if time.monotonic() > budget:
                raise TimeoutError("publishing ran past the time budget")
            emitter.send(f"{user} {seq}")
            emitter.expect(f"sent {seq}", 30)

    try:
        with server, emitter:
            try:
                server.expect("ready", 30)
                emitter.expect("ready", 30)
                plans = make_plans(
                    devices, args.clients, port, args.connect_timeout, protocol="socketio"
                )
                _measure(args, run, server.pid, plans, publish, budget)
            except Exception as exc:
                run.error = server.failure(exc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        benchlib.flush_redis_db(SIO_REDIS)


RUNNERS = {"courier": run_courier, "socketio": run_socketio}


# -- summary ---------------------------------------------------------------------------------

FIGURES = (
    ("frames_per_cpu_s", "frames per server CPU-second", "{:,.0f}"),
    ("kib_per_conn_idle", "RSS per idle connection, KiB", "{:.1f}"),
    ("p50_ms", "latency p50, ms", "{:.0f}"),
    ("p99_ms", "latency p99, ms", "{:.0f}"),
    ("server_cpu_s", "server CPU in the fan-out window, s", "{:.2f}"),
    ("frames_per_s", "frames/s (wall clock)", "{:,.0f}"),
    ("connect_seconds", "connect N devices, s", "{:.1f}"),
)


def _spread(values: list[float]) -> dict[str, Any]:
    clean = [v for v in values if v == v]
    return {
        "median": benchlib.median(clean),
        "min": min(clean, default=float("nan")),
        "max": max(clean, default=float("nan")),
        "values": values,
    }


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Per figure: each system's median and range over its good runs, and the median and
    range of the per-round ratios Courier/Socket.IO (rounds where both runs were good)."""
    good = {s: {r.round: r for r in runs if r.system == s and r.error is None} for s in SYSTEMS}
    both = sorted(set(good["courier"]) & set(good["socketio"]))
    out: dict[str, Any] = {}
    for name, _, _ in FIGURES:
        row = {s: _spread([float(getattr(r, name)) for r in good[s].values()]) for s in SYSTEMS}
        ratios = []
        for i in both:
            c, s = getattr(good["courier"][i], name), getattr(good["socketio"][i], name)
            ratios.append(c / s if s else float("nan"))
        row["ratio"] = _spread(ratios)
        out[name] = row
    return out


def _cell(spread: dict[str, Any], fmt: str) -> str:
    if spread["median"] != spread["median"]:
        return "n/a"
    return (
        f"{fmt.format(spread['median'])} [{fmt.format(spread['min'])}-{fmt.format(spread['max'])}]"
    )


def print_summary(summary: dict[str, Any]) -> None:
    cells = [["figure", "Courier median [range]", "Socket.IO median [range]", "Courier/Socket.IO"]]
    for name, title, fmt in FIGURES:
        row = summary[name]
        cells.append(
            [
                title,
                _cell(row["courier"], fmt),
                _cell(row["socketio"], fmt),
                _cell(row["ratio"], "{:.2f}"),
            ]
        )
    print_cells(cells, label_column=True)


def print_run(r: Run) -> None:
    print(
        f"  round {r.round} {NAMES[r.system]}: {r.connections}/{r.connections_wanted} connected"
        f" in {r.connect_seconds:.1f}s, {r.kib_per_conn_idle:.1f} KiB/conn idle;"
        f" {r.frames}/{r.frames_expected} frames in {r.fanout_seconds:.2f}s"
        f" (publish {r.publish_seconds:.2f}s), server CPU {r.server_cpu_s:.2f}s ="
        f" {r.frames_per_cpu_s:,.0f} frames/CPU-s; p50/p95/p99 {r.p50_ms:.0f}/{r.p95_ms:.0f}/"
        f"{r.p99_ms:.0f} ms; open after {r.open_after}",
        flush=True,
    )
    print_problems(r)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_connection_args(p, "devices of the one user")
    p.add_argument("--events", type=int, default=10, help="single-event publishes (E)")
    p.add_argument("--repeat", type=int, default=3, help="rounds of Courier then Socket.IO")
    p.add_argument("--acks", action="store_true", help="Courier devices ack every event")
    p.add_argument("--ack-timeout", type=float, default=30.0, help="wait for durable acks, s")
    p.add_argument(
        "--systems", choices=("both", *SYSTEMS), default="both", help="run only one side"
    )
    p.add_argument(
        "--json", type=Path, default=None, help="default: bench/results/compare-<date>.json"
    )
    args = p.parse_args(argv)
    systems = SYSTEMS if args.systems == "both" else (args.systems,)

    versions = ensure_socketio() if "socketio" in systems else {}
    limit = benchlib.raise_open_files_limit()
    if args.connections + 100 > limit:
        print(f"compare: warning: open-files limit {limit} < N + 100", file=sys.stderr)
    info = benchlib.machine()
    started = datetime.now().astimezone()
    print(
        f"compare: {info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']},"
        f" {versions or 'Courier only'}; N={args.connections} devices of one user from"
        f" {args.clients} client processes, {args.events} single-event publishes,"
        f" {'Courier devices ack every event' if args.acks else 'no acks'},"
        f" {args.repeat} rounds",
        flush=True,
    )
    runs: list[Run] = []
    for i in range(1, max(1, args.repeat) + 1):
        for system in systems:
            run = Run(system, i, args.connections, args.events)
            RUNNERS[system](args, run, time.monotonic() + args.time_budget)
            print_run(run)
            runs.append(run)
    summary = summarize(runs)
    print()
    print_summary(summary)
    path = benchlib.save_results(
        "compare",
        args.json,
        started,
        args,
        {"socketio": versions, "summary": summary, "runs": [asdict(r) for r in runs]},
    )
    print(f"\ncompare: results in {path}")
    benchlib.plot(path)
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
