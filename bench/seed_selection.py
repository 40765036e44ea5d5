"""Predictor-guided best-of-N against full best-of-N on held-out prompts (the Diffusion Probe paper's seed selection).

    python bench/seed_selection.py --lora runs/tiny_shapes/lora --probe_path assets/probe/tiny-flux-shapes-ode-step4.pt
    python bench/seed_selection.py --smoke --out /tmp/seed_selection     # seconds: the test suite's check

Per model (the base, and the base plus ``--lora``): seeds 0..N_max-1 of every held-out prompt are sampled to
the end once with deterministic sampling (noise level 0, as inference), keeping every step's state, and the real
reward scores every finished image. Each predictor then reads the rollouts at its capture step k, re-running
only call k from the recorded state so its observer sees that call (the re-run reproduces the recorded state
bit for bit: asserted). Selections are evaluated from these numbers: a single seed (the mean over seeds), full
best-of-N (the best real reward among seeds 0..N-1), and predictor-pruned best-of-N keeping K
(:func:`rl.seed_selection.keep_best`, then the survivors' best real reward, :func:`~rl.seed_selection.choose`),
and funnels ``a>b`` that rank again at b's step among a's survivors (:func:`funnel_survivors`);
:class:`rl.seed_selection.SeedSelector` finishes exactly these trajectories (tests/rl/test_seed_selection.py).
Compute per prompt is :func:`rl.seed_selection.selection_cost`. One approximation: every predictor scores each
prompt's N_max seeds together, and best-of-N ranks the first N of those scores. For the previews and the
lookahead a seed's score is its own; a group-relative probe (``group_relative``) also reads its group's mean
features, so for N < N_max its rows approximate what the selector, which scores N seeds, would pick.

Writes ``<out>.json``, ``<out>.png`` (reward against transformer calls) and a section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import numpy as np
import torch
from diffusers import FluxPipeline

from bench.probe_quality import add_to_section
from probe.metrics import expected_best_of_random_subset
from rewards.compose import build_reward_set
from rewards.shapes import all_prompts
from rl.config_help import HelpFormatter
from rl.predictors import PredictionCost, PredictionInputs, reward_scores
from rl.predictors.lookahead import LookaheadPredictor
from rl.predictors.preview import PreviewPredictor
from rl.sampler import FluxSampler, Rollouts, encode_prompts
from rl.seed_selection import choose, full_best_of_n_cost, keep_best_of, predictor_for, selection_cost

SECTION = "Seed selection: predictor-guided best-of-N (bench/seed_selection.py)"


def parse_predictor(spec: str) -> tuple[str, int, int]:
    """``name@k`` or ``name@k+n`` -> (name, capture step k, Euler steps n of a lookahead (default 2) or preview
    (default 1))."""
    name, _, where = spec.partition("@")
    step, _, steps = where.partition("+")
    return name, int(step), int(steps or (2 if name == "lookahead" else 1))


def recorded_cost(spec: str, num_steps: int) -> PredictionCost:
    """The per-rollout cost of a preview or lookahead prediction ``name@k[+n]`` (what :func:`measure_model`
    measured), to price predictions read back from a ``--raw`` file."""
    name, k, steps = parse_predictor(spec)
    if name == "preview":
        return PreviewPredictor(k, steps, num_steps).cost_per_rollout
    if name == "lookahead":
        return LookaheadPredictor(k, num_steps, steps).cost_per_rollout
    if name == "probe":
        return PredictionCost()  # it reads the capture step's own forward
    raise ValueError(f"{spec}: a {name!r} prediction is not priced from a raw file; measure it again instead")


def read_raw(path: str, predictors: list[str], num_steps: int, reward: str) -> dict[str, tuple]:
    """``model -> (real, predictions, costs)`` as :func:`measure_model` returns them, from a ``--raw`` file.

    Raises:
        ValueError: the file was measured with other steps or another reward (its predictions would be priced or
            read wrongly), or lacks a predictor.
    """
    raw = np.load(path)
    measured = {"num_steps": num_steps, "reward": reward}
    recorded = {key: raw[f"meta/{key}"].item() if f"meta/{key}" in raw.files else None for key in measured}
    if recorded != measured:
        raise ValueError(f"{path} was measured with {recorded}, this report asks for {measured}: pass the same")
    models = list(dict.fromkeys(key.rsplit("/", 1)[0] for key in raw.files if key.endswith("/real")))
    missing = [f"{m}/{spec}" for m in models for spec in predictors if f"{m}/{spec}" not in raw.files]
    if missing:
        raise ValueError(f"{path} holds no {', '.join(missing)}; it holds {', '.join(raw.files)}")
    return {
        model: (raw[f"{model}/real"], {spec: raw[f"{model}/{spec}"] for spec in predictors},
                {spec: recorded_cost(spec, num_steps) for spec in predictors})
        for model in models
    }  # fmt: skip


@torch.no_grad()
def measure_model(
    pipeline: FluxPipeline, args: argparse.Namespace, predictors: list[str]
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, PredictionCost]]:
    """Real rewards ``[P, N]`` and, per predictor, predictions ``[P, N]`` and its cost per rollout."""
    side = pipeline.vae.config.sample_size  # the model's native size (the shipped tiny model: 64 px)
    sampler = FluxSampler(pipeline, args.num_steps, 0.0, 3.5, side, side, batch_size=32)
    specs = list(all_prompts("test"))
    specs = [specs[int(i)] for i in np.linspace(0, len(specs) - 1, args.num_prompts).round()]
    embeds = encode_prompts(pipeline, [s.prompt for s in specs], args.max_sequence_length)
    reward = build_reward_set(args.reward)
    n = args.max_n
    prompt_index = torch.arange(len(specs)).repeat_interleave(n)
    texts = [specs[i].prompt for i in prompt_index.tolist()]
    metadata = [specs[i].to_dict() for i in prompt_index.tolist()]

    def score(latents: torch.Tensor):
        return reward(sampler.decode(latents), texts, metadata)

    full = sampler.advance(sampler.start(prompt_index, torch.arange(n).repeat(len(specs))), embeds, args.num_steps)
    real = reward_scores(score(full.latents)).view(len(specs), n).numpy()
    predictions, costs = {}, {}
    for spec in predictors:
        name, k, steps = parse_predictor(spec)
        probe = args.probe_path if name == "probe" else ""
        predictor = predictor_for(name, sampler, k, steps, probe, steps, text_length=args.max_sequence_length)
        before = Rollouts(full.prompt_index, full.seeds, full.states[:, :k], full.log_probs[:, : k - 1])
        observer = predictor.observer(sampler)
        early = sampler.advance(before, embeds, k, observer)
        if not torch.equal(early.latents, full.states[:, k]):
            raise RuntimeError(f"{spec}: re-running call {k} did not reproduce the recorded state")
        prediction = predictor.predict(PredictionInputs(sampler, embeds, early, observer, score))
        predictions[spec] = prediction.scores.float().cpu().view(len(specs), n).numpy()
        costs[spec] = prediction.cost.per_rollout(len(early))
    return real, predictions, costs


def stage_keeps(n: int, stages: int) -> list[list[int]]:
    """The (N, K) settings measured: K in 1, 2, N/4 for one stage; a two-stage funnel keeps N/4, 3N/8, N/2 or
    5N/8 at its first stage and 1 or 2 (fewer) at its second."""
    finals = sorted({1, 2, max(1, n // 4)})
    if stages == 1:
        return [[k] for k in finals]
    firsts = sorted({max(1, round(n * f)) for f in (0.25, 0.375, 0.5, 0.625)})
    return [[first, k] for first in firsts for k in (1, 2) if k < first]


def funnel_survivors(predicted: list[np.ndarray], keeps: list[int]) -> list[int]:
    """One prompt's survivors (indices into its seeds): each stage keeps the predicted best of the stage before's
    survivors (:func:`rl.seed_selection.keep_best_of`, as :class:`rl.seed_selection.SeedSelector` ranks them)."""
    alive = list(range(len(predicted[0])))
    for scores, keep in zip(predicted, keeps):
        alive = keep_best_of(torch.as_tensor(scores), alive, keep)
    return alive


def funnel_picks(real: np.ndarray, predicted: list[np.ndarray], keeps: list[int]) -> np.ndarray:
    """``[P]`` the real reward of the image a funnel returns for each prompt of ``real`` ``[P, N]``: its last
    survivors (predictions ``[P, N]`` per stage) are finished and the best by the real reward is returned."""
    chosen = []
    for p in range(len(real)):
        kept = funnel_survivors([stage[p] for stage in predicted], keeps)
        chosen.append(real[p, choose(kept, torch.as_tensor(real[p, kept]))])
    return np.array(chosen)


def evaluate_selections(
    real: np.ndarray, predictions: dict[str, np.ndarray], costs: dict[str, PredictionCost], args: argparse.Namespace
) -> dict:
    """Mean real reward and compute of single seed, full best-of-N and every predictor's (or funnel's) (N, K)."""
    num_steps = args.num_steps
    single = float(real.mean())
    full = {m: float(real[:, :m].max(axis=1).mean()) for m in range(1, real.shape[1] + 1)}
    rows = []
    for spec in args.selections:
        stages = spec.split(">")
        steps = [parse_predictor(stage)[1] for stage in stages]
        for n in args.best_of:
            for keeps in stage_keeps(n, len(stages)):
                chosen = funnel_picks(real[:, :n], [predictions[stage][:, :n] for stage in stages], keeps)
                cost = selection_cost(num_steps, steps, n, keeps, [costs[stage] for stage in stages], scored=True)
                full_cost = full_best_of_n_cost(num_steps, n)
                reward = float(np.mean(chosen))
                gain = full[n] - single
                rows.append({
                    "predictor": spec, "n": n, "keep": keeps[-1], "stage_keeps": keeps, "reward": reward,
                    "gain_recovered": (reward - single) / gain if gain > 0 else float("nan"),
                    "transformer_calls": cost.transformer_calls, "decodes": cost.decodes,
                    "reward_calls": cost.reward_calls,
                    "calls_vs_full": cost.transformer_calls / full_cost.transformer_calls,
                })  # fmt: skip
    curve = expected_best_of(real)
    for row in rows:
        row["speedup_at_equal_reward"] = calls_to_reach(curve, row["reward"], num_steps) / row["transformer_calls"]
    speedups = {
        spec: float(np.nanmax([r["speedup_at_equal_reward"] for r in rows if r["predictor"] == spec]))
        for spec in args.selections
    }
    return {
        "single_seed": single, "full_best_of": full, "expected_best_of": curve, "rows": rows,
        "speedup_at_equal_reward": speedups,
    }  # fmt: skip


def expected_best_of(real: np.ndarray) -> dict[int, float]:
    """``m ->`` the mean over prompts of the expected best of m seeds drawn at random from each prompt's n,
    m = 1..n (exact from the order statistics), so m = 1 is the mean seed and the curve is smooth where the first m
    seeds' best is noisy."""
    return {
        m: float(np.mean([expected_best_of_random_subset(row, m) for row in real])) for m in range(1, real.shape[1] + 1)
    }


def calls_to_reach(curve: dict[int, float], reward: float, num_steps: int) -> float:
    """Transformer calls full best-of-m needs for ``reward`` on ``curve`` (:func:`expected_best_of`), linear in m
    between its points; one seed's calls for a reward at or below one seed's; nan beyond best-of-n."""
    ms = sorted(curve)
    if reward <= curve[ms[0]]:
        return float(ms[0] * num_steps)
    for low, high in zip(ms, ms[1:]):
        if reward <= curve[high] + 1e-9:  # a selection that always keeps the best seed sits on best-of-n
            span = curve[high] - curve[low]
            return num_steps * (min(high, low + (reward - curve[low]) / span) if span > 0 else low)
    return float("nan")


def plot(results: dict[str, dict], num_steps: int, path: Path) -> None:
    """Mean reward against transformer calls per prompt: full best-of-m as a line, each predictor's (N, K) as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for axis, (model, result) in zip(axes[0], results.items()):
        full = result["expected_best_of"]
        m = sorted(int(key) for key in full)
        axis.plot([i * num_steps for i in m], [full[i] for i in m], "k-o", ms=3, label="full best-of-m (expected)")
        for spec in dict.fromkeys(r["predictor"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["predictor"] == spec]
            axis.scatter([r["transformer_calls"] for r in rows], [r["reward"] for r in rows], label=spec, s=18)
        axis.set(title=model, xlabel="transformer calls per prompt", ylabel="mean held-out reward", xscale="log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def markdown(results: dict[str, dict], args: argparse.Namespace, seconds: float) -> list[str]:
    lines = [
        "",
        f"### {time.strftime('%Y-%m-%d')}: `python {' '.join(sys.argv)}`",
        "",
        f"{args.num_prompts} held-out prompts x seeds 0-{args.max_n - 1}, deterministic sampling ({args.num_steps} "
        f"steps, noise 0, fp32), reward `{args.reward}`; "
        + (
            f"read back from `{args.from_raw}`. "
            if args.from_raw
            else f"{seconds:.0f} s on {args.threads or 'default'} thread(s). "
        )
        + "`name@k`: the predictor read after k steps (preview: x0 of call k; lookahead: 2 Euler steps from step k); "
        "`name@k+n`: in n Euler steps (a preview's first one is call k's own); "
        "`a>b`: a funnel, K `K1>K2` the survivors of each stage. "
        "Gain recovered = (reward - single seed) / (full best-of-N - single seed); calls per prompt include the "
        "predictor's; decodes and reward calls are listed beside them. Speedup at equal reward: the calls full "
        "best-of-m needs for the row's reward (m seeds drawn at random, expected from the order statistics, linear "
        "between m) over the row's calls; below 1x the selection is slower than sampling more seeds.",
    ]
    for model, result in results.items():
        full = result["full_best_of"]
        fulls = ", ".join(f"best-of-{n} {full[n]:.3f} ({n * args.num_steps} calls)" for n in args.best_of)
        lines += [
            "",
            f"**{model}**: single seed {result['single_seed']:.3f}; full {fulls}.",
            "",
            "| predictor | N | K | reward | gain recovered | transformer calls (vs full) | speedup at equal reward | decodes | reward calls |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in result["rows"]:
            lines.append(
                f"| {r['predictor']} | {r['n']} | {'>'.join(map(str, r['stage_keeps']))} | {r['reward']:.3f} | {r['gain_recovered']:.0%} | "
                f"{r['transformer_calls']:g} ({r['calls_vs_full']:.2f}x) | {r['speedup_at_equal_reward']:.2f}x | "
                f"{r['decodes']:g} | {r['reward_calls']:g} |"
            )
        speedups = ", ".join(f"{k} {v:.2f}x" for k, v in result["speedup_at_equal_reward"].items())
        lines += ["", f"Best speedup at equal reward per predictor (below 1x: slower than full best-of-m): {speedups}."]
    return lines


def load_model(pretrained: str, lora: str | None) -> FluxPipeline:
    """The fp32 pipeline, with ``lora`` loaded when given."""
    pipeline = FluxPipeline.from_pretrained(pretrained, torch_dtype=torch.float32)
    if lora:
        pipeline.load_lora_weights(lora)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--pretrained", default="assets/tiny-flux-shapes", help="base FluxPipeline folder")
    parser.add_argument("--lora", help="a trainer's LoRA export: measured beside the base model")
    parser.add_argument("--num_prompts", type=int, default=64, help="held-out prompts (spread over shapes:test)")
    parser.add_argument("--max_n", type=int, default=16, help="seeds sampled per prompt (the largest N)")
    parser.add_argument("--best_of", type=int, nargs="+", default=[4, 8, 16], help="N values; K is 1, 2 and N/4")
    parser.add_argument(
        "--predictors",
        default="preview@3,preview@4,lookahead@2,lookahead@3,preview@3>preview@5",
        help="comma-separated name@k[+n] (n: Euler steps of a lookahead or preview), or funnels: name@k>name@k",
    )
    parser.add_argument("--probe_path", help="a probe trained under noise level 0: adds probe@<its step>")
    parser.add_argument("--reward", default="shapes", help="the real reward")
    parser.add_argument("--num_steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--max_sequence_length", type=int, default=16, help="T5 tokens (the tiny model: 16)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", default="bench/seed_selection", help="writes <out>.json and <out>.png")
    parser.add_argument("--results", default="bench/RESULTS.md", help="Markdown file of the section ('': none)")
    parser.add_argument("--raw", help="also write every real reward and prediction ([P, N] per model) to this .npz")
    parser.add_argument(
        "--from_raw", help="report from a --raw file of an earlier run instead of sampling (previews, lookaheads)"
    )
    parser.add_argument("--smoke", action="store_true", help="2 prompts x 4 seeds, N = 4, no RESULTS section")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_prompts, args.max_n, args.best_of, args.results = 2, 4, [4], ""
    if args.threads:
        torch.set_num_threads(args.threads)
    args.selections = [p for p in args.predictors.split(",") if p]
    if args.probe_path:
        from probe import Probe

        args.selections.append(f"probe@{Probe.load(args.probe_path).capture_step}")
    predictors = list(dict.fromkeys(stage for spec in args.selections for stage in spec.split(">")))
    started = time.perf_counter()
    results, raw = {}, {}
    models = {"base": None} | ({"base + LoRA": args.lora} if args.lora else {})
    if args.from_raw:
        measured = read_raw(args.from_raw, predictors, args.num_steps, args.reward)
        args.num_prompts, args.max_n = next(iter(measured.values()))[0].shape
        if max(args.best_of) > args.max_n:
            parser.error(f"--best_of {max(args.best_of)}: {args.from_raw} holds {args.max_n} seeds per prompt")
    else:
        measured = {
            model: measure_model(load_model(args.pretrained, lora), args, predictors) for model, lora in models.items()
        }
    for model, (real, predictions, costs) in measured.items():
        raw |= {f"{model}/real": real} | {f"{model}/{spec}": values for spec, values in predictions.items()}
        results[model] = evaluate_selections(real, predictions, costs, args)
    seconds = time.perf_counter() - started
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"command": " ".join(sys.argv), "args": vars(args), "seconds": seconds, "models": results}
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    plot(results, args.num_steps, out.with_suffix(".png"))
    if args.raw:
        np.savez(args.raw, **raw, **{"meta/num_steps": args.num_steps, "meta/reward": args.reward})
    lines = markdown(results, args, seconds) if not args.smoke else []
    if args.results:
        add_to_section(args.results, SECTION, lines)
    print("\n".join(lines) or json.dumps({m: r["full_best_of"] for m, r in results.items()}))
    return report


if __name__ == "__main__":
    main()
