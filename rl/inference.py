"""Plain-diffusers inference with a trained LoRA: what a user of the export runs (``launch/sample.py``).

The LoRA loads with ``FluxPipeline.load_lora_weights`` and the images come from ``FluxPipeline.__call__``
itself; only the initial noise is the trainer's (its seed-to-noise mapping), so with the same steps and size a
seed's image equals the trainer's deterministic evaluation sample of that seed (tests/rl/test_checkpoint.py).
"""

from __future__ import annotations

import torch
from diffusers import FluxPipeline

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
