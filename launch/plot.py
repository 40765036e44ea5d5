"""Plot training curves from one or more runs' ``metrics.jsonl`` files into a PNG.

    python launch/plot.py runs/pruned/metrics.jsonl runs/unpruned/metrics.jsonl --out curves.png
    python launch/plot.py runs/*/metrics.jsonl --metric reward/total/mean --metric eval/total/mean --out cmp.png

One row per metric, three columns: the metric against GRPO step, wall-clock minutes and images generated
(``train/images_seen``; evaluation records take the count of their step). Each run is one line, labelled by
its folder name (or ``--label``). Metric keys are listed in docs/metrics.md.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from rl.config_help import HelpFormatter
from rl.metrics_log import read_metrics
from rl.user_errors import run_cli

DEFAULT_METRICS = ["reward/total/mean", "eval/total/mean"]
AXES = (("step", "GRPO step"), ("wall_min", "wall-clock (min)"), ("images", "images generated"))


def curve(records: list[dict], metric: str) -> dict[str, list[float]]:
    """``{"step", "wall_min", "images", "value"}`` lists of the records that hold ``metric``, in step order."""
    seen = sorted((r["step"], r["train/images_seen"]) for r in records if "train/images_seen" in r)
    steps, images = [0] + [step for step, _ in seen], [0] + [count for _, count in seen]  # step 0: none generated
    points = {"step": [], "wall_min": [], "images": [], "value": []}
    for record in sorted((r for r in records if metric in r), key=lambda r: r["step"]):
        points["step"].append(record["step"])
        points["wall_min"].append(record["wall_s"] / 60)
        # between two logged steps (log_every not dividing eval_every), read in proportion
        points["images"].append(float(np.interp(record["step"], steps, images)))
        points["value"].append(record[metric])
    return points


def suggestions(runs: list[list[dict]], metrics: list[str]) -> str:
    """``"; did you mean ...?"``: the logged keys closest to each of ``metrics`` (or a few logged keys)."""
    logged = sorted({key for records in runs for r in records for key in r} - {"step", "wall_s"})
    close = [key for metric in metrics for key in difflib.get_close_matches(metric, logged, n=3)]
    if close:
        return f"; did you mean {', '.join(dict.fromkeys(close))}? (docs/metrics.md lists every key)"
    if logged:
        return f"; it logs {len(logged)} keys, e.g. {', '.join(logged[:5])} (docs/metrics.md lists every key)"
    return "; it logs no metric (is it a run's metrics.jsonl?)"


def plot(
    paths: list[Path], metrics: list[str], out: Path, labels: list[str] | None = None, require_each: bool = False
) -> Path:
    """Write the figure to ``out``. Raises ValueError if no file holds any of ``metrics`` (with ``require_each``:
    if no file holds one of them), naming the logged keys closest to them."""
    labels = labels or [p.parent.name or str(p) for p in paths]
    runs = [read_metrics(p) for p in paths]
    missing = [metric for metric in metrics if not any(metric in r for records in runs for r in records)]
    if len(missing) == len(metrics) or (require_each and missing):
        what = f"none of {metrics} is" if len(missing) == len(metrics) else f"{missing} is not"
        raise ValueError(f"{what} logged in {[str(p) for p in paths]}{suggestions(runs, missing)}")
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
    # SUPPRESS: no "(default: None)" after the help's own default
    parser.add_argument(
        "--metric",
        action="append",
        default=argparse.SUPPRESS,
        help=f"metric key (repeatable; default: {' and '.join(DEFAULT_METRICS)})",
    )
    parser.add_argument(
        "--label",
        action="append",
        default=argparse.SUPPRESS,
        help="one label per file (default: the run folder's name)",
    )
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG file to write")
    args = parser.parse_args(argv)
    labels = getattr(args, "label", None)
    if labels and len(labels) != len(args.files):
        parser.error(f"{len(labels)} --label values for {len(args.files)} files")
    for path in args.files:
        if not path.is_file():
            parser.error(f"{path} does not exist")
    metrics = getattr(args, "metric", None)  # asked for by name: each must be logged; by default: either
    out = plot(args.files, metrics or DEFAULT_METRICS, args.out, labels, require_each=metrics is not None)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
