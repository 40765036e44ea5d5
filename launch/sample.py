"""Generate images from a base FLUX model plus a trained LoRA with plain diffusers (``FluxPipeline``).

    python launch/sample.py --pretrained assets/tiny-flux-shapes --lora runs/tiny_shapes/lora \
        --prompt "a red circle" --prompt "two blue squares" --seeds 0 1 2 3 --out runs/tiny_shapes/samples_cli
    python launch/sample.py --pretrained black-forest-labs/FLUX.1-dev --lora runs/flux/lora --prompts prompts.txt \
        --height 512 --width 512 --num_steps 28 --max_sequence_length 512 --dtype bf16 --out samples/

The LoRA folder is any trainer export (``<output_dir>/lora`` or ``checkpoints/step-<n>/lora``); it loads with
``FluxPipeline.load_lora_weights``, adapter metadata (lora_alpha) included. Image j of a prompt uses seed
``seeds[j]`` with the trainer's own seed-to-noise mapping, so with the same steps, size and precision (fp32, up to
batch-shape rounding) the images equal the trainer's deterministic samples of those seeds; its evaluation gives
image j of prompt p seed ``1000 p + j``. Writes ``<prompt index>_<seed>.png`` per image and ``grid.png``.

``--best_of N --keep K``: predictor-guided best-of-N (rl/seed_selection.py). Every prompt starts N seeds, a
predictor reads them at ``--capture_step`` (``lookahead``, ``preview``: decode and ``--reward``; ``probe``: a probe
file trained under this deterministic sampler, no reward), only the K predicted best are finished (a funnel,
``--capture_step 3 5 --keep 3 2``, ranks again at each step, among the survivors of the step before), and the
best of them by the reward (by the prediction without one) is written as ``<prompt index>_best.png``;
``previews.png`` shows every seed's x0 at the capture step (a row per prompt, survivors framed green, the chosen
one blue) and ``selection.json`` every prediction and the compute against full best-of-N::

    python launch/sample.py --pretrained assets/tiny-flux-shapes --lora runs/tiny_shapes/lora \
        --prompts shapes:test --max_prompts 8 --best_of 8 --keep 2 --predictor lookahead --capture_step 2 \
        --reward shapes --out runs/tiny_shapes/best_of_8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import torch
from diffusers import FluxPipeline
from PIL import Image

from rewards.shapes import all_prompts
from rl.config_help import HelpFormatter, option_names
from rl.data import Prompt, load_prompt_source
from rl.inference import generate, load
from rl.metrics_log import image_grid
from rl.paths import missing_local_folder
from rl.predictors import PREDICTORS
from rl.sampler import native_size_warning
from rl.seed_selection import best_of_n, capture_steps_valid, full_best_of_n_cost, keeps_valid, preview_grid
from rl.user_errors import run_cli


def read_prompts(texts: list[str], source: str | None, max_prompts: int) -> list[Prompt]:
    """``--prompt`` texts (shapes-world metadata attached when a text is one of its prompts) then a ``--prompts``
    source (a .txt or .jsonl file, or ``shapes:train`` / ``shapes:test``), at most ``max_prompts`` (0: all)."""
    shapes = {spec.prompt: spec.to_dict() for spec in all_prompts("all")}
    prompts = [Prompt(text, shapes.get(text, {})) for text in texts]
    if source:
        prompts += load_prompt_source(source).items
    return prompts[:max_prompts] if max_prompts else prompts


def best_of(args: argparse.Namespace, pipeline: FluxPipeline, prompts: list[Prompt], out: Path) -> None:
    """``--best_of``: select, then write the chosen images, the preview grid and ``selection.json``."""
    choices = best_of_n(
        pipeline, [p.text for p in prompts], len(args.seeds), args.keep, args.capture_step, args.predictor,
        args.reward or None, num_steps=args.num_steps, height=args.height, width=args.width,
        guidance_scale=args.guidance_scale, max_sequence_length=args.max_sequence_length,
        metadata=[p.metadata for p in prompts], lookahead_steps=args.lookahead_steps,
        preview_steps=args.preview_steps, probe_path=args.probe_path or "", batch_size=args.batch_size, previews=True,
    )  # fmt: skip
    for index, choice in enumerate(choices):
        Image.fromarray(image_grid(choice.image[None], 1)).save(out / f"{index:03d}_best.png")
    Image.fromarray(image_grid(preview_grid(choices), len(args.seeds))).save(out / "previews.png")
    full = full_best_of_n_cost(args.num_steps, len(args.seeds))
    spent = choices[0].cost
    report = {
        "predictor": args.predictor,
        "capture_step": args.capture_step,
        "best_of": len(args.seeds),
        "keep": args.keep,
        "reward": args.reward,
        "cost_per_prompt": vars(spent),
        "full_best_of_n_cost_per_prompt": vars(full),
        "transformer_calls_vs_full": spent.transformer_calls / full.transformer_calls,
        # previews.png decodes every seed's x0 once more for display: not part of the selection's cost above
        "display_decodes_per_prompt": len(args.seeds),
        "prompts": [choice.to_dict() for choice in choices],
    }
    (out / "selection.json").write_text(json.dumps(report, indent=1))
    print(
        f"best of {len(args.seeds)} (kept {'/'.join(map(str, args.keep))}) for {len(choices)} prompts: {spent.transformer_calls:g} "
        f"transformer calls per prompt ({report['transformer_calls_vs_full']:.0%} of full best-of-"
        f"{len(args.seeds)}); wrote <i>_best.png, previews.png and selection.json to {out}"
    )


# the options that only mean something with --best_of
SELECTION_OPTIONS = ("keep", "predictor", "capture_step", "lookahead_steps", "preview_steps", "probe_path", "reward",
                     "batch_size")  # fmt: skip


def check_best_of(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None) -> None:
    """The best-of-N options, checked before the model loads (FLUX.1-dev takes minutes): each mistake is one line
    naming the option."""
    given = set(option_names(sys.argv[1:] if argv is None else argv))
    if not args.best_of:
        stray = sorted(given & set(SELECTION_OPTIONS))
        if stray:
            parser.error(f"--{' --'.join(stray)} select among seeds: give --best_of N (N seeds per prompt)")
        return
    n, keep, steps = args.best_of, args.keep, args.capture_step
    if n < 2:
        parser.error(f"--best_of must be >= 2 (N seeds to choose from), got {n}")
    if args.seeds is not None:
        parser.error(f"--best_of {n} samples seeds 0..{n - 1}: leave out --seeds")
    if len(keep) != len(steps):
        parser.error(f"--keep {' '.join(map(str, keep))}: give one per --capture_step ({' '.join(map(str, steps))})")
    if not keeps_valid(keep, n):
        parser.error(f"--keep {' '.join(map(str, keep))} must decrease within [1, --best_of {n}]")
    predictor = PREDICTORS[args.predictor]
    if not predictor.finishes_rollouts and not capture_steps_valid(steps, args.num_steps - 1):
        parser.error(
            f"--capture_step {' '.join(map(str, steps))} must increase within [1, --num_steps - 1 = {args.num_steps - 1}]"
        )
    if args.lookahead_steps < 1:
        parser.error(f"--lookahead_steps must be >= 1 (Euler steps to sigma 0), got {args.lookahead_steps}")
    if predictor.scores_with_reward and not args.reward:
        parser.error(
            f"--predictor {args.predictor} scores decoded previews with the real reward: give --reward (e.g. shapes), or use --predictor probe"
        )
    if args.predictor == "probe" and not args.probe_path:
        parser.error(
            "--predictor probe needs --probe_path (a probe trained under noise level 0: launch/probe_train.py)"
        )
    if args.probe_path and not Path(args.probe_path).is_file():
        parser.error(f"--probe_path {args.probe_path} does not exist")
    if args.preview_steps != [1] and args.predictor != "preview":
        parser.error(f"--preview_steps is the preview's; --predictor {args.predictor} does not read it")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    if min(args.preview_steps) < 1 or len(args.preview_steps) not in (1, len(steps)):
        parser.error(f"--preview_steps {args.preview_steps}: one value >= 1, or one per --capture_step")


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    parser.add_argument("--pretrained", required=True, help="base FluxPipeline folder or hub id")
    parser.add_argument("--lora", help="LoRA folder (trainer export); omit for the base model")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="a .txt (one prompt per line) or .jsonl file, or shapes:train / shapes:test")
    parser.add_argument("--max_prompts", type=int, default=0, help="use at most this many prompts (0: all)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", help="image j of a prompt uses seeds[j] (default 0 1 2 3; --best_of: 0..N-1)"
    )
    parser.add_argument("--num_steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--height", type=int, default=64, help="image height in px (FLUX.1-dev: 512-1024)")
    parser.add_argument("--width", type=int, default=64, help="image width in px")
    parser.add_argument("--guidance_scale", type=float, default=3.5, help="FLUX distilled guidance")
    parser.add_argument("--max_sequence_length", type=int, default=16, help="FLUX.1-dev: 512; the tiny model: 16")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="pipeline dtype (bf16 on GPUs)")
    parser.add_argument("--out", required=True, help="output folder")
    best = parser.add_argument_group("best-of-N with early stopping (rl/seed_selection.py)")
    best.add_argument("--best_of", type=int, default=0, help="N seeds per prompt (seeds 0..N-1); 0: plain sampling")
    best.add_argument(
        "--keep", type=int, nargs="+", default=[1],
        help="K seeds finished per prompt, the predicted best; a funnel: the survivors of each stage, e.g. 3 2",
    )  # fmt: skip
    best.add_argument("--predictor", default="lookahead", choices=sorted(PREDICTORS), help="what ranks the seeds")
    best.add_argument(
        "--capture_step", type=int, nargs="+", default=[2],
        help="denoising steps every seed runs before the ranking; a funnel: one per stage, e.g. 3 5",
    )  # fmt: skip
    best.add_argument("--lookahead_steps", type=int, default=2, help="Euler steps of the lookahead to sigma 0")
    best.add_argument(
        "--preview_steps", type=int, nargs="+", default=[1],
        help="Euler steps of the preview to sigma 0 (1: the call's x0; n: n - 1 transformer calls); one per stage",
    )  # fmt: skip
    best.add_argument("--probe_path", help="probe file (--predictor probe), trained under noise level 0")
    best.add_argument(
        "--reward", help="reward spec (e.g. shapes); needed by preview, lookahead and reward (the oracle)"
    )
    best.add_argument(
        "--batch_size", type=int, default=16,
        help="most seeds per transformer call (memory); 1: every image bit-identical to sampling its seed alone, "
        "larger batches may round a seed differently in the last bits",
    )  # fmt: skip
    args = parser.parse_args(argv)
    check_best_of(parser, args, argv)
    for name in ("num_steps", "height", "width", "max_sequence_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_prompts < 0:
        parser.error(f"--max_prompts must be >= 0 (0: all), got {args.max_prompts}")
    if args.seeds is not None and len(set(args.seeds)) < len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed: its images would overwrite each other")
    if args.best_of:
        args.seeds = list(range(args.best_of))
    elif args.seeds is None:
        args.seeds = [0, 1, 2, 3]
    if args.lora and not Path(args.lora).is_dir() and Path(args.lora).exists():
        parser.error(f"--lora {args.lora} is a file: give the folder holding pytorch_lora_weights.safetensors")
    if args.lora and Path(args.lora).is_dir() and (Path(args.lora) / "lora").is_dir():
        parser.error(f"--lora {args.lora} is a run folder: give its LoRA export, {Path(args.lora) / 'lora'}")
    if args.lora and missing_local_folder(args.lora):
        parser.error(f"--lora {args.lora} does not exist: give a trainer export (<output_dir>/lora)")
    prompts = read_prompts(args.prompt, args.prompts, args.max_prompts)
    if not prompts:
        parser.error("give at least one --prompt or a --prompts source")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipeline = load(args.pretrained, args.lora, dtype, device)
    warning = native_size_warning(args.height, args.width, pipeline.vae.config.sample_size)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.best_of:
        best_of(args, pipeline, prompts, out)
        return out
    texts = [p.text for p in prompts]
    images = generate(pipeline, texts, args.seeds, args.num_steps, args.height, args.width, args.guidance_scale,
                      args.max_sequence_length)  # fmt: skip
    for i, image in enumerate(images):
        prompt_index, seed = divmod(i, len(args.seeds))
        Image.fromarray(image_grid(image[None], 1)).save(out / f"{prompt_index:03d}_{args.seeds[seed]}.png")
    Image.fromarray(image_grid(images, len(args.seeds))).save(out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")
    return out


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
