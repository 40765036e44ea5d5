"""Probe quality vs capture step, feature set and loss; the noise ceiling; capture + probe overhead.

One run measures, side by side on the same collected data (``launch/probe_collect.py``):

1. **Quality**: for every capture step k, feature set (attention / x0 / combined) and loss (MSE / MSE +
   within-group ranking), a probe trained on the training collection (split by prompt: 10% of the training
   prompts select the checkpoint) and evaluated on the held-out collection (other prompts): global PCC, SRCC,
   AUC-ROC (label: reward above the test median), within-group SRCC, top-half recall, regret.
2. **Ceiling**: how much of a rollout's final reward is fixed at step k at all. Held-out prompts are sampled to
   step k, then each state is finished three times with different SDE noise; "oracle" predicts the third
   continuation's reward by the mean of the first two (an estimate of E[reward | state at step k], which no
   probe reading that state can beat except by luck). Its within-group SRCC bounds what any step-k probe can do.
3. **Overhead**: capture + features + probe inference, as a fraction of the unpruned rollout phase (T steps,
   VAE decode, reward), timed interleaved in this process.

With ``--train_prompts`` / ``--test_prompts`` > 0 it first collects (or finishes collecting: collections resume)
that many prompts x ``--group_size`` seeds into ``--train_data`` / ``--test_data`` with the GRPO sampler's settings,
so one command runs end to end. Writes JSON and adds a table to the "Probe quality" section of
``bench/RESULTS.md``::

    python bench/probe_quality.py --train_prompts 64 --test_prompts 32 --fit_steps 300   # small: ~15 min, 1 core
    python bench/probe_quality.py --train_data runs/probe/train --test_data runs/probe/test   # existing data
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import numpy as np
import torch
from diffusers import FluxPipeline

from probe.capture import ProbeRecorder
from probe.collect import CollectSettings, collect, prompt_source, run_config_defaults
from probe.data import load_dataset, read_manifest
from probe.features import FEATURE_SETS, feature_config
from probe.metrics import probe_metrics
from probe.train import FitConfig, collection_meta, train_probe
from rewards.compose import build_reward_set
from rl.config_help import ConfigParser
from rl.sampler import FluxSampler, encode_prompts

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS_HEADER = (
    "# Benchmark results\n\nEach script in `bench/` appends its rows here with the command that produced them; "
    "timings are medians of interleaved repeats on the machine named in the section (ratios travel, seconds do not)."
)
RESULTS_SECTION = "Probe quality (bench/probe_quality.py)"
METRICS = ("pcc", "srcc", "auc", "within_group_srcc", "top_half_recall", "regret", "regret_random")


def _option(default, help: str = "", factory=None):
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class BenchArgs:
    train_data: list[str] = _option(None, "training collections", lambda: ["runs/probe/train"])
    test_data: list[str] = _option(None, "held-out collections", lambda: ["runs/probe/test"])
    run_config: str = _option("configs/tiny_shapes.yaml", "run config whose model and sampler collections use")
    train_prompts: int = _option(0, "collect this many shapes:train prompts into train_data[0] first (0: use as is)")
    test_prompts: int = _option(0, "collect this many shapes:test prompts into test_data[0] first (0: use as is)")
    group_size: int = _option(8, "seeds per prompt when collecting")
    collect_batch_size: int = _option(32, "rollouts per transformer call when collecting")
    steps: list[int] = _option(None, "capture steps to compare", lambda: [1, 2, 3, 4])
    features: list[str] = _option(None, "feature sets", lambda: ["attention", "x0", "combined"])
    rank_weights: list[float] = _option(None, "0 = MSE only; >0 adds the ranking term", lambda: [0.0, 1.0])
    fit_steps: int = _option(1500, "optimizer steps per probe")
    width: int = _option(16, "probe CNN width")
    group_relative: bool = _option(False, "probes also read deviations from the group mean (probe/model.py)")
    seed: int = _option(0, "probe training seed")
    ceiling_prompts: int = _option(48, "held-out prompts for the ceiling (0 skips it)")
    timing_prompts: int = _option(8, "prompts (x group size) per timed rollout batch (0 skips timing)")
    timing_repeats: int = _option(3, "interleaved repetitions of each timed variant")
    out: str = _option("bench/probe_quality.json", "JSON output")
    results: str = _option("bench/RESULTS.md", "Markdown file the rows are appended to")
    threads: int = _option(1, "torch CPU threads (1: stable timings on a shared machine)")


def collect_data(args: BenchArgs) -> dict[str, float]:
    """Collect (or resume) the training and held-out collections asked for; seconds per collection."""
    seconds = {}
    jobs = [("train", args.train_data[0], "shapes:train", args.train_prompts, 0),
            ("test", args.test_data[0], "shapes:test", args.test_prompts, 1)]  # fmt: skip
    jobs = [job for job in jobs if job[3] > 0]
    if not jobs:
        return seconds
    run = run_config_defaults(args.run_config)  # the trainer's sampler: SDE window, noise, precision, size
    pipeline = FluxPipeline.from_pretrained(run["pipeline"], torch_dtype=getattr(torch, run["dtype"]))
    pipeline.set_progress_bar_config(disable=True)
    for name, out, prompts, count, seed in jobs:
        settings = CollectSettings(
            pipeline=run["pipeline"], prompts=prompts, num_prompts=count, group_size=args.group_size,
            num_steps=run["num_steps"], capture_steps=sorted(set(args.steps)), noise_level=run["noise_level"],
            guidance_scale=run["guidance_scale"], resolution=run["resolution"], text_length=run["text_length"],
            blocks=[], reward=run["reward"], reward_kwargs=json.loads(run["reward_kwargs"]), prompts_per_shard=8,
            seed=seed, sde_steps=run["sde_steps"] or None, precision=run["precision"],
        )  # fmt: skip
        start = time.perf_counter()
        collect(pipeline, settings, out, batch_size=args.collect_batch_size)
        seconds[name] = time.perf_counter() - start
        print(f"collected {name}: {count} prompts x {args.group_size} seeds in {out} ({seconds[name]:.0f} s)")
    return seconds


def quality(args: BenchArgs) -> list[dict]:
    """Every (step, feature set, loss) probe, on features computed once per step (feature sets are channel subsets)."""
    rows = []
    full = FEATURE_SETS["combined"]
    for step in args.steps:
        meta = collection_meta([*args.train_data, *args.test_data], step)
        train = load_dataset(args.train_data, step, full)
        test = load_dataset(args.test_data, step, full)
        x0_channels = train.features.shape[1] - full.num_channels(len(meta.blocks), 0)
        for features in args.features:
            indices = feature_config(features).channels_within(full, meta.blocks, x0_channels)
            for rank_weight in args.rank_weights:
                fit_config = FitConfig(
                    steps=args.fit_steps, rank_weight=rank_weight, select_metric="within_group_srcc",
                    eval_every=100, seed=args.seed,
                )  # fmt: skip
                start = time.perf_counter()
                model_kwargs = {"width": args.width, "group_relative": args.group_relative}
                _, report = train_probe(
                    train.channels(indices), test.channels(indices), features, meta, fit_config, model_kwargs
                )
                row = {"step": step, "features": features, "rank_weight": rank_weight,
                       "train_s": time.perf_counter() - start, **{m: report.test[m] for m in METRICS},
                       "validation_within_group_srcc": report.validation.get("within_group_srcc")}  # fmt: skip
                rows.append(row)
                print(_quality_line(row), flush=True)
    return rows


def _quality_line(row: dict) -> str:
    loss = "MSE" if not row["rank_weight"] else f"MSE+{row['rank_weight']:g}*rank"
    cells = [str(row["step"]), row["features"], loss] + [f"{row[m]:.3f}" for m in METRICS]
    return "| " + " | ".join(cells) + " |"


def _sampler_and_prompts(manifest: dict, count: int, seed: int):
    pipeline = FluxPipeline.from_pretrained(manifest["pipeline"], torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    sampler = FluxSampler(
        pipeline,
        manifest["num_steps"],
        manifest["noise_level"],
        manifest["guidance_scale"],
        manifest["resolution"],
        manifest["resolution"],
        batch_size=32,
        sde_steps=manifest.get("sde_steps"),
    )  # fmt: skip: the collection's SDE window too, so the ceiling is measured under the probe's own sampler
    items = prompt_source(manifest["prompts"], count, seed)
    return pipeline, sampler, items


@torch.no_grad()
def ceiling(args: BenchArgs, manifest: dict) -> list[dict]:
    """Within-group predictability of the final reward from the state at step k (see the module docstring)."""
    pipeline, sampler, items = _sampler_and_prompts(manifest, args.ceiling_prompts, seed=manifest["seed"] + 7)
    reward_set = build_reward_set(manifest["reward"], kwargs=manifest["reward_kwargs"])
    group_size = manifest["group_size"]
    embeds = encode_prompts(pipeline, [p for p, _ in items], manifest["text_length"])
    prompt_index = torch.arange(len(items)).repeat_interleave(group_size)
    seeds = 900_000_000 + torch.arange(len(prompt_index))
    prompts = [items[i][0] for i in prompt_index.tolist()]
    metadata = [items[i][1] for i in prompt_index.tolist()]
    rows = []
    state = sampler.start(prompt_index, seeds)
    for step in sorted(args.steps):
        # a capture-step-k probe reads the input of call k, the state after k - 1 steps: the ceiling of step k
        # is that state's, so the rows compare like with like
        state = sampler.advance(state, embeds, until_step=step - 1)
        rewards = []
        for continuation in range(3):
            other_noise = dataclasses.replace(state, seeds=seeds + (continuation + 1) * 1_000_003)
            done = sampler.advance(other_noise, embeds, until_step=sampler.num_steps)
            rewards.append(reward_set(sampler.decode(done.latents), prompts, metadata).total)
        oracle = probe_metrics((rewards[0] + rewards[1]) / 2, rewards[2], prompt_index)
        pairs = [probe_metrics(rewards[a], rewards[b], prompt_index) for a, b in ((0, 1), (0, 2), (1, 2))]
        agreement = {m: float(np.mean([p[m] for p in pairs])) for m in ("pcc", "within_group_srcc")}
        # Two continuations agree with correlation v = Var(E[R | state]) / Var(R); the best possible predictor,
        # E[R | state], correlates with R by sqrt(v) (Spearman-Brown; approximate for rank correlations).
        bound = {m: float(np.sqrt(max(v, 0.0))) for m, v in agreement.items()}
        rows.append({"step": step, "oracle": oracle, "agreement": agreement, "bound": bound})
        print(f"ceiling step {step}: oracle (mean of 2 -> 3rd) within-group srcc {oracle['within_group_srcc']:.3f} "
              f"recall {oracle['top_half_recall']:.3f} pcc {oracle['pcc']:.3f}; bound within-group srcc "
              f"{bound['within_group_srcc']:.3f} pcc {bound['pcc']:.3f}", flush=True)  # fmt: skip
    reward_set.close()
    return rows


@torch.no_grad()
def overhead(args: BenchArgs, manifest: dict, probe_step: int) -> dict:
    """Seconds per rollout batch of each phase, medians of interleaved repeats, and the overhead fraction."""
    from probe.features import build_features
    from probe.model import ProbeModelConfig
    from probe.probe import Probe, ProbeMeta

    pipeline, sampler, items = _sampler_and_prompts(manifest, args.timing_prompts, seed=manifest["seed"] + 11)
    reward_set = build_reward_set(manifest["reward"], kwargs=manifest["reward_kwargs"])
    group_size = manifest["group_size"]
    embeds = encode_prompts(pipeline, [p for p, _ in items], manifest["text_length"])
    prompt_index = torch.arange(len(items)).repeat_interleave(group_size)
    prompts = [items[i][0] for i in prompt_index.tolist()]
    metadata = [items[i][1] for i in prompt_index.tolist()]
    start = sampler.start(prompt_index, torch.arange(len(prompt_index)))
    blocks = tuple(manifest["blocks"])
    timed_probe = None
    times: dict[str, list[float]] = {
        k: [] for k in ("rollout", "reward", "early", "early_capture", "features", "predict")
    }
    for repeat in range(args.timing_repeats + 1):  # round 0 warms up (allocator, kernels) and is dropped
        if repeat == 1:
            times = {k: [] for k in times}
        t = time.perf_counter()
        done = sampler.advance(start, embeds, sampler.num_steps)
        images = sampler.decode(done.latents)
        times["rollout"].append(time.perf_counter() - t)
        t = time.perf_counter()
        reward_set(images, prompts, metadata)
        times["reward"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sampler.advance(start, embeds, probe_step)
        times["early"].append(time.perf_counter() - t)
        recorder = ProbeRecorder.for_sampler(sampler, probe_step, blocks, manifest["text_length"])
        t = time.perf_counter()
        sampler.advance(start, embeds, probe_step, observer=recorder)
        capture = recorder.result()
        times["early_capture"].append(time.perf_counter() - t)
        t = time.perf_counter()
        features = build_features(capture, embeds.token_mask[prompt_index], "combined")
        times["features"].append(time.perf_counter() - t)
        if timed_probe is None:
            meta = ProbeMeta("bench", "", probe_step, sampler.num_steps, blocks, capture.grid, 0, 0.0, "")
            timed_probe = Probe(ProbeModelConfig(features.shape[1], width=args.width), FEATURE_SETS["combined"], meta)
        t = time.perf_counter()
        timed_probe.predict(features, capture.sigma)
        times["predict"].append(time.perf_counter() - t)
    reward_set.close()
    median = {k: statistics.median(v) for k, v in times.items()}
    capture_cost = max(0.0, median["early_capture"] - median["early"])
    extra = capture_cost + median["features"] + median["predict"]
    phase = median["rollout"] + median["reward"]
    result = {
        "rollouts": len(prompt_index),
        "capture_step": probe_step,
        "seconds": median,
        "capture_s": capture_cost,
        "overhead_s": extra,
        "overhead_fraction_of_rollout_phase": extra / phase,
        "overhead_fraction_of_denoise_decode": extra / median["rollout"],
    }
    print(f"overhead at step {probe_step}: capture {capture_cost:.3f}s + features {median['features']:.3f}s + "
          f"predict {median['predict']:.3f}s = {extra:.3f}s vs rollout phase {phase:.2f}s "
          f"({len(prompt_index)} rollouts) -> {100 * extra / phase:.2f}%", flush=True)  # fmt: skip
    return result


def add_to_section(path: str | Path, title: str, lines: list[str]) -> None:
    """Insert ``lines`` at the end of the ``## title`` section of a Markdown file (created, with the section, if absent).

    Other benchmarks write their own sections to the same file; a run's rows go under its own heading.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else RESULTS_HEADER + "\n"
    heading = f"## {title}"
    existing = text.splitlines()
    if heading not in existing:
        existing += ["", heading]
    start = existing.index(heading)
    end = next((i for i in range(start + 1, len(existing)) if existing[i].startswith("## ")), len(existing))
    while end > start + 1 and not existing[end - 1].strip():
        end -= 1  # insert after the section's last non-blank line
    updated = existing[:end] + lines + ([""] if end < len(existing) else []) + existing[end:]
    path.write_text("\n".join(updated).rstrip("\n") + "\n")


def write_results(
    args: BenchArgs, manifest: dict, rows: list[dict], ceilings: list[dict], cost: dict | None, seconds: dict
) -> None:
    train = read_manifest(args.train_data[0])
    test = read_manifest(args.test_data[0])
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
    lines = [
        "",
        f"### {datetime.date.today().isoformat()}: `{' '.join(sys.argv)}`",
        "",
        f"Wall time on {args.threads} thread(s): {stages}.",
        "",
        f"Model `{manifest['pipeline']}` (weights fingerprint {manifest.get('weights', 'not recorded')}), "
        f"T = {manifest['num_steps']}, SDE noise level {manifest['noise_level']}, "
        f"blocks {manifest['blocks']}, reward `{manifest['reward']}`. Train: {train['num_prompts']} x "
        f"{train['group_size']} ({train['prompts']}); held-out: {test['num_prompts']} x {test['group_size']} "
        f"({test['prompts']}). AUC label: reward > median held-out reward. Probe width {args.width}"
        f"{', group-relative input' if args.group_relative else ''}, "
        f"{args.fit_steps} steps, checkpoint picked on within-group SRCC of 10% of the training prompts.",
        "",
        "| k | features | loss | PCC | SRCC | AUC | within-group SRCC | top-half recall | regret | regret (random half) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *[_quality_line(row) for row in rows],
    ]
    if ceilings:
        lines += [
            "",
            f"Ceiling ({args.ceiling_prompts} held-out prompts x {manifest['group_size']}): each step-k state "
            "finished 3 times with other SDE noise. Oracle = mean reward of 2 continuations predicting the 3rd; "
            "bound = sqrt(agreement of two continuations), the correlation E[reward | step-k state] would reach.",
            "",
            "| k | oracle PCC | oracle within-group SRCC | oracle top-half recall | oracle regret | bound PCC | "
            "bound within-group SRCC |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for c in ceilings:
            o, b = c["oracle"], c["bound"]
            lines.append(f"| {c['step']} | {o['pcc']:.3f} | {o['within_group_srcc']:.3f} | {o['top_half_recall']:.3f} "
                         f"| {o['regret']:.3f} | {b['pcc']:.3f} | {b['within_group_srcc']:.3f} |")  # fmt: skip
    if cost:
        s = cost["seconds"]
        lines += [
            "",
            f"Overhead at k = {cost['capture_step']} ({cost['rollouts']} rollouts, medians): capture "
            f"{cost['capture_s']:.3f} s + features {s['features']:.3f} s + probe {s['predict']:.3f} s = "
            f"{cost['overhead_s']:.3f} s, **{100 * cost['overhead_fraction_of_rollout_phase']:.2f}%** of the "
            f"unpruned rollout phase ({s['rollout']:.2f} s denoise + decode, {s['reward']:.2f} s reward).",
        ]
    add_to_section(args.results, RESULTS_SECTION, lines)


def main() -> None:
    (args,) = ConfigParser((BenchArgs,), description=__doc__).parse_args_and_config()
    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = {f"collect {k}": v for k, v in collect_data(args).items()}
    manifest = read_manifest(args.test_data[0])
    start = time.perf_counter()
    rows = quality(args)
    seconds["probes"] = time.perf_counter() - start
    start = time.perf_counter()
    ceilings = ceiling(args, manifest) if args.ceiling_prompts else []
    seconds["ceiling"] = time.perf_counter() - start
    start = time.perf_counter()
    cost = overhead(args, manifest, 2 if 2 in args.steps else args.steps[0]) if args.timing_prompts else None
    seconds["overhead"] = time.perf_counter() - start
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": dataclasses.asdict(args), "seconds": seconds, "quality": rows,
                                          "ceiling": ceilings, "overhead": cost}, indent=2, default=float))  # fmt: skip
    write_results(args, manifest, rows, ceilings, cost, seconds)
    print(f"wrote {args.out} and the '{RESULTS_SECTION}' section of {args.results} ({seconds})")


if __name__ == "__main__":
    main()
