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
import json
import logging
from pathlib import Path

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import numpy as np
import torch
from diffusers import FluxPipeline

from rewards.shapes import parse_category_weights, vocabulary
from rl.config_help import HelpFormatter
from rl.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline
from rl.tiny_flux_training import train_transformer, train_vae
from rl.user_errors import run_cli

logger = logging.getLogger("train_tiny_flux")


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
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (1 is fastest on a busy machine; omitted: torch's default)",
    )
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
    state = torch.load(state_path, map_location=args.device, weights_only=True) if state_path.exists() else None
    history = train_transformer(pipe, args, work, state)
    pipe.save_pretrained(args.out)
    (Path(args.out) / "training_log.json").write_text(json.dumps({"args": vars(args), "history": history}, indent=1))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
