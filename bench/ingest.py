"""Ingest benchmark: events/s recorded into the ledger through ``POST /v1/events``.

Starts a real server (production settings, a scratch ledger, no device connected) and
publishes for a bounded time with C concurrent HTTP publishers, each sending batches of
B events (B = 1, 100, 1000 by default) spread over U users. A publish answers only once
the batch is committed, so events/s is what the ledger makes durable. Run on SQLite and
on PostgreSQL (a scratch database ``courier_bench_*``, dropped afterwards).

    .venv/bin/python bench/ingest.py                       # sqlite and postgres, B=1,100,1000
    .venv/bin/python bench/ingest.py --ledger postgres --batches 1000 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchlib


@dataclass
class IngestResult:
    ledger: str
    batch: int
    concurrency: int
    users: int
    events: int = 0
    requests: int = 0
    seconds: float = 0.0
    events_per_s: float = 0.0
    request_p50_ms: float = float("nan")
    request_p99_ms: float = float("nan")
    server_cpu_s: float = 0.0
    publishes_per_commit: float = float("nan")
    """Publishes that shared a ledger transaction, on average (group commit)."""
    error: str | None = None


async def _publish(
    server: benchlib.Server,
    batch: int,
    concurrency: int,
    users: int,
    duration: float,
    max_events: int,
) -> tuple[int, int, float, list[float]]:
    """Publish until ``duration`` seconds or ``max_events``; answers events, requests, s, lat."""
    counter = itertools.count()
    latencies: list[float] = []
    sent = 0
    requests = 0
    posters = [await benchlib.Poster.open(server.port, server.api_key) for _ in range(concurrency)]
    try:
        start = time.monotonic()
        stop_at = start + duration

        async def publisher(http: benchlib.Poster) -> None:
            nonlocal sent, requests
            while time.monotonic() < stop_at and sent < max_events:
                body = []
                for _ in range(batch):
                    i = next(counter)
                    body.append(
                        {"user": f"u{i % users:06d}", "kind": "bench.ingest", "data": {"i": i}}
                    )
                t = time.monotonic()
                status, answer = await http.post(json.dumps(body).encode())
                latencies.append(time.monotonic() - t)
                if status != 201:
                    raise RuntimeError(f"publish: HTTP {status} {answer[:300]!r}")
                sent += batch
                requests += 1

        await asyncio.gather(*(publisher(p) for p in posters))
        return sent, requests, time.monotonic() - start, latencies
    finally:
        for p in posters:
            p.close()


def run_once(args: argparse.Namespace, ledger_kind: str, batch: int) -> IngestResult:
    result = IngestResult(ledger_kind, batch, args.concurrency, args.users)
    with benchlib.Ledger(ledger_kind) as ledger:
        server = benchlib.Server(ledger.url, ledger.tmp)
        try:
            server.start()
            cpu0 = benchlib.cpu_seconds(server.pid)
            events, requests, seconds, lat = asyncio.run(
                _publish(
                    server, batch, args.concurrency, args.users, args.duration, args.max_events
                )
            )
            result.server_cpu_s = benchlib.cpu_seconds(server.pid) - cpu0
            counts = server.metrics()
            commits = counts.get("courier_publish_commits_total", 0.0)
            if commits:
                result.publishes_per_commit = (
                    counts.get("courier_publish_commit_publishes_total", 0.0) / commits
                )
            result.events, result.requests, result.seconds = events, requests, seconds
            result.events_per_s = events / seconds if seconds else 0.0
            lat.sort()
            result.request_p50_ms = benchlib.percentile(lat, 50) * 1000
            result.request_p99_ms = benchlib.percentile(lat, 99) * 1000
        except Exception as exc:
            result.error = server.failure(exc)
        finally:
            server.stop()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ledger", choices=("sqlite", "postgres", "both"), default="both")
    p.add_argument("--batches", default="1,100,1000", help="events per POST, comma-separated")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent publishers (C)")
    p.add_argument("--users", type=int, default=1000, help="events spread over U users")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per run, at most")
    p.add_argument("--max-events", type=int, default=200_000, help="events per run, at most")
    p.add_argument("--repeat", type=int, default=1, help="runs per configuration (median)")
    p.add_argument("--json", type=Path, default=None, help="write results to this file")
    args = p.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if not batches or not all(1 <= b <= 1000 for b in batches):
        p.error("--batches: whole numbers from 1 to 1000")
    ledgers = ["sqlite", "postgres"] if args.ledger == "both" else [args.ledger]
    info = benchlib.machine()
    print(
        f"ingest: {info['cpus']} CPUs ({info['cpu_model']}), Python {info['python']};"
        f" C={args.concurrency}, U={args.users}, {args.duration:g}s per run,"
        f" repeats={args.repeat}",
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    for ledger_kind in ledgers:
        for batch in batches:
            results = []
            for _ in range(max(1, args.repeat)):
                r = run_once(args, ledger_kind, batch)
                print(
                    f"  run {ledger_kind} batch={batch}: {r.events} events in {r.seconds:.2f}s"
                    f" = {r.events_per_s:,.0f}/s ({r.requests} requests, p50"
                    f" {r.request_p50_ms:.1f} ms, p99 {r.request_p99_ms:.1f} ms, server CPU"
                    f" {r.server_cpu_s:.1f}s, {r.publishes_per_commit:.1f} publishes per"
                    " commit)" + (f"\n    ERROR: {r.error}" if r.error else ""),
                    flush=True,
                )
                results.append(r)
                runs.append(asdict(r))
            rows.append(
                {
                    "ledger": ledger_kind,
                    "batch": batch,
                    "concurrency": args.concurrency,
                    "repeats": len(results),
                    "events_per_s": benchlib.median([r.events_per_s for r in results]),
                    "request_p50_ms": benchlib.median([r.request_p50_ms for r in results]),
                    "request_p99_ms": benchlib.median([r.request_p99_ms for r in results]),
                    "errors": [r.error for r in results if r.error],
                }
            )
    print()
    header = f"{'ledger':>8}  {'batch':>5}  {'events/s':>9}  {'req p50 ms':>10}  {'req p99 ms':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['ledger']:>8}  {row['batch']:>5}  {row['events_per_s']:>9,.0f}"
            f"  {row['request_p50_ms']:>10.1f}  {row['request_p99_ms']:>10.1f}"
        )
    if args.json is not None:
        payload = {"machine": info, "args": vars(args) | {"json": str(args.json)}}
        args.json.write_text(json.dumps(payload | {"summary": rows, "runs": runs}, indent=2))
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
