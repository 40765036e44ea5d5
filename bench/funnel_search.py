"""Every preview funnel for best-of-N within a compute budget, picked on half the prompts and scored on the other.

Reads the real rewards and preview predictions that ``bench/seed_selection.py --raw`` keeps ([P, N_max] per model
and predictor), enumerates every funnel of 1 to ``--max_stages`` preview stages (capture steps increasing, one
preview per step, survivors decreasing) whose transformer calls per prompt stay within ``--budget`` of full
best-of-N's, and ranks them by the share of full best-of-N's gain over one seed they recover on the even-indexed
prompts; the odd-indexed prompts, which played no part in the pick, give the number to quote. This is the ceiling
of preview-guided selection at that budget on these prompts, whatever funnel a user would configure::

    python bench/seed_selection.py --num_prompts 256 --predictors preview@1,preview@2,preview@3,preview@4,\
preview@5,preview@6,preview@7,preview@8 --lora runs/tiny_shapes/lora --raw runs/previews.npz --results ''
    python bench/funnel_search.py --raw runs/previews.npz --n 8 --budget 0.5

A preview in n Euler steps (``preview@k+n``, ``preview_steps`` n) costs n - 1 transformer calls; a raw
``lookahead@k+n`` is read as ``preview@(k+1)+n``, which predicts the same one call cheaper
(tests/rl/test_seed_selection.py). Selection and cost are the seed-selection bench's own
(:func:`bench.seed_selection.funnel_picks`, :func:`rl.seed_selection.selection_cost`; every preview costs one
decode and one reward call).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
from bench.probe_quality import add_to_section
from bench.seed_selection import funnel_picks, parse_predictor
from probe.metrics import probe_metrics
from rl.config_help import HelpFormatter
from rl.predictors import PredictionCost
from rl.predictors.preview import PreviewPredictor
from rl.seed_selection import full_best_of_n_cost, selection_cost

SECTION = "Seed selection: every preview funnel within half the compute (bench/funnel_search.py)"


class Stage(NamedTuple):
    """One preview a funnel can stop at: its name, the capture step and its own transformer calls per seed."""

    name: str
    step: int
    calls: int


def as_stage(spec: str, num_steps: int) -> Stage | None:
    """A raw predictor as a preview stage (``lookahead@k+n`` read as ``preview@(k+1)+n``); None: not a preview.
    Its calls are the preview's own (n - 1, fewer where n Euler steps do not fit before T)."""
    name, step, steps = parse_predictor(spec)
    if name == "lookahead":
        step += 1
    elif name != "preview":
        return None
    calls = PreviewPredictor(step, steps, num_steps).cost_per_rollout.transformer_calls
    return Stage(f"preview@{step}" + (f"+{steps}" if steps > 1 else ""), step, int(calls))


def gain_of(real: np.ndarray, picks: np.ndarray) -> float:
    """(mean of ``picks`` ``[P]`` - one seed) / (full best-of-N - one seed) over the rows of ``real`` ``[P, N]``."""
    single, full = real.mean(), real.max(axis=1).mean()
    return float((picks.mean() - single) / (full - single))


def funnels(stages: list[Stage], n: int, max_stages: int, num_steps: int, max_calls: float):
    """Every ``(stages, keeps, transformer calls)`` within ``max_calls`` per prompt: steps increasing, one stage per
    step."""
    by_step: dict[int, list[Stage]] = {}
    for stage in stages:
        by_step.setdefault(stage.step, []).append(stage)
    for count in range(1, max_stages + 1):
        for steps in itertools.combinations(sorted(by_step), count):
            for chosen in itertools.product(*(by_step[step] for step in steps)):
                costs = [PredictionCost(stage.calls, 1.0, 1.0) for stage in chosen]
                for keeps in itertools.combinations(range(n - 1, 0, -1), count):
                    cost = selection_cost(num_steps, list(steps), n, list(keeps), costs, True)
                    if cost.transformer_calls <= max_calls:
                        yield list(chosen), list(keeps), cost.transformer_calls


def search(raw: dict[str, np.ndarray], model: str, args: argparse.Namespace) -> dict:
    """Every funnel's gain on the pick half, the held-out half and all prompts; sorted by the pick half."""
    real = raw[f"{model}/real"][:, : args.n]
    previews: dict[Stage, np.ndarray] = {}
    for key in raw:
        spec = key.split("/", 1)[1]
        stage = as_stage(spec, args.num_steps) if key.startswith(f"{model}/") and "@" in spec else None
        if stage is not None and stage not in previews:  # a preview measured as such and as a lookahead: once
            previews[stage] = raw[key][:, : args.n]
    stages = sorted(previews, key=lambda stage: (stage.step, stage.calls))
    pick, held_out = np.arange(0, len(real), 2), np.arange(1, len(real), 2)
    max_calls = args.budget * full_best_of_n_cost(args.num_steps, args.n).transformer_calls
    rows = []
    for chosen, keeps, calls in funnels(stages, args.n, args.max_stages, args.num_steps, max_calls):
        picks = funnel_picks(real, [previews[stage] for stage in chosen], keeps)  # once: every half reads its prompts
        rows.append({
            "funnel": ">".join(stage.name for stage in chosen), "keeps": keeps, "transformer_calls": calls,
            "gain_pick": gain_of(real[pick], picks[pick]), "gain_held_out": gain_of(real[held_out], picks[held_out]),
            "gain_all": gain_of(real, picks),
        })  # fmt: skip
    rows.sort(key=lambda r: -r["gain_pick"])
    groups = np.repeat(np.arange(len(real)), args.n)
    srcc = {s.name: probe_metrics(previews[s].ravel(), real.ravel(), groups)["within_group_srcc"] for s in stages}
    return {"prompts": len(real), "previews": [s.name for s in stages], "preview_srcc": srcc, "max_calls": max_calls,
            "funnels": rows}  # fmt: skip


def markdown(results: dict[str, dict], args: argparse.Namespace) -> list[str]:
    models = ", ".join(f"{m}: {r['prompts']} prompts" for m, r in results.items())
    previews = next(iter(results.values()))["previews"]
    lines = [
        "",
        f"### {time.strftime('%Y-%m-%d')}: `python {' '.join(sys.argv)}`",
        "",
        f"Best-of-{args.n}, every funnel of 1-{args.max_stages} preview stages ({', '.join(previews)}; `@k+n`: in "
        f"n Euler steps, n - 1 transformer calls) within {args.budget:.2f}x of full best-of-{args.n}'s transformer "
        f"calls ({models}); picked on the even-indexed prompts, quoted on the odd ones. The {args.top} best by the "
        "pick half, then the best of each number of stages:",
    ]
    for model, result in results.items():
        rows = result["funnels"]
        srcc = ", ".join(f"{name} {v:.2f}" for name, v in result["preview_srcc"].items())
        lines += ["", f"**{model}** ({len(rows)} funnels within the budget; each preview's within-prompt Spearman "
                  f"correlation with the final reward: {srcc})", "",
                  "| funnel | keeps | calls | gain, pick half | gain, held-out half | gain, all |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        best_per_depth = [next((r for r in rows if r["funnel"].count(">") == d), None) for d in range(args.max_stages)]
        for row in rows[: args.top] + [r for r in best_per_depth if r is not None and r not in rows[: args.top]]:
            lines.append(
                f"| {row['funnel']} | {'>'.join(map(str, row['keeps']))} | {row['transformer_calls']:.0f} | "
                f"{row['gain_pick']:.0%} | {row['gain_held_out']:.0%} | {row['gain_all']:.0%} |"
            )
    return lines


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--raw", nargs="+", required=True, help="npz files of bench/seed_selection.py --raw")
    parser.add_argument("--n", type=int, default=8, help="best-of-N: the seeds started per prompt")
    parser.add_argument("--budget", type=float, default=0.5, help="transformer calls, as a share of full best-of-N")
    parser.add_argument("--max_stages", type=int, default=4, help="most preview stages in a funnel")
    parser.add_argument("--num_steps", type=int, default=10, help="denoising steps of the sampled rollouts")
    parser.add_argument("--top", type=int, default=5, help="funnels listed per model in the Markdown")
    parser.add_argument(
        "--out", default="bench/funnel_search.json", help="JSON output (the 100 best funnels per model)"
    )
    parser.add_argument("--results", default="bench/RESULTS.md", help="Markdown file of the section ('': none)")
    parser.add_argument("--models", nargs="+", help="only these models of the files (e.g. base); default: all")
    args = parser.parse_args(argv)
    raw: dict[str, np.ndarray] = {}
    for path in args.raw:  # several runs of the same prompts and seeds: their predictors side by side
        with np.load(path) as file:
            recorded_steps = file["meta/num_steps"].item() if "meta/num_steps" in file.files else args.num_steps
            if recorded_steps != args.num_steps:
                raise SystemExit(
                    f"error: {path} was sampled with {recorded_steps} denoising steps: pass --num_steps {recorded_steps}"
                )
            for key in file.files:
                if key.startswith("meta/") or (args.models and key.split("/", 1)[0] not in args.models):
                    continue  # meta/: how the file was made (bench/seed_selection.py --raw), not predictions
                if file[key].shape[1] < args.n:
                    raise SystemExit(
                        f"error: {path}: {key} holds {file[key].shape[1]} seeds per prompt, fewer than --n {args.n}"
                    )
                value = file[key][:, : args.n]  # runs of more seeds hold these N first
                if key.endswith("/real") and key in raw and not np.array_equal(raw[key], value):
                    raise SystemExit(f"{path}: {key} differs from an earlier file's (other prompts, seeds or model)")
                raw[key] = value
    models = [key.removesuffix("/real") for key in raw if key.endswith("/real")]
    if not models:
        raise SystemExit(f"error: no model's real rewards in {args.raw} (--models {args.models})")
    results = {model: search(raw, model, args) for model in models}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    kept = {m: r | {"funnels": r["funnels"][:100], "count": len(r["funnels"])} for m, r in results.items()}
    Path(args.out).write_text(json.dumps({"args": vars(args), "models": kept}, indent=1))  # the 100 best per model
    lines = markdown(results, args)
    if args.results:
        add_to_section(args.results, SECTION, lines)
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
