"""Plots for docs/PERFORMANCE.md from benchmark JSON, in one command.

    python -m benchmarks.plots bench-results/ docs/images/

Draws seconds per image against batch size, one line per `fast_path` variant (eager against compiled),
for every generator result file found (generator.json on the CPU, generator-cuda.json on a GPU).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def series(report: dict) -> dict[str, list[tuple[int, float]]]:
    """variant -> [(batch, seconds per image)] from a generator report's fast_path section."""
    out = {}
    for name, row in (report.get("fast_path") or {}).get("variants", {}).items():
        points = [(p["batch"], p["seconds_per_image"]) for p in row.get("sweep", [])]
        if points:
            out[name] = sorted(points)
    return out


def label(variant: str) -> str:
    mode, *flags = variant.split("+")
    name = "eager" if mode == "off" else f"compiled ({mode})"
    return " + ".join([name, *flags])


def plot(report: dict, title: str, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(report)
    if not data:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, points in data.items():
        style = "-" if name.startswith("off") else "--"
        ax.plot([b for b, _ in points], [s for _, s in points], style, marker="o", label=label(name))
    ax.set_xlabel("batch size (images)")
    ax.set_ylabel("seconds per image")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({b for points in data.values() for b, _ in points}))
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="folder of benchmark JSON (bench-results/)")
    p.add_argument("out", type=Path, help="folder for the images (docs/images/)")
    args = p.parse_args(argv)
    written = []
    for path in sorted(args.results.glob("generator*.json")):
        report = json.loads(path.read_text())
        machine = report.get("machine", {})
        where = machine.get("cuda") or f"CPU ({machine.get('processor', '?')})"
        fast = report.get("fast_path") or {}
        title = f"{path.stem}: {where}, {fast.get('size')}², {fast.get('steps')} steps"
        target = args.out / f"{path.stem}-seconds-per-image.png"
        if plot(report, title, target):
            written.append(target)
            print(target)
    if not written:
        print(f"no fast_path results in {args.results}/generator*.json")
    return written


if __name__ == "__main__":
    main()
