"""Pruned vs unpruned vs random-pruned GRPO under one budget, same seeds and prompt order; table + plots.

    python launch/ablate.py --config configs/tiny_shapes.yaml --budget_minutes 20 \\
        --prune_policy topk --probe_path assets/probe/<probe>.pt --capture_step 2
    python launch/ablate.py --config ... --budget_images 4000 --variants pruned,unpruned   # equal compute
    python launch/ablate.py --out runs/ablate --report_only                               # re-read finished runs

Every argument this script does not own is passed to each run (``launch/grpo_flux.py``, one process per variant,
sequentially so they do not compete for cores); the variants differ only in their pruning keys (rl/ablation.py).
Writes ``<out>/<variant>/`` (each run), ``<out>/ablation.{json,md}``, ``reward_vs_wallclock.png`` and
``reward_vs_images.png``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rl.ablation import read_run, variant_overrides, write_report
from rl.config import parse_config

ROOT = Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--variants", default="pruned,unpruned,random", help="comma-separated, run in this order")
    parser.add_argument("--budget_minutes", type=float, default=0.0, help="wall-clock budget per run (max_minutes)")
    parser.add_argument("--budget_images", type=float, default=0.0, help="denoised-image budget per run")
    parser.add_argument("--max_steps", type=int, default=100_000, help="step cap; the budget normally stops first")
    parser.add_argument("--eval_prompts_count", type=int, default=64, help="held-out prompts of every evaluation")
    parser.add_argument("--eval_every", type=int, default=5, help="evaluate every N steps (the curves' points)")
    parser.add_argument("--out", default="runs/ablate", help="folder of the runs and the report")
    parser.add_argument("--report_only", action="store_true", help="only read finished runs and write the report")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args, passthrough = parse(argv)
    variants = [v for v in args.variants.split(",") if v]
    shared = [*passthrough, "--max_steps", str(args.max_steps), "--eval_every", str(args.eval_every)]
    shared += ["--eval_num_prompts", str(args.eval_prompts_count), "--final_eval_num_prompts"]
    shared += [str(args.eval_prompts_count), "--eval_before_training", "true"]
    commands = {}
    for variant in variants:
        overrides = [*shared, *variant_overrides(variant, args.out, args.budget_minutes, args.budget_images)]
        config = parse_config(overrides)  # fail on a bad key or value before any run starts
        if variant == "pruned" and config.pruning.prune_policy in ("none", "random"):
            raise SystemExit(
                f"the pruned variant runs the config's prune_policy, here {config.pruning.prune_policy!r}: "
                "pass --prune_policy topk|maxvar|threshold and --probe_path"
            )
        commands[variant] = [sys.executable, str(ROOT / "launch" / "grpo_flux.py"), *overrides]
    if not args.report_only:
        env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled")}
        for variant, command in commands.items():
            print(f"=== {variant}: {' '.join(command[1:])}", flush=True)
            subprocess.run(command, check=True, env=env)
    runs = [read_run(variant, Path(args.out) / variant) for variant in variants]
    report = write_report(runs, args.out, " ".join(["python launch/ablate.py", *(argv or sys.argv[1:])]))
    print((Path(args.out) / "ablation.md").read_text())
    return report


if __name__ == "__main__":
    main()
