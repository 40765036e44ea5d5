"""Plot training curves from one or more runs' ``metrics.jsonl`` files into a PNG.

    python launch/plot.py runs/pruned/metrics.jsonl runs/unpruned/metrics.jsonl --out curves.png
    python launch/plot.py runs/*/metrics.jsonl --metric reward/total/mean --metric eval/total/mean --out cmp.png

One row per metric, three columns: the metric against GRPO step, wall-clock minutes and images generated
(``train/images_seen``; evaluation records take the count of their step). Each run is one line, labelled by
its folder name (or ``--label``). Metric keys are listed in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rl.config_help import HelpFormatter
from rl.metrics_log import read_metrics

AXES = (("step", "GRPO step"), ("wall_min", "wall-clock (min)"), ("images", "images generated"))


def curve(records: list[dict], metric: str) -> dict[str, list[float]]:
    """``{"step", "wall_min", "images", "value"}`` lists of the records that hold ``metric``, in step order."""
    images_at = {r["step"]: r["train/images_seen"] for r in records if "train/images_seen" in r}
    points = {"step": [], "wall_min": [], "images": [], "value": []}
    for record in sorted((r for r in records if metric in r), key=lambda r: r["step"]):
        points["step"].append(record["step"])
        points["wall_min"].append(record["wall_s"] / 60)
        points["images"].append(images_at.get(record["step"], 0))  # step 0 (base eval): no image generated yet
        points["value"].append(record[metric])
    return points


def plot(paths: list[Path], metrics: list[str], out: Path, labels: list[str] | None = None) -> Path:
    """Write the figure to ``out``. Raises ValueError if no file holds any of ``metrics``."""
    labels = labels or [p.parent.name or str(p) for p in paths]
    runs = [read_metrics(p) for p in paths]
    if not any(metric in r for records in runs for r in records for metric in metrics):
        raise ValueError(f"none of {metrics} is logged in {[str(p) for p in paths]}")
    figure, axes = plt.subplots(len(metrics), len(AXES), figsize=(5 * len(AXES), 3.2 * len(metrics)), squeeze=False)
    for row, metric in enumerate(metrics):
        for records, label in zip(runs, labels):
            points = curve(records, metric)
            for column, (x, _) in enumerate(AXES):
                axes[row, column].plot(points[x], points["value"], marker=".", label=label)
        for column, (_, title) in enumerate(AXES):
            axes[row, column].set_xlabel(title)
            axes[row, column].set_ylabel(metric)
            axes[row, column].grid(alpha=0.3)
    axes[0, 0].legend()
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="metrics.jsonl files (one per run)")
    parser.add_argument(
        "--metric", action="append", help="metric key (repeatable); default: reward/total/mean and eval/total/mean"
    )
    parser.add_argument("--label", action="append", help="one label per file (default: the run folder's name)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG file to write")
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.files):
        parser.error(f"{len(args.label)} --label values for {len(args.files)} files")
    for path in args.files:
        if not path.is_file():
            parser.error(f"{path} does not exist")
    out = plot(args.files, args.metric or ["reward/total/mean", "eval/total/mean"], args.out, args.label)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
