"""Predictor quality under the trainer's sampler: within-group ranking, and what selecting by it buys GRPO.

Reads a held-out collection made with the run config (so the SDE window, noise, steps, size and precision are
the trainer's) and scores every shipped predictor on it:

- ``preview@k``: the x0 of call k (stored by the collection), decoded and scored by the real reward;
- ``lookahead@s+n``: from the state after step s (a capture at s stores it), n Euler steps to sigma 0, decoded and
  scored;
- ``probe``: the CNN probe file on the stored capture (no reward call);
- ``oracle``: the real final rewards (the ceiling).

Per predictor: PCC and within-group Spearman against the final reward (what selection needs), its cost per
rollout, and for keeping half of each group (8 of 16) by ``topk``, ``variance`` (rl/prune_policies/) or at random:
the kept rollouts' real reward std relative to a random half and to the whole group::

    python launch/probe_collect.py --config configs/tiny_shapes.yaml --prompts shapes:test --num_prompts 64 \\
        --group_size 16 --seed 1 --capture_steps 3 4 --out runs/probe/test_w
    python bench/predictor_quality.py --data runs/probe/test_w --probe assets/probe/tiny-flux-shapes-window-step4.pt

Writes ``bench/predictor_quality.json`` and a section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
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
from probe import Probe, load_dataset, probe_metrics
from probe.data import read_manifest
from probe.train import collection_sampler, evaluate
from rewards.compose import build_reward_set
from rl.ablation import json_safe
from rl.config_help import HelpFormatter
from rl.predictors.lookahead import euler_to_clean, lookahead_indices
from rl.prune_policies.variance import max_variance_subset
from rl.sampler import FluxSampler, encode_prompts

SECTION = "Predictors under the trainer's sampler (bench/predictor_quality.py)"


def load_shards(directory: Path) -> list[dict]:
    return [torch.load(path, weights_only=True) for path in sorted(directory.glob("shard_*.pt"))]


@torch.no_grad()
def reward_predictions(manifest: dict, shards: list[dict], lookaheads: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """``name -> [N]`` predictions of the preview and lookahead predictors for every stored rollout."""
    dtype = torch.bfloat16 if manifest.get("precision") == "bf16" else torch.float32
    pipeline = FluxPipeline.from_pretrained(manifest["pipeline"], torch_dtype=dtype)
    pipeline.set_progress_bar_config(disable=True)
    side = manifest["resolution"]
    sampler = FluxSampler(pipeline, manifest["num_steps"], manifest["noise_level"], manifest["guidance_scale"],
                          side, side, batch_size=32, sde_steps=manifest.get("sde_steps"))  # fmt: skip
    reward = build_reward_set(manifest["reward"], kwargs=manifest.get("reward_kwargs") or {})
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16)
    out: dict[str, list[float]] = {}
    try:
        for shard in shards:
            size = manifest["group_size"]
            texts = shard["prompts"][::size]
            metadata = [json.loads(m) for m in shard["metadata"]]
            embeds = encode_prompts(pipeline, texts, manifest["text_length"])
            prompt_index = torch.arange(len(texts)).repeat_interleave(size)

            def score(latents: torch.Tensor, prompts=shard["prompts"], metadata=metadata) -> list[float]:
                with autocast:
                    images = sampler.decode(latents.to(dtype))
                return reward(images, prompts, metadata).total.tolist()

            for k, capture in shard["captures"].items():
                out.setdefault(f"preview@{k}", []).extend(score(capture["x0"]))
            for after, steps in lookaheads:  # capture k stores the state after step k (its call's output)
                state = shard["captures"][after]["latents"].to(dtype)
                indices = lookahead_indices(after, sampler.num_steps, steps)
                with autocast:
                    clean = euler_to_clean(sampler, state, embeds, prompt_index, indices)
                out.setdefault(f"lookahead@{after}+{steps}", []).extend(score(clean))
    finally:
        reward.close()
    return {name: np.asarray(values) for name, values in out.items()}


def selection_gain(predicted: np.ndarray, reward: np.ndarray, group: np.ndarray, keep: int, draws: int = 200):
    """Mean real-reward std of the kept rollouts per group: by top-k, by max variance, at random, and all."""
    rng = np.random.default_rng(0)
    stats = {"topk": [], "variance": [], "random": [], "all": []}
    for g in np.unique(group):
        rows = np.flatnonzero(group == g)
        scores, real = predicted[rows], reward[rows]
        stats["topk"].append(real[np.argsort(-scores, kind="stable")[:keep]].std())
        stats["variance"].append(real[max_variance_subset(scores, keep)].std())
        stats["random"].append(np.mean([real[rng.choice(len(rows), keep, replace=False)].std() for _ in range(draws)]))
        stats["all"].append(real.std())
    means = {name: float(np.mean(values)) for name, values in stats.items()}
    ratio = lambda a, b: a / b if b > 0 else math.nan  # noqa: E731  (every group flat: no spread to compare)
    return {f"kept_std_vs_random_{name}": ratio(means[name], means["random"]) for name in ("topk", "variance")} | {
        "variance_kept_std_vs_all": ratio(means["variance"], means["all"]),
        "kept_std_random": means["random"],
        "std_all": means["all"],
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--data", default="runs/probe/test_w", help="held-out collection (run config's sampler)")
    parser.add_argument("--probe", default="assets/probe/tiny-flux-shapes-window-step4.pt", help="probe file")
    parser.add_argument("--out", default="bench/predictor_quality.json", help="JSON result")
    parser.add_argument("--results", default="bench/RESULTS.md", help="Markdown file of the section")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    data = Path(args.data)
    manifest = read_manifest(data)
    shards = load_shards(data)
    reward = torch.cat([s["reward"] for s in shards]).numpy()
    group = torch.cat([s["group"] for s in shards]).numpy()
    steps = sorted(int(k) for k in shards[0]["captures"])
    lookaheads = [(k, 2) for k in steps if k < manifest["num_steps"]]  # from the state after each captured step
    predictions = reward_predictions(manifest, shards, lookaheads)
    probe = Probe.load(args.probe, sampler=collection_sampler(manifest))  # the data's sampler must be the probe's
    probe_data = load_dataset(data, probe.capture_step, probe.feature_config)
    probe_scores = probe.predict(probe_data.features, probe_data.sigma, probe_data.group).detach().numpy()
    predictions[f"probe@{probe.capture_step}"] = probe_scores
    predictions["oracle"] = reward
    costs = {"preview": (0, 1, 1), "lookahead": (2, 1, 1), "probe": (0, 0, 0), "oracle": (None, 1, 1)}
    rows = []
    for name, predicted in predictions.items():
        metrics = probe_metrics(
            torch.as_tensor(predicted).float(), torch.as_tensor(reward).float(), torch.as_tensor(group)
        )
        calls, decodes, rewards = costs[name.split("@")[0]]
        rows.append({
            "predictor": name, "pcc": metrics["pcc"], "within_group_srcc": metrics["within_group_srcc"],
            "extra_transformer_calls": calls, "decodes": decodes, "reward_calls": rewards,
            **selection_gain(predicted, reward, group, manifest["group_size"] // 2),
        })  # fmt: skip
    probe_check = evaluate(probe, probe_data)["within_group_srcc"]
    result = {"data": str(data), "probe": args.probe, "manifest": manifest, "rows": rows,
              "probe_within_group_srcc_via_evaluate": probe_check, "seconds": time.perf_counter() - started}  # fmt: skip
    Path(args.out).write_text(json.dumps(json_safe(result), indent=1, allow_nan=False))  # NaN (all flat): null
    sde = manifest.get("sde_steps")
    lines = [
        "",
        f"### {time.strftime('%Y-%m-%d')}: `python bench/predictor_quality.py --data {args.data} --probe {args.probe}`",
        "",
        f"{len(reward)} held-out rollouts ({len(np.unique(group))} prompts x {manifest['group_size']} seeds), sampler: "
        f"{manifest['num_steps']} steps, noise {manifest['noise_level']}, SDE steps {sde}, {manifest.get('precision')}. "
        "`@k`: preview of call k; `@s+n`: n Euler steps from the state after step s. Selection keeps 8 of 16 per "
        "group; the columns are the kept rollouts' real reward std over a random 8's, and (variance) over all 16's.",
        "",
        "| predictor | PCC | within-group SRCC | extra calls / decodes / reward calls per rollout | top-k std vs random | variance std vs random | variance std vs all 16 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cost = "all T / 1 / 1" if row["extra_transformer_calls"] is None else (
            f"{row['extra_transformer_calls']} / {row['decodes']} / {row['reward_calls']}")  # fmt: skip
        lines.append(
            f"| {row['predictor']} | {row['pcc']:.3f} | {row['within_group_srcc']:.3f} | {cost} | "
            f"{row['kept_std_vs_random_topk']:.2f}x | {row['kept_std_vs_random_variance']:.2f}x | "
            f"{row['variance_kept_std_vs_all']:.2f}x |"
        )
    add_to_section(args.results, SECTION, lines)
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
