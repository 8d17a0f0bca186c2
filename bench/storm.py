"""Reconnect storm: N devices of N users, E events each missed, all connect at once.

The server (``courier serve``, production mode, a scratch PostgreSQL ledger, Redis db 11)
records E events for each of N users while no device is connected (POSTs of 1,000
events). Then K client processes open all N connections at once (each process keeps
50 handshakes in flight, so the server sees K x 50 concurrent handshakes until every
device is in) and every device acks what it gets. Figures per run:

- storm seconds: from the first connection attempt to the last of the N x E events;
- handshakes refused (any answer but 101, or a failed connect) and their reasons;
- events out of order: an event whose seq is not the one after its device's previous;
- server log lines that name a pool or ledger fault (``QueuePool``, ``TimeoutError``,
  ``LedgerUnavailable``, ``refused``, ``1013``).

    .venv/bin/python bench/storm.py                          # N=10,000, E=10, 3 runs
    .venv/bin/python bench/storm.py --connections 2000 --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchlib
from bench.fanout import Fleet, add_connection_args, make_plans
from bench.fanout import _publish_rounds as publish_rounds

REDIS = "redis://127.0.0.1:6379/11"
FAULTS = re.compile(r"QueuePool|TimeoutError|LedgerUnavailable|refused|1013|Traceback")


@dataclass
class StormRun:
    round: int
    connections_wanted: int
    events: int
    publish_seconds: float = 0.0
    connected: int = 0
    connect_seconds: float = 0.0
    refused: dict[str, int] = field(default_factory=dict)
    frames_expected: int = 0
    frames: int = 0
    storm_seconds: float = float("nan")
    out_of_order: int = 0
    server_cpu_s: float = 0.0
    fault_lines: list[str] = field(default_factory=list)
    error: str | None = None


def run_once(args: argparse.Namespace, run: StormRun, budget: float) -> None:
    users = [f"storm-{i}" for i in range(args.connections)]
    with benchlib.courier_on_postgres(REDIS, args.workers) as (server, _):
        try:
            p0 = time.monotonic()
            asyncio.run(publish_rounds(server, users, args.events, 1000, budget))
            run.publish_seconds = time.monotonic() - p0
            plans = make_plans(
                [(u, "phone") for u in users],
                args.clients,
                server.port,
                args.connect_timeout,
                secret=server.jwt_secret,
                ack=True,
            )
            run.frames_expected = len(users) * args.events
            cpu0 = benchlib.tree_cpu_seconds(server.pid)
            with Fleet(plans) as fleet:
                hello = fleet.connect(budget)
                fleet.wait_frames(
                    run.frames_expected, min(budget, time.monotonic() + args.drain_timeout)
                )
                run.server_cpu_s = benchlib.tree_cpu_seconds(server.pid) - cpu0
                seen = fleet.collect()
            run.connected = hello["connected"]
            run.connect_seconds = hello["seconds"]
            run.refused = hello["errors"]
            run.frames = seen.frames
            run.out_of_order = seen.out_of_order
            if seen.last_recv_ns:
                run.storm_seconds = (seen.last_recv_ns - hello["started_ns"]) / 1e9
            run.fault_lines = [line for line in server.log().splitlines() if FAULTS.search(line)][
                :20
            ]
            if run.frames < run.frames_expected or run.refused:
                run.error = f"{run.frames}/{run.frames_expected} events; refused {run.refused}"
        except Exception as exc:
            run.error = server.failure(exc)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_connection_args(p, "devices, one per user")
    p.add_argument("--events", type=int, default=10, help="missed events per user (E)")
    p.add_argument("--repeat", type=int, default=3, help="runs")
    p.add_argument(
        "--workers", type=int, default=1, help="server worker processes (WEB_CONCURRENCY)"
    )
    p.add_argument("--json", type=Path, default=None, help="default: bench/results/storm-<date>")
    args = p.parse_args(argv)
    benchlib.raise_open_files_limit()
    started = datetime.now().astimezone()
    print(
        f"storm: N={args.connections} devices of as many users, {args.events} missed events"
        f" each, {args.clients} client processes, {args.workers} server process(es),"
        f" {args.repeat} runs",
        flush=True,
    )
    runs = []
    for i in range(1, max(1, args.repeat) + 1):
        run = StormRun(i, args.connections, args.events)
        run_once(args, run, time.monotonic() + args.time_budget)
        print(
            f"  run {i}: {run.connected}/{run.connections_wanted} connected in"
            f" {run.connect_seconds:.1f}s, refused {sum(run.refused.values())};"
            f" {run.frames}/{run.frames_expected} events, the last {run.storm_seconds:.2f}s"
            f" after the first connect; out of order {run.out_of_order};"
            f" server CPU {run.server_cpu_s:.1f}s; fault lines in the log"
            f" {len(run.fault_lines)}{'; ERROR ' + run.error if run.error else ''}",
            flush=True,
        )
        for line in run.fault_lines[:5]:
            print(f"    log: {line[:200]}")
        runs.append(run)
    good = [r.storm_seconds for r in runs if r.error is None]
    if good:
        print(
            f"storm seconds: median {benchlib.median(good):.2f} [{min(good):.2f}-{max(good):.2f}]"
        )
    return benchlib.finish("storm", args, started, runs)


if __name__ == "__main__":
    raise SystemExit(main())
