"""Pruned vs unpruned vs random-pruned GRPO: the runs' overrides, their curves, the table and the plots.

``launch/ablate.py`` runs each variant as its own ``launch/grpo_flux.py`` process with the same config, seed
(hence the same prompt order and rollout noise) and budget; this module builds those overrides and reads the
runs back from their ``metrics.jsonl``:

- training wall-clock = cumulative ``time/step_s`` (the trainer's phases; setup and evaluation excluded, so
  a run's evaluation schedule does not bias the comparison);
- images denoised = ``train/images_denoised`` (a rollout stopped at step k of T counts k / T);
- reward-model calls = ``compute/reward_calls`` (finished images, previews and lookaheads scored);
- held-out reward = ``base_eval`` (step 0), the periodic ``eval`` and ``final_eval`` totals, all on the same
  prompts and seeds (the launcher sets both evaluation sizes equal).

Time-to-target: the unpruned run's (seed-mean) final held-out reward is the target; a run's time to it is the
cost (wall-clock, transformer calls or FLUX-equivalent compute) of its first evaluation at or above it, and the
speedup is the unpruned run's own time to it over the variant's, with a bootstrap interval over seeds. Spreads
over seeds are sample standard deviations (n - 1).

A budget is checked before each step, so a run overshoots it by up to one step (its steps differ in cost by
variant: PODS's by up to 5% of a 39,000 budget); time to target reads each run's actual costs, so only "final
reward at the budget" compares slightly unequal compute. ``--budget_minutes`` counts from launch (setup and
evaluation included), the wall-clock axis only training steps.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import random
import statistics
from pathlib import Path

from rl.cost import ComputeCounts, OperationCosts, flux_equivalent
from rl.metrics_log import read_metrics

_PLAIN = [
    "--probe_refresh_every",
    "0",
    "--prune_advantage",
    "survivors",
    "--prune_train_early",
    "false",
    "--prune_min_spread",
    "0",
    "--prune_explore",
    "0",
]  # pure selection: no refresh, imputation, skipping
_NO_PROBE = ["--probe_path", ""]
_HALF = ["--prune_policy", "variance", "--prune_keep_fraction", "0.5"]
_PREVIEW = ["--predictor", "preview", "--capture_step", "4", *_NO_PROBE]  # call 4: the first ODE call's x0
_LOOKAHEAD = ["--predictor", "lookahead", "--capture_step", "3", "--lookahead_steps", "2", *_NO_PROBE]
_PROBE = ["--predictor", "probe", "--capture_step", "4"]  # probe_path: the one the command passes
_RANDOM = ["--prune_policy", "random", "--prune_keep_fraction", "0.5", "--capture_step", "4", *_NO_PROBE]
_EXPAND = ["--prune_expand", "2"]  # 2 G started, G trained
_UNPRUNED_AWM = ["--prune_policy", "none", *_NO_PROBE, *_PLAIN, "--policy_objective", "awm"]
_AWM_KL = ["--kl_beta", "0.001", "--awm_kl_form", "squared"]  # the reference's KL to the base model

VARIANTS: dict[str, list[str]] = {
    # the run's own pruning settings (launch/ablate.py refuses it under a config that prunes nothing)
    "pruned": [],
    "unpruned": ["--prune_policy", "none", "--probe_path", "", "--probe_refresh_every", "0",
                 "--prune_advantage", "survivors", "--prune_train_early", "false"],
    # GRESO's pre-rollout skipping of prompts whose last group was flat (rl/prompt_skip.py), else unpruned
    "skip_flat": ["--prune_policy", "none", "--probe_path", "", "--probe_refresh_every", "0",
                  "--prune_advantage", "survivors", "--prune_train_early", "false", "--prompt_skip_after", "1"],
    # MixGRPO's sliding window (its SDE noise with it) one step later every 4 GRPO steps: unpruned otherwise
    "sliding_window": ["--prune_policy", "none", *_NO_PROBE, *_PLAIN, "--train_window_shift_every", "4"],
    "random": ["--prune_policy", "random", "--probe_path", "", "--prune_advantage", "survivors",
               "--probe_refresh_every", "0", "--prune_min_spread", "0", "--prune_train_early", "false"],
    # the expand-and-prune study (bench/ablation_expand_prune): variance-optimal selection by each predictor
    "unpruned_g16": ["--prune_policy", "none", *_NO_PROBE, *_PLAIN, "--group_size", "16"],
    # the group keep-half trains, never started larger: what selection must beat, not only the full group
    "unpruned_g4": ["--prune_policy", "none", *_NO_PROBE, *_PLAIN, "--group_size", "4"],
    "pods": [*_HALF, *_EXPAND, "--predictor", "reward", *_NO_PROBE, *_PLAIN],  # 2G finished, best-variance G
    "keep_oracle": [*_HALF, "--predictor", "reward", *_NO_PROBE, *_PLAIN],  # the ceiling of keeping half
    "keep_preview": [*_HALF, *_PREVIEW, *_PLAIN],
    "keep_lookahead": [*_HALF, *_LOOKAHEAD, *_PLAIN],
    "keep_probe": [*_HALF, *_PROBE, *_PLAIN],
    "keep_random": [*_RANDOM, *_PLAIN],
    "expand_preview": [*_HALF, *_EXPAND, *_PREVIEW, *_PLAIN],
    "expand_lookahead": [*_HALF, *_EXPAND, *_LOOKAHEAD, *_PLAIN],
    "expand_probe": [*_HALF, *_EXPAND, *_PROBE, *_PLAIN],
    "expand_random": [*_RANDOM, *_EXPAND, *_PLAIN],
    # Pro-GRPO's funnel: 4 G started, half kept after step 3 (first ODE call's input), half again after step 4
    "funnel_preview": ["--prune_policy", "variance", "--prune_expand", "4", "--prune_funnel", "3:0.5,4:0.5",
                       "--predictor", "preview", *_NO_PROBE, *_PLAIN],
    # AWM's reference code, one difference at a time and all together (docs/design.md section 3); unpruned
    "awm_sigma_weight": [*_UNPRUNED_AWM, "--awm_sigma_weight", "true"],
    "awm_kl_squared": [*_UNPRUNED_AWM, *_AWM_KL],
    "awm_kl_squared_ema": [*_UNPRUNED_AWM, *_AWM_KL, "--awm_ema_kl_beta", "1"],
    "awm_adv_scale_1": [*_UNPRUNED_AWM, "--adv_scale_max", "1"],
    "awm_no_sigma_one": [*_UNPRUNED_AWM, "--train_first_step", "false"],
    "awm_reference": [*_UNPRUNED_AWM, "--awm_sigma_weight", "true", *_AWM_KL, "--awm_ema_kl_beta", "1",
                      "--adv_scale_max", "1", "--train_first_step", "false"],
}  # fmt: skip
PHASES = ("prompts", "sample", "predict", "decode", "reward", "score_wait", "train", "probe_refresh")
# per-step training figures averaged over a run: what selection bought (rl/pruned_rollout.py)
SELECTION_METRICS = (
    "reward/group_std",  # the trained groups' real reward spread
    "prune/explore_reward_std",  # the same over the random exploration slice (prune_explore >= 2): the baseline
    "prune/flat_group_frac",
    "prune/predicted_std_gain",
    "prune/survivor_frac",
)


@dataclasses.dataclass(frozen=True)
class Budget:
    """What every run of an ablation may spend; the first limit reached stops it (0: no limit of that kind).

    ``flux_compute`` (FLUX.1-dev transformer forwards, rl/cost.py) is the budget for time-to-target comparisons:
    it charges a pruned run for what it really runs, lookahead calls and training passes included.
    """

    minutes: float = 0.0
    images: float = 0.0
    steps: int = 0
    flux_compute: float = 0.0

    def overrides(self) -> list[str]:
        """The run-config overrides that set this budget.

        Raises:
            ValueError: when every limit is 0.
        """
        if max(self.minutes, self.images, self.steps, self.flux_compute) <= 0:
            raise ValueError(
                "give a budget: --budget_minutes (wall-clock), --budget_images (denoised images), --budget_steps "
                "or --budget_flux_compute (FLUX.1-dev transformer forwards)"
            )
        budget = ["--max_minutes", str(self.minutes), "--max_images_denoised", str(self.images)]
        budget += ["--max_flux_compute", str(self.flux_compute)]
        if self.steps > 0:
            budget += ["--max_steps", str(self.steps)]
        return budget


def variant_overrides(variant: str, output_dir: str | Path, budget: Budget) -> list[str]:
    """Command-line overrides of one variant: its pruning keys, its folder, the shared budget, per-step logging.

    Raises:
        ValueError: for an unknown variant or no budget.
    """
    if variant not in VARIANTS:
        close = difflib.get_close_matches(variant, list(VARIANTS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown variant {variant!r} in --variants; {hint}choose from {', '.join(sorted(VARIANTS))}")
    limits = budget.overrides()
    return [*VARIANTS[variant], *limits, "--output_dir", str(Path(output_dir) / variant), "--log_every", "1"]


@dataclasses.dataclass
class RunCurve:
    """One run's held-out reward against training wall-clock and denoised images.

    Attributes:
        name: the variant.
        steps, seconds, images, reward: one entry per evaluation (base first, final last).
        reward_calls: images scored by the reward model over the run.
        phase_seconds: total seconds per trainer phase (``time/<phase>_s``).
        calls, flux: transformer calls and FLUX.1-dev-equivalent compute (rl/cost.py) at each evaluation.
        selection: the run's mean of each of :data:`SELECTION_METRICS` it logged.
    """

    name: str
    steps: list[int]
    seconds: list[float]
    images: list[float]
    reward: list[float]
    reward_calls: float
    phase_seconds: dict[str, float]
    calls: list[float] = dataclasses.field(default_factory=list)
    flux: list[float] = dataclasses.field(default_factory=list)
    selection: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def final_reward(self) -> float:
        return self.reward[-1]

    def time_to(self, target: float) -> float:
        """Training wall-clock of the first evaluation reaching ``target``; inf if none does."""
        return next((s for s, r in zip(self.seconds, self.reward) if r >= target), math.inf)


def read_run(name: str, directory: str | Path, costs: OperationCosts | None = None) -> RunCurve:
    """A :class:`RunCurve` from a run folder's ``metrics.jsonl`` (written with ``log_every: 1``); ``costs``: price
    the logged operation counts with these instead of the run's FLUX.1-dev costs (a reward of your own's cost).

    Raises:
        FileNotFoundError: no metrics file; ValueError: no final evaluation (the run did not finish).
    """
    seconds, images, calls, flux, reward_calls = {0: 0.0}, {0: 0.0}, {0: 0.0}, {0: 0.0}, 0.0
    phase_seconds = dict.fromkeys(PHASES, 0.0)
    selection: dict[str, list[float]] = {key: [] for key in SELECTION_METRICS}
    points: list[tuple[int, float]] = []
    final = None
    elapsed = 0.0
    for record in read_metrics(Path(directory) / "metrics.jsonl"):
        step = record["step"]
        if "time/step_s" in record:
            elapsed += record["time/step_s"]
            seconds[step] = elapsed
            images[step] = record.get("train/images_denoised", math.nan)
            calls[step] = record.get("compute/transformer_calls", math.nan)
            flux[step] = record.get("compute/flux_equivalent", math.nan) if costs is None else priced(record, costs)
            reward_calls = record.get("compute/reward_calls", reward_calls)  # previews' and lookaheads' included
            for phase in PHASES:
                phase_seconds[phase] += record.get(f"time/{phase}_s", 0.0)
            for key in SELECTION_METRICS:
                if key in record:
                    selection[key].append(record[key])
        for prefix in ("base_eval", "eval"):
            if f"{prefix}/total/mean" in record:
                points.append((step, record[f"{prefix}/total/mean"]))
        if "final_eval/total/mean" in record:
            final = (step, record["final_eval/total/mean"])
    if final is None:
        raise ValueError(f"{directory}/metrics.jsonl has no final_eval: the run did not finish")
    points = [p for p in points if p[0] != final[0]] + [final]
    steps = [s for s, _ in points]
    return RunCurve(
        name,
        steps,
        [seconds[s] for s in steps],
        [images[s] for s in steps],
        [r for _, r in points],
        reward_calls,
        {k: v for k, v in phase_seconds.items() if v > 0},
        [calls[s] for s in steps],
        [flux[s] for s in steps],
        {key: sum(values) / len(values) for key, values in selection.items() if values},
    )


def priced(record: dict, costs: OperationCosts) -> float:
    """A metrics record's cumulative operation counts (``compute/*``) in transformer forwards at ``costs``."""
    counts = ComputeCounts(*(record[f"compute/{f.name}"] for f in dataclasses.fields(ComputeCounts)))
    return flux_equivalent(counts, costs)


def summary_table(runs: list[RunCurve], baseline: str = "unpruned") -> tuple[list[dict], str]:
    """Rows (dicts) and a Markdown table: final reward, images, reward calls, time per phase, time-to-target."""
    reference = next((r for r in runs if r.name == baseline), None)
    target = reference.final_reward if reference else math.nan
    # the reference's own time to its final reward, as seed_summary measures it: it scores itself 1.00x
    own = reference.time_to(target) if reference else math.nan
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
                # the reference against itself is 1 by definition; a target never reached or reached at no cost:
                # undefined (nan; the seconds say which)
                "speedup_to_target": 1.0 if run is reference else own / reach if 0 < reach < math.inf else math.nan,
            }
        )
    header = ["variant", "final held-out reward", "base", "steps", "images denoised", "reward calls", "step time s"]
    header += [f"{p} s" for p in phases] + [f"s to {target:.4f}", "speedup to target"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], f"{row['final_reward']:.4f}", f"{row['base_reward']:.4f}", str(row["steps"])]
        cells += [f"{row['images_denoised']:.0f}", f"{row['reward_calls']:.0f}", f"{row['train_seconds']:.0f}"]
        cells += [f"{row[f'{p}_s']:.0f}" for p in phases]
        cells += [f"{row['seconds_to_target']:.0f}", speedup_cell(row["speedup_to_target"], row["seconds_to_target"])]
        lines.append("| " + " | ".join(cells) + " |")
    return rows, "\n".join(lines)


def speedup_cell(speedup: float, to_target: float = 0.0, interval: list[float] | None = None) -> str:
    """A speedup as a table cell: ``1.67x`` (with its bootstrap ``interval``: ``1.67x (0.91-2.10)``), ``not
    reached`` when the variant never reached the target (``to_target`` inf), ``n/a`` where it is undefined."""
    if to_target == math.inf:
        return "not reached"
    if not math.isfinite(speedup):
        return "n/a"
    bounded = interval is not None and all(math.isfinite(x) for x in interval)
    return f"{speedup:.2f}x" + (f" ({interval[0]:.2f}-{interval[1]:.2f})" if bounded else "")


def json_safe(value):
    """``value`` with every non-finite float (nan, inf) as ``None``: strict JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


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
    """``ablation.json``, ``ablation.md`` and both plots in ``out_dir``; returns the JSON content (where the file
    has ``null`` for an undefined figure, the returned dict keeps the float: nan or inf)."""
    out_dir = Path(out_dir)
    rows, table = summary_table(runs)
    plots = plot_curves(runs, out_dir)
    report = {"command": command, "rows": rows, "curves": [dataclasses.asdict(r) for r in runs]}
    (out_dir / "ablation.json").write_text(json.dumps(json_safe(report), indent=1, allow_nan=False))
    plot_links = " ".join(f"![{p.stem}]({p.name})" for p in plots)
    (out_dir / "ablation.md").write_text(f"`{command}`\n\n{table}\n\n{plot_links}\n")
    return report


# ---------------------------------------------------------------- several seeds per variant

BOOTSTRAP_RESAMPLES = 1000  # per variant and axis; the speedups' intervals (seed_summary)
AXES = {  # summary key suffix -> (RunCurve field, plot label)
    "wallclock": ("seconds", "training wall-clock (s; setup and evaluation excluded)"),
    "calls": ("calls", "transformer calls (rollouts, predictors, KL reference)"),
    "flux_compute": ("flux", "FLUX.1-dev-equivalent compute (transformer forwards; rl/cost.py)"),
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std over seeds (nan for a single seed: one seed has no spread to report)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def seed_curve(runs: list[RunCurve]) -> dict[str, list[float]]:
    """The seed-mean curve of one variant: mean and std reward and mean cost on each axis per evaluation.

    Points are the evaluation steps every seed has, matched by step; where the seeds ended at different steps
    (a time or compute budget), a last point averages each seed's final evaluation, so the curve ends at the
    variant's mean final reward.
    """
    common = sorted(set.intersection(*(set(r.steps) for r in runs)))
    rows = [[r.steps.index(step) for step in common] for r in runs]
    if any(not row or row[-1] != len(r.steps) - 1 for row, r in zip(rows, runs)):
        rows = [[*row, len(r.steps) - 1] for row, r in zip(rows, runs)]
        common = [*common, max(r.steps[-1] for r in runs)]
    curve: dict[str, list[float]] = {"steps": common, "reward_mean": [], "reward_std": []}
    for point in range(len(common)):
        mean, std = _mean_std([r.reward[row[point]] for r, row in zip(runs, rows)])
        curve["reward_mean"].append(mean)
        curve["reward_std"].append(std)
    for field, _ in AXES.values():
        curve[field] = [statistics.fmean(getattr(r, field)[row[point]] for r, row in zip(runs, rows))
                        for point in range(len(common))]  # fmt: skip
    return curve


def first_reaching(curve: dict[str, list[float]], field: str, target: float) -> float:
    """The cost (``field``) of the first evaluation whose seed-mean reward reaches ``target``; inf if none."""
    return next((x for x, r in zip(curve[field], curve["reward_mean"]) if r >= target - 1e-12), math.inf)


def speedup_samples(
    runs: list[RunCurve], baseline: list[RunCurve], field: str, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> list[float]:
    """Bootstrap speedups on one axis: the seeds of the variant and of the baseline each resampled with
    replacement, the target (the resampled baseline's mean final reward), both seed-mean curves and their first
    crossings rebuilt; a variant that never reaches the target counts 0 (so the interval covers 'not reached').

    With 3 seeds there are only 10 distinct resamples per side: the interval then says how far the seed draw alone
    moves a speedup, not a calibrated confidence level.
    """
    rng = random.Random(seed)
    samples = []
    for _ in range(resamples):
        mine = [rng.choice(runs) for _ in runs]
        base = [rng.choice(baseline) for _ in baseline]
        target = statistics.fmean(r.final_reward for r in base)
        reference = first_reaching(seed_curve(base), field, target)
        reach = first_reaching(seed_curve(mine), field, target)
        samples.append(reference / reach if 0 < reach < math.inf else 0.0 if reach == math.inf else math.nan)
    return samples


def percentile_interval(samples: list[float], coverage: float = 0.9) -> list[float]:
    """The central ``coverage`` interval ``[low, high]`` of the finite samples (nan, nan without any)."""
    finite = sorted(s for s in samples if math.isfinite(s))
    if not finite:
        return [math.nan, math.nan]
    tail = (1 - coverage) / 2
    pick = lambda q: finite[min(len(finite) - 1, max(0, round(q * (len(finite) - 1))))]  # noqa: E731
    return [pick(tail), pick(1 - tail)]


def seed_summary(runs: dict[str, list[RunCurve]], baseline: str = "unpruned") -> dict:
    """Per variant: final held-out reward mean and std over seeds, time to the baseline's mean final reward on
    each axis (wall-clock, transformer calls, FLUX-equivalent compute), the speedups (the baseline's time to
    that target over the variant's; nan when never reached) with a 90% bootstrap interval over seeds
    (``speedup_<axis>_interval``, :func:`speedup_samples`; the baseline's own shows the noise of a null
    comparison), the seed-mean curves and the selection figures.

    Raises:
        ValueError: the baseline variant has no finished run.
    """
    if not runs.get(baseline):
        raise ValueError(f"the baseline variant {baseline!r} has no finished run")
    curves = {name: seed_curve(group) for name, group in runs.items() if group}
    target = _mean_std([r.final_reward for r in runs[baseline]])[0]
    reference = {axis: first_reaching(curves[baseline], field, target) for axis, (field, _) in AXES.items()}
    variants = {}
    for name, group in runs.items():
        if not group:
            continue
        mean, std = _mean_std([r.final_reward for r in group])
        entry = {
            "final_reward_mean": mean,
            "final_reward_std": std,
            "seeds": len(group),
            "final_rewards": [r.final_reward for r in group],
            "base_reward_mean": _mean_std([r.reward[0] for r in group])[0],
        }
        for axis, (field, _) in AXES.items():
            reach = first_reaching(curves[name], field, target)
            entry[f"to_target_{axis}"] = reach
            entry[f"total_{axis}"] = curves[name][field][-1]
            speedup = reference[axis] / reach if 0 < reach < math.inf else math.nan  # never, or at no cost
            entry[f"speedup_{axis}"] = 1.0 if name == baseline else speedup
            entry[f"speedup_{axis}_interval"] = percentile_interval(speedup_samples(group, runs[baseline], field))
        keys = {key for r in group for key in r.selection}
        entry["selection"] = {
            k: _mean_std([r.selection[k] for r in group if k in r.selection])[0] for k in sorted(keys)
        }
        entry["curve"] = curves[name]
        variants[name] = entry
    return {"baseline": baseline, "target_reward": target, "variants": variants}


def seed_table(summary: dict) -> str:
    """The Markdown table of :func:`seed_summary`."""
    header = ["variant", "seeds", "final held-out reward (mean +- sample std)", "group reward std", "wall-clock s", "transformer calls",
              "FLUX-eq. compute", "speedup wall-clock (90% bootstrap)", "speedup calls (90%)", "speedup FLUX compute (90%)"]  # fmt: skip
    lines = [f"Target: the {summary['baseline']} mean final reward, {summary['target_reward']:.4f}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, v in summary["variants"].items():
        spread = v["selection"].get("reward/group_std", math.nan)
        std = v["final_reward_std"]
        final = f"{v['final_reward_mean']:.4f} " + (f"+- {std:.4f}" if math.isfinite(std) else "(one seed)")
        cells = [name, str(v["seeds"]), final, f"{spread:.3f}"]
        cells += [f"{v['total_wallclock']:.0f}", f"{v['total_calls']:.0f}", f"{v['total_flux_compute']:.0f}"]
        cells += [speedup_cell(v[f"speedup_{axis}"], v[f"to_target_{axis}"], v[f"speedup_{axis}_interval"])
                  for axis in AXES]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_seed_bands(summary: dict, out_dir: str | Path) -> Path:
    """``reward_vs_cost.png``: seed-mean held-out reward (band: +- one std over seeds) against each cost axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(AXES), figsize=(6 * len(AXES), 4.5), sharey=True)
    for axis, (field, label) in zip(axes, AXES.values()):
        for name, v in summary["variants"].items():
            curve = v["curve"]
            mean, std = curve["reward_mean"], curve["reward_std"]
            line = axis.plot(curve[field], mean, marker="o", markersize=3, label=f"{name} ({v['seeds']})")[0]
            low, high = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
            axis.fill_between(curve[field], low, high, color=line.get_color(), alpha=0.15)
        axis.axhline(summary["target_reward"], color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("held-out reward (seed mean +- std)")
    axes[-1].legend(fontsize=7)
    figure.tight_layout()
    path = Path(out_dir) / "reward_vs_cost.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_seed_report(runs: dict[str, list[RunCurve]], out_dir: str | Path, command: str, notes: dict) -> dict:
    """``summary.json``, ``summary.md`` and ``reward_vs_cost.png`` in ``out_dir``; returns the JSON content (nan and
    inf as floats; ``null`` in the file)."""
    out_dir = Path(out_dir)
    summary = {"command": command, **notes, **seed_summary(runs)}
    plot = plot_seed_bands(summary, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(json_safe(summary), indent=1, allow_nan=False))
    (out_dir / "summary.md").write_text(f"`{command}`\n\n{seed_table(summary)}\n\n![{plot.stem}]({plot.name})\n")
    return summary
