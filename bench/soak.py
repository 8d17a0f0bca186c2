"""Soak: N connections in ONE server process, steady publishing, RSS sampled over time.

``courier serve`` (one process, production mode, a scratch PostgreSQL ledger, Redis db
14) holds N device connections (U users of N/U devices each, from K client processes on
their own loopback source addresses; every device acks what it gets). The benchmark
then publishes single-event ``POST /v1/events`` at R per second, round-robin over the
users, for M minutes, and samples the server's RSS every S seconds.

Figures: connections held, RSS after connecting, RSS at the first and the last sample
of the publishing window and its least-squares slope (KiB per minute, over the second
half of the window, after the heap has warmed), frames expected and received, and
connections still open at the end. The process's open-files limit bounds N: about
19,000 of the 20,000 here, the rest for the ledger, Redis and the listening socket.

    .venv/bin/python bench/soak.py                                # N=19,000, 30 min
    .venv/bin/python bench/soak.py --connections 2000 --minutes 1 --sample 5
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

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchlib
from bench.fanout import Fleet, add_connection_args, connect_idle, make_plans

REDIS = "redis://127.0.0.1:6379/14"


@dataclass
class SoakRun:
    connections_wanted: int
    users: int
    rate: float
    minutes: float
    connected: int = 0
    connect_seconds: float = 0.0
    refused: dict[str, int] = field(default_factory=dict)
    rss_before_kib: int = 0
    rss_idle_kib: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s since start, KiB)
    rss_first_kib: int = 0
    rss_last_kib: int = 0
    rss_max_kib: int = 0
    slope_kib_per_min: float = float("nan")
    events: int = 0
    frames_expected: int = 0
    frames: int = 0
    open_at_end: int = 0
    server_cpu_s: float = 0.0
    error: str | None = None


def slope_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time (KiB per minute)."""
    if len(samples) < 2:
        return float("nan")
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    if var == 0:
        return float("nan")
    return sum((t - mx) * (v - my) for t, v in samples) / var * 60


async def publish_steadily(
    server: benchlib.Server, users: list[str], run: SoakRun, sample_every: float
) -> None:
    """Publish at ``run.rate`` for ``run.minutes`` (open loop, one request in flight per
    tick) and sample the server's RSS every ``sample_every`` seconds."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    seconds = run.minutes * 60
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=30.0) as http:
        t0 = time.monotonic()
        next_sample = t0
        i = 0
        while True:
            now = time.monotonic()
            if now - t0 >= seconds:
                break
            if now >= next_sample:
                run.samples.append((round(now - t0, 1), benchlib.rss_kib(server.pid)))
                next_sample += sample_every
            due = t0 + i / run.rate
            if due > now:
                await asyncio.sleep(due - now)
            body = {"user": users[i % len(users)], "kind": "bench.soak", "data": {"i": i}}
            response = await http.post("/v1/events", content=json.dumps(body))
            if response.status_code != 201:
                raise RuntimeError(f"publish: HTTP {response.status_code} {response.text}")
            i += 1
        run.samples.append((round(time.monotonic() - t0, 1), benchlib.rss_kib(server.pid)))
        run.events = i


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_connection_args(p, "device connections")
    p.set_defaults(connections=19_000, time_budget=7200.0)
    p.add_argument("--users", type=int, default=1_900, help="users (U); N/U devices each")
    p.add_argument("--rate", type=float, default=20.0, help="single-event publishes per s (R)")
    p.add_argument("--minutes", type=float, default=30.0, help="publishing time (M)")
    p.add_argument("--sample", type=float, default=30.0, help="seconds between RSS samples")
    p.add_argument("--json", type=Path, default=None, help="default: bench/results/soak-<date>")
    args = p.parse_args(argv)
    benchlib.raise_open_files_limit()
    started = datetime.now().astimezone()
    per_user = max(1, args.connections // args.users)
    users = [f"soak-{u}" for u in range(args.users)]
    devices = [(u, f"d{d}") for u in users for d in range(per_user)]
    run = SoakRun(len(devices), len(users), args.rate, args.minutes)
    print(
        f"soak: N={len(devices)} connections ({len(users)} users x {per_user} devices) in one"
        f" server process, {args.rate:g} publishes/s for {args.minutes:g} min,"
        f" {args.clients} client processes",
        flush=True,
    )
    budget = time.monotonic() + args.time_budget
    with benchlib.courier_on_postgres(REDIS) as (server, _):
        try:
            run.rss_before_kib = benchlib.rss_kib(server.pid)
            plans = make_plans(
                devices, args.clients, server.port, args.connect_timeout, secret=server.jwt_secret
            )
            with Fleet(plans) as fleet:
                hello = connect_idle(fleet, server.pid, budget, args.settle)
                run.connected = hello["connected"]
                run.connect_seconds = hello["seconds"]
                run.refused = hello["errors"]
                run.rss_idle_kib = hello["rss_idle_kib"]
                print(
                    f"  {run.connected}/{len(devices)} connected in {run.connect_seconds:.1f}s;"
                    f" RSS {run.rss_before_kib / 1024:.0f} -> {run.rss_idle_kib / 1024:.0f} MiB",
                    flush=True,
                )
                fleet.reset()
                cpu0 = benchlib.cpu_seconds(server.pid)
                asyncio.run(publish_steadily(server, users, run, args.sample))
                run.frames_expected = run.events * per_user
                fleet.wait_frames(run.frames_expected, min(budget, time.monotonic() + 60))
                run.server_cpu_s = benchlib.cpu_seconds(server.pid) - cpu0
                seen = fleet.collect()
                run.frames = seen.frames
                run.open_at_end = seen.open
        except Exception as exc:
            run.error = server.failure(exc)
    if run.samples:
        kib = [v for _, v in run.samples]
        run.rss_first_kib, run.rss_last_kib, run.rss_max_kib = kib[0], kib[-1], max(kib)
        run.slope_kib_per_min = slope_per_minute(run.samples[len(run.samples) // 2 :])
    print(
        f"  published {run.events} events; {run.frames}/{run.frames_expected} frames;"
        f" open at the end {run.open_at_end}; server CPU {run.server_cpu_s:.1f}s\n"
        f"  RSS while publishing: first {run.rss_first_kib / 1024:.1f} MiB, last"
        f" {run.rss_last_kib / 1024:.1f} MiB, max {run.rss_max_kib / 1024:.1f} MiB; slope over"
        f" the second half {run.slope_kib_per_min:+.1f} KiB/min"
        f"{'; ERROR ' + run.error if run.error else ''}",
        flush=True,
    )
    return benchlib.finish("soak", args, started, [run])


if __name__ == "__main__":
    raise SystemExit(main())
