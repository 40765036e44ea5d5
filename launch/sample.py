"""Generate images from a base FLUX model plus a trained LoRA with plain diffusers (``FluxPipeline``).

    python launch/sample.py --pretrained assets/tiny-flux-shapes --lora runs/tiny_shapes/lora \
        --prompt "a red circle" --prompt "two blue squares" --seeds 0 1 2 3 --out runs/tiny_shapes/samples_cli
    python launch/sample.py --pretrained black-forest-labs/FLUX.1-dev --lora runs/flux/lora --prompts prompts.txt \
        --height 512 --width 512 --num_steps 28 --dtype bf16 --out samples/

The LoRA folder is any trainer export (``<output_dir>/lora`` or ``checkpoints/step-<n>/lora``); it loads with
``FluxPipeline.load_lora_weights``, adapter metadata (lora_alpha) included. Image j of a prompt uses seed
``seeds[j]`` with the trainer's own seed-to-noise mapping, so with the same steps and size the images equal the
trainer's deterministic evaluation samples. Writes ``<prompt index>_<seed>.png`` per image and ``grid.png``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from diffusers import FluxPipeline
from PIL import Image

from rl.config_help import HelpFormatter
from rl.metrics_log import image_grid
from rl.sampler import FluxSampler


def load(pretrained: str, lora: str | None, dtype: torch.dtype = torch.float32, device: str = "cpu") -> FluxPipeline:
    """The base pipeline with the LoRA (when given) loaded the plain-diffusers way."""
    pipeline = FluxPipeline.from_pretrained(pretrained, torch_dtype=dtype)
    if lora is not None:
        pipeline.load_lora_weights(lora)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@torch.no_grad()
def generate(
    pipeline: FluxPipeline,
    prompts: list[str],
    seeds: list[int],
    num_steps: int,
    height: int,
    width: int,
    guidance_scale: float = 3.5,
    max_sequence_length: int = 512,
) -> torch.Tensor:
    """``[len(prompts) * len(seeds), 3, H, W]`` images in [0, 1], prompt-major, from ``pipeline(...)`` itself.

    The initial latents come from the trainer's seed-to-noise mapping (:meth:`rl.sampler.FluxSampler.start`).
    """
    sampler = FluxSampler(pipeline, num_steps, 0.0, guidance_scale=guidance_scale, height=height, width=width)
    device = pipeline.transformer.device
    images = []
    for prompt in prompts:
        seed_tensor = torch.tensor(seeds)
        latents = sampler.start(torch.zeros(len(seeds), dtype=torch.long), seed_tensor, device).states[:, 0]
        out = pipeline(
            prompt=[prompt] * len(seeds),
            latents=latents.to(pipeline.transformer.dtype),
            num_inference_steps=num_steps,
            guidance_scale=guidance_scale,
            height=height,
            width=width,
            max_sequence_length=max_sequence_length,
            output_type="pt",
        ).images
        images.append(out.float().cpu())
    return torch.cat(images)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--pretrained", required=True, help="base FluxPipeline folder or hub id")
    parser.add_argument("--lora", help="LoRA folder (trainer export); omit for the base model")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts", help="a text file, one prompt per line")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="image j of a prompt uses seeds[j]")
    parser.add_argument("--num_steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--height", type=int, default=64, help="image height in px (FLUX.1-dev: 512-1024)")
    parser.add_argument("--width", type=int, default=64, help="image width in px")
    parser.add_argument("--guidance_scale", type=float, default=3.5, help="FLUX distilled guidance")
    parser.add_argument("--max_sequence_length", type=int, default=16, help="FLUX.1-dev: 512; the tiny model: 16")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="pipeline dtype (bf16 on GPUs)")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts:
        prompts += [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    if not prompts:
        parser.error("give at least one --prompt or a --prompts file")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipeline = load(args.pretrained, args.lora, dtype, device)
    images = generate(
        pipeline,
        prompts,
        args.seeds,
        args.num_steps,
        args.height,
        args.width,
        args.guidance_scale,
        args.max_sequence_length,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        pixels = image_grid(image[None], 1)
        Image.fromarray(pixels).save(out / f"{i // len(args.seeds):03d}_{args.seeds[i % len(args.seeds)]}.png")
    Image.fromarray(image_grid(images, len(args.seeds))).save(out / "grid.png")
    print(f"wrote {len(images)} images and grid.png to {out}")
    return out


if __name__ == "__main__":
    main()
