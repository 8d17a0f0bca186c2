"""PNG figures from benchmark results (matplotlib, the ``bench`` extra: ``make bench``
installs it).

- ``compare-*.json`` (bench/compare.py): frames per server CPU-second per system and
  round, RSS per idle connection, and the latency percentiles (p50/p95/p99/max) per
  system and round;
- ``soak-*.json`` (bench/soak.py): the server's RSS over the publishing window.

    .venv/bin/python bench/plots.py bench/results/compare-<date>.json --out docs/img
    .venv/bin/python bench/plots.py bench/results/soak-<date>.json --out docs/img

Each figure is written as ``<out>/<results file stem>-<figure>.png``; the paths are printed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

COLORS = {"courier": "#1f77b4", "socketio": "#ff7f0e"}
NAMES = {"courier": "Courier", "socketio": "Socket.IO"}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare_figures(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    plt = _pyplot()
    runs = [r for r in results["runs"] if r.get("error") is None]
    systems = [s for s in ("courier", "socketio") if any(r["system"] == s for r in runs)]
    rounds = sorted({r["round"] for r in runs})
    written: list[Path] = []
    title = (
        f"N={results['args']['connections']:,} devices of one user,"
        f" {results['args']['events']} single-event publishes"
    )

    def bars(field: str, label: str, name: str) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(systems))
        for k, system in enumerate(systems):
            values = [
                next((r[field] for r in runs if r["system"] == system and r["round"] == n), 0)
                for n in rounds
            ]
            xs = [n + (k - (len(systems) - 1) / 2) * width for n in rounds]
            ax.bar(xs, values, width, label=NAMES[system], color=COLORS[system])
        ax.set_xticks(rounds, [f"round {n}" for n in rounds])
        ax.set_ylabel(label)
        ax.set_title(title, fontsize=9)
        ax.legend()
        written.append(_save(plt, fig, out / f"{stem}-{name}.png"))

    bars("frames_per_cpu_s", "frames per server CPU-second", "frames-per-cpu")
    bars("kib_per_conn_idle", "RSS per idle connection, KiB", "memory")

    fig, ax = plt.subplots(figsize=(7, 4))
    marks = ("p50_ms", "p95_ms", "p99_ms", "max_ms")
    for system in systems:
        for n, r in enumerate(r for r in runs if r["system"] == system):
            ax.plot(
                range(len(marks)),
                [r[m] for m in marks],
                marker="o",
                color=COLORS[system],
                alpha=0.8,
                label=NAMES[system] if n == 0 else None,
            )
    ax.set_xticks(range(len(marks)), ["p50", "p95", "p99", "max"])
    ax.set_yscale("log")
    ax.set_ylabel("publish to device, ms (log)")
    ax.set_title(f"latency per round; {title}", fontsize=9)
    ax.legend()
    written.append(_save(plt, fig, out / f"{stem}-latency.png"))
    return written


def soak_figures(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    plt = _pyplot()
    written: list[Path] = []
    for n, run in enumerate(results["runs"]):
        samples = run.get("samples") or []
        if not samples:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([t / 60 for t, _ in samples], [v / 1024 for _, v in samples], marker=".")
        ax.set_xlabel("minutes of publishing")
        ax.set_ylabel("server RSS, MiB")
        ax.set_ylim(bottom=0)
        ax.set_title(
            f"{run['connected']:,} connections in one process, {run['rate']:g} publishes/s",
            fontsize=9,
        )
        written.append(_save(plt, fig, out / f"{stem}-rss{'' if n == 0 else f'-{n + 1}'}.png"))
    return written


def figures(results_path: Path, out: Path) -> list[Path]:
    """The figures of one results file (by its name: ``compare-`` or ``soak-``)."""
    results = json.loads(results_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    stem = results_path.stem
    if stem.startswith("compare"):
        return compare_figures(results, out, stem)
    if stem.startswith("soak"):
        return soak_figures(results, out, stem)
    raise SystemExit(f"plots: no figures for {results_path.name} (compare-* or soak-* only)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("results", type=Path, nargs="+", help="results JSON files")
    p.add_argument("--out", type=Path, default=Path("docs/img"), help="folder for the PNGs")
    args = p.parse_args(argv)
    for path in args.results:
        for written in figures(path, args.out):
            print(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
