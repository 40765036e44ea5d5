"""Pruned vs unpruned vs random-pruned GRPO: the runs' overrides, their curves, the table and the plots.

``launch/ablate.py`` runs each variant as its own ``launch/grpo_flux.py`` process with the same config, seed
(hence the same prompt order and rollout noise) and budget; this module builds those overrides and reads the
runs back from their ``metrics.jsonl``:

- training wall-clock = cumulative ``time/step_s`` (the trainer's phases; setup and evaluation excluded, so
  a run's evaluation schedule does not bias the comparison);
- images denoised = ``train/images_denoised`` (a rollout stopped at step k of T counts k / T);
- reward-model calls = ``train/images_seen`` (images decoded and scored);
- held-out reward = ``base_eval`` (step 0), the periodic ``eval`` and ``final_eval`` totals, all on the same
  prompts and seeds (the launcher sets both evaluation sizes equal).

Time-to-target: the unpruned run's final held-out reward is the target; a run's time to it is the training
wall-clock of its first evaluation at or above it, and the speedup is the unpruned run's total training
wall-clock over that time.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from rl.metrics_log import read_metrics

VARIANTS: dict[str, list[str]] = {
    # the run's own pruning settings (a probe-based policy; topk if the config says none)
    "pruned": [],
    "unpruned": ["--prune_policy", "none", "--probe_path", "", "--probe_refresh_every", "0",
                 "--prune_advantage", "survivors", "--prune_train_early", "false"],
    "random": ["--prune_policy", "random", "--probe_path", "", "--prune_advantage", "survivors",
               "--probe_refresh_every", "0", "--prune_min_spread", "0", "--prune_train_early", "false"],
}  # fmt: skip
PHASES = ("prompts", "sample", "probe", "decode", "reward", "train", "probe_refresh")


def variant_overrides(variant: str, output_dir: str | Path, budget_minutes: float, budget_images: float) -> list[str]:
    """Command-line overrides of one variant: its pruning keys, its folder, the shared budget, per-step logging.

    Raises:
        ValueError: for an unknown variant or no budget.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    if budget_minutes <= 0 and budget_images <= 0:
        raise ValueError("give a budget: --budget_minutes (wall-clock) or --budget_images (denoised images)")
    budget = ["--max_minutes", str(budget_minutes), "--max_images_denoised", str(budget_images)]
    return [*VARIANTS[variant], *budget, "--output_dir", str(Path(output_dir) / variant), "--log_every", "1"]


@dataclasses.dataclass
class RunCurve:
    """One run's held-out reward against training wall-clock and denoised images.

    Attributes:
        name: the variant.
        steps, seconds, images, reward: one entry per evaluation (base first, final last).
        reward_calls: images scored by the reward model over the run.
        phase_seconds: total seconds per trainer phase (``time/<phase>_s``).
    """

    name: str
    steps: list[int]
    seconds: list[float]
    images: list[float]
    reward: list[float]
    reward_calls: float
    phase_seconds: dict[str, float]

    @property
    def final_reward(self) -> float:
        return self.reward[-1]

    def time_to(self, target: float) -> float:
        """Training wall-clock of the first evaluation reaching ``target``; inf if none does."""
        return next((s for s, r in zip(self.seconds, self.reward) if r >= target), math.inf)


def read_run(name: str, directory: str | Path) -> RunCurve:
    """A :class:`RunCurve` from a run folder's ``metrics.jsonl`` (written with ``log_every: 1``).

    Raises:
        FileNotFoundError: no metrics file; ValueError: no final evaluation (the run did not finish).
    """
    seconds, images, reward_calls = {0: 0.0}, {0: 0.0}, 0.0
    phase_seconds = dict.fromkeys(PHASES, 0.0)
    points: list[tuple[int, float]] = []
    final = None
    elapsed = 0.0
    for record in read_metrics(Path(directory) / "metrics.jsonl"):
        step = record["step"]
        if "time/step_s" in record:
            elapsed += record["time/step_s"]
            seconds[step] = elapsed
            images[step] = record.get("train/images_denoised", math.nan)
            reward_calls = record.get("train/images_seen", reward_calls)
            for phase in PHASES:
                phase_seconds[phase] += record.get(f"time/{phase}_s", 0.0)
        for prefix in ("base_eval", "eval"):
            if f"{prefix}/total/mean" in record:
                points.append((step, record[f"{prefix}/total/mean"]))
        if "final_eval/total/mean" in record:
            final = (step, record["final_eval/total/mean"])
    if final is None:
        raise ValueError(f"{directory}/metrics.jsonl has no final_eval: the run did not finish")
    points = [p for p in points if p[0] != final[0]] + [final]
    return RunCurve(
        name,
        [s for s, _ in points],
        [seconds[s] for s, _ in points],
        [images[s] for s, _ in points],
        [r for _, r in points],
        reward_calls,
        {k: v for k, v in phase_seconds.items() if v > 0},
    )


def summary_table(runs: list[RunCurve], baseline: str = "unpruned") -> tuple[list[dict], str]:
    """Rows (dicts) and a Markdown table: final reward, images, reward calls, time per phase, time-to-target."""
    reference = next((r for r in runs if r.name == baseline), None)
    target = reference.final_reward if reference else math.nan
    total = reference.seconds[-1] if reference else math.nan
    phases = [p for p in PHASES if any(p in r.phase_seconds for r in runs)]
    rows = []
    for run in runs:
        reach = run.time_to(target) if reference else math.inf
        rows.append(
            {
                "variant": run.name,
                "final_reward": run.final_reward,
                "base_reward": run.reward[0],
                "steps": run.steps[-1],
                "images_denoised": run.images[-1],
                "reward_calls": run.reward_calls,
                "train_seconds": run.seconds[-1],
                **{f"{p}_s": run.phase_seconds.get(p, 0.0) for p in phases},
                "seconds_to_target": reach,
                "speedup_to_target": total / reach if reach > 0 else math.nan,
            }
        )
    header = ["variant", "final held-out reward", "base", "steps", "images denoised", "reward calls", "step time s"]
    header += [f"{p} s" for p in phases] + [f"s to {target:.4f}", "speedup to target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], f"{row['final_reward']:.4f}", f"{row['base_reward']:.4f}", str(row["steps"])]
        cells += [f"{row['images_denoised']:.0f}", f"{row['reward_calls']:.0f}", f"{row['train_seconds']:.0f}"]
        cells += [f"{row[f'{p}_s']:.0f}" for p in phases]
        cells += [f"{row['seconds_to_target']:.0f}", f"{row['speedup_to_target']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


def plot_curves(runs: list[RunCurve], out_dir: str | Path) -> list[Path]:
    """``reward_vs_wallclock.png`` and ``reward_vs_images.png`` in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for field, label, name in (
        ("seconds", "training wall-clock (s; setup and evaluation excluded)", "reward_vs_wallclock.png"),
        ("images", "denoised images (a rollout stopped at step k counts k / T)", "reward_vs_images.png"),
    ):
        figure, axis = plt.subplots(figsize=(6, 4))
        for run in runs:
            axis.plot(getattr(run, field), run.reward, marker="o", label=run.name)
        axis.set_xlabel(label)
        axis.set_ylabel("held-out reward (deterministic, fixed seeds)")
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        path = Path(out_dir) / name
        figure.savefig(path, dpi=120)
        plt.close(figure)
        paths.append(path)
    return paths


def write_report(runs: list[RunCurve], out_dir: str | Path, command: str) -> dict:
    """``ablation.json``, ``ablation.md`` and both plots in ``out_dir``; returns the JSON content."""
    out_dir = Path(out_dir)
    rows, table = summary_table(runs)
    plots = plot_curves(runs, out_dir)
    report = {"command": command, "rows": rows, "curves": [dataclasses.asdict(r) for r in runs]}
    (out_dir / "ablation.json").write_text(json.dumps(report, indent=1))
    plot_links = " ".join(f"![{p.stem}]({p.name})" for p in plots)
    (out_dir / "ablation.md").write_text(f"`{command}`\n\n{table}\n\n{plot_links}\n")
    return report
