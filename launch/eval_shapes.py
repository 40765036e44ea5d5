"""Evaluate a FLUX pipeline (optionally + LoRA) on the shapes world's held-out prompts.

Samples every test-split prompt with several fixed seeds using deterministic Euler steps (noise level 0,
identical to ``FluxPipeline``), scores each image with the shapes checker and writes ``<out>.json`` (every
score), ``<out>.md`` (per-category table) and ``<out>_grid.png`` (one prompt per category evaluated, every seed)::

    python launch/eval_shapes.py --pipeline assets/tiny-flux-shapes --out bench/base_model_eval
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image, ImageDraw
from tqdm import tqdm

from rewards.shapes import CATEGORIES, PromptSpec, all_prompts, check
from rl.config_help import HelpFormatter
from rl.paths import missing_local_folder
from rl.sampler import FluxSampler, encode_prompts
from rl.user_errors import run_cli


def evaluate(pipe: FluxPipeline, specs: list[PromptSpec], seeds: int, steps: int, resolution: int, text_length: int):
    """Scores ``[P, seeds]`` and images ``[P, seeds, 3, H, W]`` of deterministic samples (seed = 1000 p + s)."""
    sampler = FluxSampler(pipe, steps, noise_level=0.0, guidance_scale=3.5, height=resolution, width=resolution)
    embeds = encode_prompts(pipe, [s.prompt for s in specs], text_length)
    scores = np.zeros((len(specs), seeds))
    images = torch.zeros(len(specs), seeds, 3, resolution, resolution)
    prompts_per_batch = max(1, sampler.batch_size // seeds)
    with tqdm(total=len(specs) * seeds, desc="eval images") as bar:
        for start in range(0, len(specs), prompts_per_batch):
            rows = torch.arange(start, min(start + prompts_per_batch, len(specs)))
            prompt_index = rows.repeat_interleave(seeds)
            seed_ids = prompt_index * 1000 + torch.arange(seeds).repeat(len(rows))
            done = sampler.advance(sampler.start(prompt_index, seed_ids), embeds, steps)
            batch = sampler.decode(done.latents).view(len(rows), seeds, 3, resolution, resolution)
            images[rows] = batch
            for i, row in enumerate(rows.tolist()):
                scores[row] = [check(image, specs[row]).score for image in batch[i]]
            bar.update(len(prompt_index))
    return scores, images


def summary_table(specs: list[PromptSpec], scores: np.ndarray) -> dict:
    """Per category, over all prompts (``all``) and GenEval's overall (``category_mean``): mean score, mean
    within-prompt std and best of seeds.

    The held-out split is 77% position and colour-attribution prompts, so ``all`` weighs the two hardest
    categories; GenEval reports the unweighted mean of its six categories, which ``category_mean`` is.
    """
    rows = {}
    for category in (*CATEGORIES, "all"):
        mask = np.array([category in ("all", s.tag) for s in specs])
        if not mask.any():
            continue
        rows[category] = {
            "prompts": int(mask.sum()),
            "mean_score": float(scores[mask].mean()),
            "within_prompt_std": float(scores[mask].std(axis=1).mean()),
            "best_of_seeds": float(scores[mask].max(axis=1).mean()),
        }
    present = [rows[c] for c in CATEGORIES if c in rows]
    rows["category_mean"] = {"prompts": len(specs)} | {
        key: float(np.mean([row[key] for row in present]))
        for key in ("mean_score", "within_prompt_std", "best_of_seeds")
    }
    return rows


def save_grid(specs: list[PromptSpec], scores: np.ndarray, images: torch.Tensor, path: Path) -> None:
    """One row per category evaluated (its first prompt in ``specs``; ``--prompts N`` may leave some out), one
    column per seed, checker score under each image."""
    cell, label = 128, 240
    first = {}
    for i, spec in enumerate(specs):
        first.setdefault(spec.tag, i)
    picks = [first[c] for c in CATEGORIES if c in first]
    seeds = images.shape[1]
    grid = Image.new("RGB", (label + seeds * cell, len(picks) * (cell + 14)), "white")
    draw = ImageDraw.Draw(grid)
    for r, p in enumerate(picks):
        y = r * (cell + 14)
        draw.text((4, y + cell // 2 - 6), specs[p].prompt, fill="black")
        for s in range(seeds):
            array = (images[p, s].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            grid.paste(Image.fromarray(array).resize((cell, cell), Image.Resampling.NEAREST), (label + s * cell, y))
            draw.text((label + s * cell + 4, y + cell), f"{scores[p, s]:.2f}", fill="black")
    grid.save(path)


def check_local_folder(option: str, value: str) -> None:
    """Raise ValueError naming ``option`` when ``value`` is a local folder that does not exist."""
    if missing_local_folder(value):
        raise ValueError(f"{option} {value}: no such folder (a hub id reads owner/name)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--pipeline", default="assets/tiny-flux-shapes", help="FluxPipeline folder or hub id")
    parser.add_argument("--lora", default=None, help="optional LoRA folder (diffusers format) to load first")
    parser.add_argument("--out", default="bench/base_model_eval", help="output path prefix")
    parser.add_argument("--seeds", type=int, default=8, help="images per prompt (seeds 1000 p + j, j < seeds)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps (deterministic sampling)")
    parser.add_argument("--prompts", type=int, default=256, help="first N held-out prompts")
    parser.add_argument("--text_length", type=int, default=16, help="T5 tokens per prompt (max_sequence_length)")
    args = parser.parse_args(argv)
    for option in ("seeds", "steps", "prompts", "text_length"):
        if getattr(args, option) < 1:
            raise ValueError(f"--{option} must be >= 1, got {getattr(args, option)}")
    check_local_folder("--pipeline", args.pipeline)
    if args.lora:
        check_local_folder("--lora", args.lora)

    pipe = FluxPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    if args.lora:
        pipe.load_lora_weights(args.lora)
    resolution = pipe.vae.config.sample_size
    specs = list(all_prompts("test"))[: args.prompts]
    started = time.time()
    scores, images = evaluate(pipe, specs, args.seeds, args.steps, resolution, args.text_length)
    table = summary_table(specs, scores)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"pipeline": args.pipeline, "lora": args.lora, "seeds": args.seeds, "steps": args.steps,
              "resolution": resolution, "seconds": time.time() - started, "summary": table,
              "scores": {s.prompt: scores[i].tolist() for i, s in enumerate(specs)}}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    lines = [
        f"Held-out shapes prompts x {args.seeds} seeds, {args.steps} deterministic steps, {resolution}px "
        f"(`{args.pipeline}`{' + ' + args.lora if args.lora else ''}).",
        "",
        "| category | prompts | mean score | within-prompt std | best of seeds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for category, row in table.items():
        lines.append(
            f"| {category} | {row['prompts']} | {row['mean_score']:.3f} | {row['within_prompt_std']:.3f} "
            f"| {row['best_of_seeds']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    save_grid(specs, scores, images, out.parent / f"{out.name}_grid.png")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
