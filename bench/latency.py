"""Durable publish-to-device latency at a fixed publish rate.

N devices of N users (one each) stay connected to ``courier serve`` (production mode, a
scratch PostgreSQL ledger, Redis db 12) and ack what they get. A publisher sends
single-event publishes at a fixed rate R for D seconds, round-robin over the users:

- ``http``: ``POST /v1/events`` over C kept-alive connections (a minimal HTTP/1.1
  client, so the load generator's own CPU stays small); a publish answers after the
  PostgreSQL commit.
- ``stream``: ``XADD courier:ingest * event <json>``; the server acknowledges the entry
  after the commit.

The schedule is open-loop: event i is due at t0 + i/R and its ``data.t`` is that due
time, so a publisher that falls behind (no free connection, a slow answer) shows up in
the latency instead of hiding it. Figures: latency from the due time to the device's
receipt (p50/p99/max over every event), the publish rate achieved (events / time from
the first due time to the last answer), and the HTTP answer time.

    .venv/bin/python bench/latency.py                       # N=1,000, R=500/s, 10 s, both
    .venv/bin/python bench/latency.py --mode http --rate 1000 --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchlib
from bench.fanout import Fleet, add_connection_args, connect_idle, make_plans

REDIS = "redis://127.0.0.1:6379/12"


@dataclass
class LatencyRun:
    mode: str
    round: int
    connections: int
    rate: float
    seconds: float
    events: int = 0
    achieved_rate: float = float("nan")
    frames: int = 0
    p50_ms: float = float("nan")
    p95_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    answer_p50_ms: float = float("nan")
    answer_p99_ms: float = float("nan")
    late_p99_ms: float = float("nan")
    """How late the publisher itself sent (the load generator's share of the latency)."""
    server_cpu_s: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    error: str | None = None


async def _publish(
    args: argparse.Namespace, server: benchlib.Server, users: list[str], run: LatencyRun
) -> list[float]:
    """Publish on the open-loop schedule; answers the HTTP answer times in ms."""
    total = int(args.rate * args.seconds)
    answers: list[float] = []
    redis_client = None
    pool: asyncio.Queue[benchlib.Poster] = asyncio.Queue()
    if run.mode == "http":
        for _ in range(args.publishers):
            pool.put_nowait(await benchlib.Poster.open(server.port, server.api_key))
    else:
        import redis.asyncio as aioredis

        redis_client = aioredis.Redis.from_url(REDIS)
    tasks: set[asyncio.Task[None]] = set()
    last_answer = 0.0

    late: list[float] = []

    async def one(i: int, due_us: int, due: float) -> None:
        nonlocal last_answer
        body = json.dumps(
            {"user": users[i % len(users)], "kind": "bench.latency", "data": {"t": due_us}}
        ).encode()
        started = time.monotonic()
        try:
            if redis_client is not None:
                late.append((time.monotonic() - due) * 1000)
                await redis_client.xadd("courier:ingest", {"event": body})
            else:
                conn = await pool.get()
                late.append((time.monotonic() - due) * 1000)
                try:
                    status, _ = await conn.post(body)
                finally:
                    pool.put_nowait(conn)
                if status != 201:
                    run.errors[str(status)] = run.errors.get(str(status), 0) + 1
        except Exception as exc:
            reason = type(exc).__name__
            run.errors[reason] = run.errors.get(reason, 0) + 1
            return
        now = time.monotonic()
        answers.append((now - started) * 1000)
        last_answer = max(last_answer, now)

    t0 = time.monotonic()
    wall0_us = time.time_ns() // 1000
    for i in range(total):
        due = t0 + i / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(i, wall0_us + int(i / args.rate * 1e6), due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    run.events = total
    if late:
        run.late_p99_ms = sorted(late)[min(len(late) - 1, int(len(late) * 0.99))]
    if last_answer:
        run.achieved_rate = total / (last_answer - t0)
    while not pool.empty():
        pool.get_nowait().close()
    if redis_client is not None:
        await redis_client.aclose()
    return answers


def run_once(args: argparse.Namespace, run: LatencyRun, budget: float) -> None:
    users = [f"lat-{i}" for i in range(args.connections)]
    with benchlib.courier_on_postgres(REDIS) as (server, _):
        try:
            plans = make_plans(
                [(u, "phone") for u in users],
                args.clients,
                server.port,
                args.connect_timeout,
                secret=server.jwt_secret,
                ack=True,
            )
            with Fleet(plans) as fleet:
                connect_idle(fleet, server.pid, budget, args.settle)
                fleet.reset()
                cpu0 = benchlib.cpu_seconds(server.pid)
                answers = asyncio.run(_publish(args, server, users, run))
                fleet.wait_frames(run.events, min(budget, time.monotonic() + args.drain_timeout))
                run.server_cpu_s = benchlib.cpu_seconds(server.pid) - cpu0
                seen = fleet.collect()
            run.frames = seen.frames
            for name, value in seen.percentiles_ms().items():
                setattr(run, name, value)
            if answers:
                ordered = sorted(answers)
                run.answer_p50_ms = ordered[len(ordered) // 2]
                run.answer_p99_ms = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            if run.frames < run.events or run.errors:
                run.error = f"{run.frames}/{run.events} events; errors {run.errors}"
        except Exception as exc:
            run.error = server.failure(exc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_connection_args(p, "devices, one per user")
    p.set_defaults(connections=1000)
    p.add_argument("--mode", choices=("http", "stream", "both"), default="both")
    p.add_argument("--rate", type=float, default=500.0, help="single-event publishes per s")
    p.add_argument("--seconds", type=float, default=10.0, help="publishing time, s")
    p.add_argument("--publishers", type=int, default=32, help="HTTP connections (C)")
    p.add_argument("--repeat", type=int, default=3, help="runs per mode")
    p.add_argument("--json", type=Path, default=None, help="default: bench/results/latency-<date>")
    args = p.parse_args(argv)
    benchlib.raise_open_files_limit()
    modes = ("http", "stream") if args.mode == "both" else (args.mode,)
    started = datetime.now().astimezone()
    print(
        f"latency: N={args.connections} devices of as many users, {args.rate:g} single-event"
        f" publishes/s for {args.seconds:g}s, modes {', '.join(modes)}, {args.repeat} runs",
        flush=True,
    )
    runs = []
    for i in range(1, max(1, args.repeat) + 1):
        for mode in modes:
            run = LatencyRun(mode, i, args.connections, args.rate, args.seconds)
            run_once(args, run, time.monotonic() + args.time_budget)
            print(
                f"  run {i} {mode}: {run.frames}/{run.events} events at"
                f" {run.achieved_rate:,.0f}/s; latency p50/p95/p99/max {run.p50_ms:.1f}/"
                f"{run.p95_ms:.1f}/{run.p99_ms:.1f}/{run.max_ms:.1f} ms; answer p50/p99"
                f" {run.answer_p50_ms:.1f}/{run.answer_p99_ms:.1f} ms; sent late p99"
                f" {run.late_p99_ms:.1f} ms; server CPU"
                f" {run.server_cpu_s:.1f}s{'; ERROR ' + run.error if run.error else ''}",
                flush=True,
            )
            runs.append(run)
    for mode in modes:
        good = [r for r in runs if r.mode == mode and r.error is None]
        if good:
            p99 = [r.p99_ms for r in good]
            p50 = [r.p50_ms for r in good]
            print(
                f"{mode}: p50 median {benchlib.median(p50):.1f} ms, p99 median"
                f" {benchlib.median(p99):.1f} ms [{min(p99):.1f}-{max(p99):.1f}]"
            )
    return benchlib.finish("latency", args, started, runs)


if __name__ == "__main__":
    raise SystemExit(main())
