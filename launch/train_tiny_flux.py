"""Train the shipped tiny FLUX pipeline on the shapes world and write it to ``assets/``.

Reproducible (seeded) and resumable: ``python launch/train_tiny_flux.py`` builds the random pipeline of
``rl/tiny_flux.py``, trains its VAE (reconstruction + a small KL), fixes the VAE's latent shift and scale
from data, then trains the transformer by rectified flow matching on rendered train-split prompts
(category-balanced), keeping an EMA of its weights. The frozen random text encoders are never trained,
as in FLUX. Every ``--eval_every`` steps it samples held-out prompts with 10 deterministic steps and logs
the checker's mean score. Re-running with a larger ``--transformer_steps`` continues from ``state.pt``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from tqdm import tqdm

from rewards.shapes import all_prompts, check, parse_category_weights, render, sample_prompts, vocabulary
from rl.config_help import HelpFormatter
from rl.sampler import FluxSampler
from rl.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline

logger = logging.getLogger("train_tiny_flux")


def images_for(specs, resolution: int, rng: np.random.Generator) -> torch.Tensor:
    """Rendered correct images ``[B, 3, H, W]`` in [-1, 1] (the VAE's range)."""
    array = np.stack([render(spec, resolution, rng) for spec in specs]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def train_vae(pipe: FluxPipeline, args, rng: np.random.Generator) -> None:
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

    Rendering plus VAE encoding is ~60% of a training step on CPU; a fixed dataset with fresh noise and
    timesteps every step trains ~2.3x faster per second than rendering anew.
    """
    if path.exists():
        cached = torch.load(path, weights_only=False)
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


def train_transformer(pipe: FluxPipeline, args, out: Path, state: dict | None) -> list[dict]:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", default="assets/tiny-flux-shapes", help="pipeline folder to write")
    parser.add_argument("--work_dir", default="runs/tiny-flux-pretrain", help="resumable training state")
    parser.add_argument("--seed", type=int, default=0, help="weights, data and noise")
    parser.add_argument("--resolution", type=int, default=64, help="image side in px (the VAE's sample_size)")
    parser.add_argument("--text_length", type=int, default=16, help="T5 tokens per prompt")
    parser.add_argument("--vae_steps", type=int, default=1200, help="VAE optimizer steps")
    parser.add_argument("--vae_batch", type=int, default=16, help="VAE images per batch")
    parser.add_argument("--vae_lr", type=float, default=1e-3, help="VAE AdamW learning rate")
    parser.add_argument("--vae_kl", type=float, default=1e-3, help="KL weight per latent element")
    parser.add_argument("--transformer_steps", type=int, default=11000, help="transformer optimizer steps")
    parser.add_argument("--batch", type=int, default=32, help="transformer images per batch")
    parser.add_argument(
        "--dataset_size", type=int, default=0, help="pre-encode this many images (0: render every step)"
    )
    parser.add_argument(
        "--category_weights",
        nargs="+",
        default=None,
        metavar="CATEGORY=WEIGHT",
        help="relative weight of a category in the transformer's training images (others keep 1; default: "
        "category-balanced), e.g. position=2.5 color_attr=2.5",
    )
    parser.add_argument("--lr", type=float, default=5e-4, help="transformer AdamW peak learning rate")
    parser.add_argument("--warmup", type=int, default=200, help="linear learning-rate warm-up steps")
    parser.add_argument("--decay_from", type=int, default=8000, help="step where the linear lr decay starts")
    parser.add_argument(
        "--ema_decay", type=float, default=0.995, help="EMA of the transformer weights (the exported ones)"
    )
    parser.add_argument("--eval_every", type=int, default=250, help="evaluate every N transformer steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy machine)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    args = parser.parse_args()
    if args.category_weights is not None:
        try:
            args.category_weights = parse_category_weights(" ".join(args.category_weights))
        except ValueError as error:
            parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    config = TinyFluxConfig(resolution=args.resolution, text_length=args.text_length)
    vae_dir = work / "vae"
    if (vae_dir / "config.json").exists():
        pipe = FluxPipeline.from_pretrained(work / "pipeline").to(args.device)
    else:
        pipe = build_tiny_flux_pipeline(vocabulary(), config, seed=args.seed).to(args.device)
        train_vae(pipe, args, np.random.default_rng(args.seed))
        pipe.save_pretrained(work / "pipeline")
        pipe.vae.save_pretrained(vae_dir)
    pipe.set_progress_bar_config(disable=True)
    state_path = work / "state.pt"
    state = torch.load(state_path, map_location=args.device, weights_only=False) if state_path.exists() else None
    history = train_transformer(pipe, args, work, state)
    pipe.save_pretrained(args.out)
    (Path(args.out) / "training_log.json").write_text(json.dumps({"args": vars(args), "history": history}, indent=1))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
