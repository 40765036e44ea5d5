"""Pruned vs unpruned vs random-pruned GRPO under one budget, same seeds and prompt order; table + plots.

    python launch/ablate.py --config configs/tiny_shapes.yaml --budget_minutes 20   # unpruned, keep_preview, keep_random
    python launch/ablate.py --config configs/tiny_shapes.yaml --budget_minutes 20 --variants pruned,unpruned,random \\
        --prune_policy topk --probe_path assets/probe/tiny-flux-shapes-window-step4.pt --capture_step 4
    python launch/ablate.py --config ... --budget_flux_compute 39000 --variants keep_random,unpruned   # equal compute
    python launch/ablate.py --out runs/ablate --report_only                               # re-read finished runs
    python launch/ablate.py --config configs/tiny_shapes.yaml --seeds 0 1 2 --jobs 2 --budget_steps 24 \
        --variants unpruned,keep_preview,keep_random,pods --out bench/ablation_expand_prune   # seeds, in parallel

Every argument this script does not own is passed to each run (``launch/grpo_flux.py``, one process per run);
the variants differ only in their pruning keys or AWM's reference options (rl/ablation.py, ``VARIANTS``). One
seed: the runs go sequentially to ``<out>/<variant>/`` and the report is ``<out>/ablation.{json,md}`` with
``reward_vs_wallclock.png`` and ``reward_vs_images.png``. ``--seeds``: ``<out>/seed<k>/<variant>/`` (``--seed k``),
``--jobs`` at a time with ``--threads`` torch threads each; finished runs are kept and unfinished ones resume
from their checkpoints, so re-running the command resumes (a run folder of another config is an error, never
mixed in); the report is ``<out>/summary.{json,md}`` and ``reward_vs_cost.png`` (rl/ablation.py,
:func:`~rl.ablation.seed_summary`).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rl.ablation import Budget, read_run, variant_overrides, write_report, write_seed_report
from rl.config_help import HelpFormatter
from rl.config_parse import parse_config, with_default_config
from rl.cost import FLUX_DEV_COSTS
from rl.prune_policies import PRUNE_POLICIES
from rl.resume_policy import result_changes
from rl.user_errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
# what runs on the shipped config without a probe: the full group, half kept by the x0 preview, half kept at random
DEFAULT_VARIANTS = "unpruned,keep_preview,keep_random"


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any other --KEY VALUE is a run-config override given to every run (see launch/grpo_flux.py --help).",
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help="comma-separated, in this order (rl/ablation.py VARIANTS; 'pruned' runs the config's prune_policy, "
        "the default ones need no probe)",
    )
    parser.add_argument("--budget_minutes", type=float, default=0.0, help="wall-clock budget per run (max_minutes)")
    parser.add_argument("--budget_images", type=float, default=0.0, help="denoised-image budget per run")
    parser.add_argument("--budget_steps", type=int, default=0, help="GRPO-step budget per run (max_steps)")
    parser.add_argument(
        "--budget_flux_compute",
        type=float,
        default=0.0,
        help="compute budget per run in FLUX.1-dev transformer forwards (max_flux_compute; rl/cost.py)",
    )
    parser.add_argument("--max_steps", type=int, default=100_000, help="step cap; the budget normally stops first")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run every variant with each seed (omitted: one run each, the config's seed)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (with --seeds)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    parser.add_argument("--eval_prompts_count", type=int, default=64, help="held-out prompts of every evaluation")
    parser.add_argument("--eval_every", type=int, default=5, help="evaluate every N steps (the curves' points)")
    parser.add_argument("--out", default="runs/ablate", help="folder of the runs and the report")
    parser.add_argument("--report_only", action="store_true", help="only read finished runs and write the report")
    parser.add_argument("--reward_call_cost", type=float, default=None, help="price each reward call (one image "
                        "scored) at this many FLUX.1-dev transformer forwards in the report, e.g. for a VLM judge "
                        f"(default: the cost model's {FLUX_DEV_COSTS.reward_call}, a ViT-H scorer; rl/cost.py)")  # fmt: skip
    return parser.parse_known_args(argv)


def run_commands(commands: dict[Path, list[str]], jobs: int, threads: int) -> None:
    """Run each command (its log beside its run folder) ``jobs`` at a time; a finished run folder is kept.

    Raises:
        SystemExit: a run failed (its log is named).
    """
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    pending, running = [], {}
    for run_dir, command in commands.items():
        try:
            read_run(run_dir.name, run_dir)
            print(f"=== {run_dir}: finished before, kept", flush=True)
        except (FileNotFoundError, ValueError):
            pending.append((run_dir, command))  # an unfinished run resumes from its newest checkpoint
    while pending or running:
        while pending and len(running) < max(jobs, 1):
            run_dir, command = pending.pop(0)
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = open(run_dir.with_suffix(".log"), "w")
            print(f"=== {run_dir}: {' '.join(command[1:])}", flush=True)
            running[run_dir] = (subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        for run_dir, (process, log) in list(running.items()):
            if process.poll() is not None:
                log.close()
                del running[run_dir]
                if process.returncode:
                    raise SystemExit(f"{run_dir} failed (exit {process.returncode}): see {run_dir.with_suffix('.log')}")
                print(f"=== {run_dir}: done", flush=True)
        time.sleep(1.0)


def plan(args: argparse.Namespace, passthrough: list[str]) -> dict[Path, list[str]]:
    """Every run's folder and command line, each config parsed first (a bad key or value fails before any run)."""
    variants = [v for v in args.variants.split(",") if v]
    if args.seeds is not None and "unpruned" not in variants:  # found after an hour of runs: fail before them
        raise ValueError(
            "--variants must include unpruned: every variant's time to target is measured against unpruned's mean "
            "final reward (add it to --variants)"
        )
    # each run's command as the launcher would complete it, so the config checked here is the one each run runs
    shared = [
        *with_default_config(passthrough),
        "--max_steps",
        str(args.max_steps),
        "--eval_every",
        str(args.eval_every),
    ]
    shared += ["--eval_num_prompts", str(args.eval_prompts_count), "--final_eval_num_prompts"]
    shared += [str(args.eval_prompts_count), "--eval_before_training", "true"]
    shared += ["--resume_from", "latest"]  # a run killed midway continues from its checkpoint, not from step 0
    seeds = args.seeds if args.seeds is not None else [None]
    commands: dict[Path, list[str]] = {}
    conflicts, schedules = [], set()
    for seed in seeds:
        out = Path(args.out) if seed is None else Path(args.out) / f"seed{seed}"
        for variant in variants:
            budget = Budget(args.budget_minutes, args.budget_images, args.budget_steps, args.budget_flux_compute)
            overrides = [*shared, *variant_overrides(variant, out, budget)]
            overrides += ["--final_eval_images_per_prompt", "0"]  # the periodic evaluation's seeds: one curve
            if seed is not None:
                overrides += ["--seed", str(seed)]
            config = parse_config(overrides)
            schedules.add(config.training.lr_schedule)
            if variant == "pruned" and not PRUNE_POLICIES[config.pruning.prune_policy].reads_predictions:
                predicting = "|".join(n for n, p in PRUNE_POLICIES.items() if p.prunes and p.reads_predictions)
                raise ValueError(
                    f"the pruned variant runs the config's prune_policy, here {config.pruning.prune_policy!r}: "
                    f"pass --prune_policy {predicting} with --probe_path (or --predictor preview, lookahead or "
                    f"reward), or leave pruned out of --variants (default: {DEFAULT_VARIANTS})"
                )
            commands[out / variant] = [sys.executable, str(ROOT / "launch" / "grpo_flux.py"), *overrides]
            if changed := result_changes(out / variant, config.flat()):
                listed = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
                conflicts.append(f"{out / variant} ({listed})")
    decaying = sorted(schedules - {"constant"})
    if decaying and not args.budget_steps:  # the schedule runs over max_steps, which another budget never reaches
        print(f"warning: lr_schedule {', '.join(decaying)} decays over max_steps={args.max_steps}, which a time, image "
              "or compute budget stops far short of: the learning rate stays at its start value (say so with "
              "--lr_schedule constant, or budget in --budget_steps)")  # fmt: skip
    if conflicts and args.report_only:  # reported as they are, but not without a word
        print(f"warning: {len(conflicts)} run folder(s) hold a run of another config: {'; '.join(conflicts)}")
    elif conflicts:  # a kept or resumed run of another config would mix into the summary
        raise ValueError(
            f"{len(conflicts)} run folder(s) hold a run of another config: {'; '.join(conflicts)}. Choose another "
            "--out, or delete those folders to run them again"
        )
    return commands


def main(argv: list[str] | None = None) -> dict:
    args, passthrough = parse(argv)
    variants = [v for v in args.variants.split(",") if v]
    seeds = args.seeds if args.seeds is not None else [None]
    budgets = (args.budget_minutes, args.budget_images, args.budget_steps, args.budget_flux_compute)
    if args.reward_call_cost is not None and args.budget_flux_compute and not args.report_only:
        raise ValueError(
            f"--reward_call_cost {args.reward_call_cost} re-prices the report, but the runs spend "
            "--budget_flux_compute at the default prices (rl/cost.py): run the budget first, then report with "
            "--report_only --reward_call_cost"
        )
    # re-reading finished runs needs no budget; given one, the runs are checked against the config it makes
    commands = plan(args, passthrough) if max(budgets) > 0 or not args.report_only else {}
    costs = None  # the prices the runs logged; re-priced with --reward_call_cost (--report_only: finished runs)
    if args.reward_call_cost is not None:
        costs = dataclasses.replace(FLUX_DEV_COSTS, reward_call=args.reward_call_cost)
    command = " ".join(["python launch/ablate.py", *(argv if argv is not None else sys.argv[1:])])
    if not args.report_only:
        run_commands(commands, args.jobs if args.seeds is not None else 1, args.threads)
    if args.seeds is None:
        runs = [read_run(variant, Path(args.out) / variant, costs) for variant in variants]
        report = write_report(runs, args.out, command)
        print((Path(args.out) / "ablation.md").read_text())
        return report
    by_variant, missing = {}, []
    for variant in variants:  # a variant run with fewer seeds reports those (the table says how many)
        by_variant[variant] = []
        for seed in seeds:
            try:
                by_variant[variant].append(read_run(variant, Path(args.out) / f"seed{seed}" / variant, costs))
            except (FileNotFoundError, ValueError):
                missing.append(f"{variant}/seed{seed}")
    if missing:
        print(f"not finished, left out: {', '.join(missing)}", flush=True)
    source = "FLUX.1-dev at 512 px from FLOP counts (rl/cost.py)"
    if args.reward_call_cost is not None:
        source += f", a reward call priced at {args.reward_call_cost} forwards (--reward_call_cost)"
    notes = {"cost_model": {"per_operation": dataclasses.asdict(costs or FLUX_DEV_COSTS), "source": source}, "seeds": seeds,
             "not_finished": missing}  # fmt: skip
    summary = write_seed_report(by_variant, args.out, command, notes)
    print((Path(args.out) / "summary.md").read_text())
    return summary


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
