"""Pretraining the shipped tiny FLUX pipeline on the shapes world (``launch/train_tiny_flux.py`` runs it).

Its VAE is trained on rendered images (reconstruction + a small KL), its latent shift and scale fixed from data,
then its transformer by rectified flow matching on rendered train-split prompts, keeping an EMA of the weights
(the exported ones). The frozen random text encoders are never trained, as in FLUX. ``args`` is the entry
script's parsed namespace (its ``--help`` lists every field).
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from tqdm import tqdm

from rewards.shapes import all_prompts, check, render, sample_prompts
from rl.sampler import FluxSampler

logger = logging.getLogger("train_tiny_flux")


def images_for(specs, resolution: int, rng: np.random.Generator) -> torch.Tensor:
    """Rendered correct images ``[B, 3, H, W]`` in [-1, 1] (the VAE's range)."""
    array = np.stack([render(spec, resolution, rng) for spec in specs]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def train_vae(pipe: FluxPipeline, args: argparse.Namespace, rng: np.random.Generator) -> None:
    """Train ``pipe.vae`` in place on rendered train-split images, then fix its latent shift and scale."""
    vae = pipe.vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr)
    for step in (bar := tqdm(range(args.vae_steps), desc="vae")):
        images = images_for(sample_prompts("train", args.vae_batch, rng), args.resolution, rng).to(args.device)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, images) + args.vae_kl * posterior.kl().mean() / images[0].numel()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        images = images_for(sample_prompts("train", 512, rng), args.resolution, rng).to(args.device)
        latents = torch.cat([vae.encode(chunk).latent_dist.mode() for chunk in images.split(64)])
    # FLUX decodes latents / scaling_factor + shift_factor; choose both so the flow model sees unit scale.
    vae.register_to_config(shift_factor=latents.mean().item(), scaling_factor=1.0 / latents.std().item())
    logger.info("vae latent shift %.4f scale %.4f", vae.config.shift_factor, vae.config.scaling_factor)


@torch.no_grad()
def evaluate(pipe: FluxPipeline, transformer, args, n_prompts: int = 64) -> float:
    """Mean checker score of held-out prompts, one fixed seed each, 10 deterministic Euler steps."""
    specs = all_prompts("test")[:: max(1, len(all_prompts("test")) // n_prompts)][:n_prompts]
    original = pipe.transformer
    pipe.transformer = transformer
    scores = []
    for start in range(0, len(specs), 16):
        chunk = specs[start : start + 16]
        images = pipe(
            [s.prompt for s in chunk], height=args.resolution, width=args.resolution, num_inference_steps=10,
            max_sequence_length=args.text_length, output_type="np",
            generator=[torch.Generator().manual_seed(start + i) for i in range(len(chunk))],
        ).images  # fmt: skip
        scores += [check(image, spec).score for image, spec in zip(images, chunk)]
    pipe.transformer = original
    return float(np.mean(scores))


@torch.no_grad()
def flow_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Unit-scale latents ``[B, 16, h, w]`` the flow model learns, from images in [-1, 1].

    The posterior mean, not a sample: the posterior std (~0.9) exceeds the latents' own spread, so samples
    would bury the flow model's target in noise the decoder ignores anyway.
    """
    return (vae.encode(images).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor


def learning_rate(step: int, args) -> float:
    """Linear warm-up, constant, then (from ``--decay_from``) linear decay to 5% at the last step.

    The decay matters: at a constant rate the EMA's samples stay blurry blobs; annealing sharpens them.
    """
    rate = args.lr * min(1.0, (step + 1) / args.warmup)
    if args.decay_from is not None and step >= args.decay_from:
        progress = (step - args.decay_from) / max(1, args.transformer_steps - args.decay_from)
        rate *= 1.0 - 0.95 * progress
    return rate


@torch.no_grad()
def encode_dataset(pipe: FluxPipeline, args, path: Path) -> tuple[torch.Tensor, list[str]]:
    """Render and encode ``args.dataset_size`` train-split images once (cached at ``path``).

    Rendering plus VAE encoding dominates a training step on CPU, so a fixed dataset with fresh noise and
    timesteps every step trains faster per second than rendering anew (measured in docs/experiments.md, "The
    shapes world and the shipped tiny model").
    """
    if path.exists():
        cached = torch.load(path, weights_only=True)
        return cached["latents"], cached["prompts"]
    rng = np.random.default_rng(args.seed + 2)
    vae, latents, prompts = pipe.vae, [], []
    for _ in tqdm(range(0, args.dataset_size, 64), desc="encode dataset"):
        specs = sample_prompts("train", 64, rng, args.category_weights)
        latents.append(flow_latents(vae, images_for(specs, args.resolution, rng).to(args.device)).half().cpu())
        prompts += [s.prompt for s in specs]
    latents = torch.cat(latents)
    torch.save({"latents": latents, "prompts": prompts}, path)
    return latents, prompts


def dataset_file_name(args) -> str:
    """The cached dataset's file, named by what it holds (size and category mix)."""
    mix = "".join(f"-{name}{weight:g}" for name, weight in sorted((args.category_weights or {}).items()))
    return f"latents-{args.dataset_size}{mix}.pt"


def train_transformer(pipe: FluxPipeline, args: argparse.Namespace, out: Path, state: dict | None) -> list[dict]:
    """Flow-matching training of ``pipe.transformer`` (continuing ``state``, the last ``out/state.pt``); every
    ``eval_every`` steps the EMA is evaluated and the state saved atomically. Leaves the EMA in ``pipe`` and returns
    the evaluation history."""
    transformer = pipe.transformer.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=args.lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed + 1)
    history: list[dict] = []
    start = 0
    if state is not None:
        transformer.load_state_dict(state["transformer"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"].cpu())
        if state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(state["cuda_rng"].cpu())
        start, history = state["step"], state["history"]

    with torch.no_grad():
        train_prompts = [s.prompt for s in all_prompts("train")]
        embeds, pooled, text_ids = pipe.encode_prompt(train_prompts, None, max_sequence_length=args.text_length)
    index_of = {prompt: i for i, prompt in enumerate(train_prompts)}
    if args.dataset_size:
        dataset, dataset_prompts = encode_dataset(pipe, args, out / dataset_file_name(args))
        dataset = dataset.to(args.device)
        dataset_rows = torch.tensor([index_of[p] for p in dataset_prompts], device=args.device)
    latent_side = args.resolution // pipe.vae_scale_factor
    image_ids = pipe._prepare_latent_image_ids(
        args.batch, latent_side // 2, latent_side // 2, args.device, torch.float32
    )
    vae = pipe.vae
    # FLUX's dynamic time shift for this many image tokens, as the sampler will use it.
    shift = math.exp(FluxSampler.shift_mu(pipe.scheduler, (latent_side // 2) ** 2))
    ema_parameters, parameters = list(ema.parameters()), list(transformer.parameters())

    for step in (bar := tqdm(range(start, args.transformer_steps), desc="transformer", initial=start,
                             total=args.transformer_steps)):  # fmt: skip
        if args.dataset_size:
            pick = torch.from_numpy(rng.integers(0, len(dataset), args.batch)).to(args.device)
            x0, rows = dataset[pick].float(), dataset_rows[pick]
        else:
            specs = sample_prompts("train", args.batch, rng, args.category_weights)
            rows = torch.tensor([index_of[s.prompt] for s in specs], device=args.device)
            x0 = flow_latents(vae, images_for(specs, args.resolution, rng).to(args.device))
        x0 = FluxPipeline._pack_latents(x0, args.batch, 16, latent_side, latent_side)
        noise = torch.randn_like(x0)
        t = torch.sigmoid(torch.randn(args.batch, device=args.device))  # logit-normal, then FLUX's time shift
        t = shift * t / (1 + (shift - 1) * t)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        # The tiny model is not guidance-distilled: the embedding always sees FLUX.1-dev's default, 3.5.
        guidance = torch.full((args.batch,), 3.5, device=args.device)
        v = transformer(
            hidden_states=x_t, timestep=t, guidance=guidance, pooled_projections=pooled[rows],
            encoder_hidden_states=embeds[rows], txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]  # fmt: skip
        loss = F.mse_loss(v, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema_parameters, parameters, 1 - args.ema_decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.transformer_steps:
            score = evaluate(pipe, ema, args)
            history.append({"step": step + 1, "loss": loss.item(), "heldout_score": score})
            logger.info("step %d loss %.4f held-out score %.3f", step + 1, loss.item(), score)
            torch.save(
                {"transformer": transformer.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                 "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "step": step + 1,
                 "cuda_rng": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
                 "history": history},
                out / "state.pt.tmp",
            )  # fmt: skip
            os.replace(out / "state.pt.tmp", out / "state.pt")
    pipe.transformer = ema
    return history
