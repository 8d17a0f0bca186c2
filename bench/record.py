"""The ledger's cost per publish, alone: ``Ledger.record`` of a batch of B new events
(B = 1 by default: a single-event publish; a group commit merges several), N times in a
row, on a scratch PostgreSQL (no server, no HTTP): the floor under the durable publish
latency. Each run measures both paths: the one statement that records new events without
collapse keys, and the general transaction (a collapse key on every event forces it).
Figures: the wall time per record (p50, p99, mean) and this process's CPU per record.

    .venv/bin/python bench/record.py                    # 2,000 records of 1 event
    .venv/bin/python bench/record.py --batch 32 --records 500
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchlib
from models.ledger import Ledger, NewEvent


async def measure(url: str, n: int, batch: int, full_path: bool) -> tuple[list[float], float]:
    """Wall ms of each record, and this process's CPU seconds over them all."""
    ledger = Ledger.from_url(url)
    times: list[float] = []
    try:
        cpu0 = time.process_time()
        for i in range(n):
            events = [
                NewEvent(
                    id=f"r-{uuid.uuid4().hex}",
                    user=f"u{(i * batch + j) % 100}",
                    kind="k",
                    data="{}",
                    # A collapse key takes the general path (lookup, allocate, insert,
                    # supersede).
                    collapse=f"c{i}-{j}" if full_path else None,
                )
                for j in range(batch)
            ]
            started = time.perf_counter()
            await ledger.record(events)
            times.append((time.perf_counter() - started) * 1000)
        cpu = time.process_time() - cpu0
    finally:
        await ledger.close()
    return times, cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--batch", type=int, default=1, help="events per record (B)")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with benchlib.Ledger("postgres") as scratch:
        for r in range(args.repeat):
            for full in (False, True):
                ms, cpu = asyncio.run(measure(scratch.url, args.records, args.batch, full))
                ms.sort()
                p50, p99 = ms[len(ms) // 2], ms[int(len(ms) * 0.99)]
                path = "general transaction" if full else "one statement"
                print(
                    f"run {r + 1} {path}, {args.batch} event(s) per record: p50 {p50:.2f} ms,"
                    f" p99 {p99:.2f} ms, mean {statistics.fmean(ms):.2f} ms over {len(ms)}"
                    f" records; CPU {cpu / len(ms) * 1000:.2f} ms per record",
                    flush=True,
                )


if __name__ == "__main__":
    main()
