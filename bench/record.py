"""The ledger's cost per single-event publish, alone: ``Ledger.record`` of one event, N
times in a row, on a scratch PostgreSQL (no server, no HTTP): the floor under the durable
publish latency. ``--full-path`` forces the general multi-statement transaction that a
batch takes, for comparison with the one-statement path of a lone event.

    .venv/bin/python bench/record.py                    # 2,000 records, both paths
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


async def measure(url: str, n: int, full_path: bool) -> list[float]:
    ledger = Ledger.from_url(url)
    times: list[float] = []
    try:
        for i in range(n):
            event = NewEvent(id=f"r-{uuid.uuid4().hex}", user=f"u{i % 100}", kind="k", data="{}")
            # A collapse key takes the general path (lookup, allocate, insert, supersede).
            if full_path:
                event = NewEvent(event.id, event.user, event.kind, event.data, collapse=f"c{i}")
            started = time.perf_counter()
            await ledger.record([event])
            times.append((time.perf_counter() - started) * 1000)
    finally:
        await ledger.close()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with benchlib.Ledger("postgres") as scratch:
        for r in range(args.repeat):
            for full in (False, True):
                ms = sorted(asyncio.run(measure(scratch.url, args.records, full)))
                p50, p99 = ms[len(ms) // 2], ms[int(len(ms) * 0.99)]
                path = "general transaction" if full else "lone-event statement"
                print(
                    f"run {r + 1} {path}: p50 {p50:.2f} ms, p99 {p99:.2f} ms,"
                    f" mean {statistics.fmean(ms):.2f} ms over {len(ms)} records"
                )


if __name__ == "__main__":
    main()
