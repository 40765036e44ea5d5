"""Collect probe training data: N prompts x G seeds, attention + x0 captures at several steps, final rewards.

Samples with the GRPO sampler (SDE, noise level as the trainer's) and writes whole prompt groups per shard,
atomically; re-running the same command resumes (complete shards are skipped). Defaults: the shipped tiny
model and the shapes world::

    python launch/probe_collect.py --prompts shapes:train --num_prompts 400 --out runs/probe/train
    python launch/probe_collect.py --prompts shapes:test --num_prompts 128 --seed 1 --out runs/probe/test
    python launch/probe_collect.py --config configs/tiny_shapes.yaml --num_prompts 1024 --out runs/probe/train

``--config`` takes a run config (what ``launch/grpo_flux.py`` trains with): the model, prompts, reward, group
size and the whole sampler (steps, noise level, SDE window, guidance, size, precision) become the
collection's defaults, so the probe ranks exactly the rollouts the trainer makes; flags given here override
them. A YAML of this script's own keys is taken too.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import torch
import yaml
from diffusers import FluxPipeline

from probe.collect import CollectSettings, collect, pipeline_sizes, run_config_defaults
from rl.config_help import ConfigParser
from rl.config_parse import check_flags, split_config_flag
from rl.user_errors import run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _option(default, help: str = "", factory=None):
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class CollectArgs:
    """Command-line options (also valid as keys of a ``--config`` YAML)."""

    pipeline: str = _option("assets/tiny-flux-shapes", "diffusers FluxPipeline id or path (the probe's base model)")
    out: str = _option("runs/probe/train", "collection directory; re-running with the same settings resumes")
    prompts: str = _option("shapes:train", "prompt source as the trainer's: shapes:<split>, a .txt or .jsonl file")
    num_prompts: int = _option(400, "N prompt draws (groups)")
    prompt_category_weights: str = _option("", "shapes: draws weighted by category, as the trainer's option")
    group_size: int = _option(8, "G seeds per prompt")
    num_steps: int = _option(10, "T denoising steps")
    capture_steps: list[int] = _option(None, "capture at the k-th transformer call, for each k", lambda: [1, 2, 3, 4])
    # GRPO samples with the SDE and the probe must rank SDE rollouts: collect at the trainer's noise level
    # (configs/tiny_shapes.yaml: noise_level 0.9, distinct initial noise per rollout).
    noise_level: float = _option(0.9, "SDE noise level a (0 = ODE); default = the GRPO trainer's")
    same_initial_noise: bool = _option(False, "a group shares its initial noise (the trainer's same_initial_noise)")
    sde_steps: list[int] = _option(
        None, "steps with SDE noise, the others ODE (the trainer's sde_window_only window; default: all)", list
    )
    guidance_scale: float = _option(3.5, "FLUX distilled guidance")
    resolution: int | None = _option(None, "image side in pixels (default: the VAE's sample_size)")
    text_length: int | None = _option(None, "max_sequence_length (default: the T5 tokenizer's, at most 512)")
    blocks: list[int] = _option(None, "global attention block indices (default: up to 10 middle blocks)", list)
    reward: str = _option("shapes", "reward spec: registry names or pkg.mod:Callable, comma-separated")
    reward_kwargs: str = _option("{}", 'JSON {"<component>": {kwargs}}')
    reward_weights: list[float] = _option(None, "one weight per reward component, in order (default: 1 each)", list)
    precision: str = _option("no", "the trainer's mixed_precision: no or bf16 (rollouts under bf16 autocast)")
    prompts_per_shard: int = _option(8, "prompt groups per shard file")
    seed: int = _option(0, "prompt draws and rollout noise; use another seed for a held-out collection")
    batch_size: int = _option(32, "rollouts per transformer call")
    device: str = _option("cuda" if torch.cuda.is_available() else "cpu", "torch device")
    dtype: str = _option("float32", "pipeline dtype (bfloat16 on GPUs)")
    threads: int = _option(0, "torch CPU threads (0: torch's default)")


def check_steps(args: CollectArgs) -> None:
    """Every capture step is one of the T transformer calls and every SDE step one of the T steps (checked before
    the model loads and samples).

    Raises:
        ValueError: naming the steps outside 1..num_steps.
    """
    outside = sorted(k for k in set(args.capture_steps) if not 1 <= k <= args.num_steps)
    if outside or not args.capture_steps:
        raise ValueError(
            f"capture_steps {outside or '[]'} must lie in [1, num_steps = {args.num_steps}]: k is the k-th of the "
            f"{args.num_steps} transformer calls (pruning needs k <= {args.num_steps - 1}); pass --capture_steps "
            f"with values in that range, or a larger --num_steps"
        )
    outside = sorted(k for k in set(args.sde_steps) if not 0 <= k < args.num_steps)
    if outside:  # a window past the last step would collect without any noise, silently
        raise ValueError(f"sde_steps {outside} must lie in [0, num_steps - 1 = {args.num_steps - 1}]")


def parse_args(argv: list[str] | None = None) -> CollectArgs:
    """``--config`` a run config (its sampler becomes the defaults) or a YAML of CollectArgs keys, then flags.

    Raises:
        ValueError: an unknown option (with the closest known one) or a capture step outside 1..num_steps.
    """
    argv = split_config_flag(list(sys.argv[1:] if argv is None else argv))
    check_flags(argv, [f.name for f in dataclasses.fields(CollectArgs)])
    parser = ConfigParser((CollectArgs,), description=__doc__, allow_abbrev=False)
    if "--config" in argv:
        at = argv.index("--config")
        path = argv[at + 1]
        with open(path) as handle:
            keys = set(yaml.safe_load(handle) or {})
        if not keys <= {f.name for f in dataclasses.fields(CollectArgs)}:  # a run config, not a collect config
            parser.set_defaults(**run_config_defaults(path))  # probe/collect.py
            argv = argv[:at] + argv[at + 2 :]
    (args,) = parser.parse_args_and_config(argv)
    check_steps(args)
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dtype = getattr(torch, args.dtype)
    pipeline = FluxPipeline.from_pretrained(args.pipeline, torch_dtype=dtype).to(args.device)
    pipeline.set_progress_bar_config(disable=True)
    sizes = pipeline_sizes(pipeline)
    settings = CollectSettings(
        pipeline=args.pipeline,
        prompts=args.prompts,
        num_prompts=args.num_prompts,
        group_size=args.group_size,
        num_steps=args.num_steps,
        capture_steps=sorted(set(args.capture_steps)),
        noise_level=args.noise_level,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution or sizes["resolution"],
        text_length=args.text_length or sizes["text_length"],
        blocks=list(args.blocks),
        reward=args.reward,
        reward_kwargs=json.loads(args.reward_kwargs),
        prompts_per_shard=args.prompts_per_shard,
        seed=args.seed,
        same_initial_noise=args.same_initial_noise,
        sde_steps=sorted(set(args.sde_steps)) or None,
        precision=args.precision,
        reward_weights=list(args.reward_weights) or None,
        prompt_category_weights=args.prompt_category_weights or None,
    )
    paths = collect(pipeline, settings, args.out, batch_size=args.batch_size, device=args.device)
    print(f"{len(paths)} shards ({settings.num_prompts} prompts x {settings.group_size} seeds) in {args.out}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
