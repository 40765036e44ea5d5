"""Collecting probe training data: N prompts x G seeds, captures at several steps, final rewards.

One sampling pass per shard with :class:`rl.sampler.FluxSampler` (the GRPO sampler itself, so the data are
distributed like GRPO rollouts: same SDE, same noise level, same per-rollout seeding) and one
:class:`probe.capture.ProbeRecorder` per capture step; then VAE decode and the real reward. Shards hold whole
prompt groups and are written atomically, so an interrupted collection resumes by skipping complete shards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import FluxPipeline
from tqdm import tqdm

from probe.capture import ObserverGroup, ProbeRecorder, default_blocks
from probe.data import SHARD_FORMAT_VERSION, atomic_save, shard_path, write_manifest
from probe.probe import transformer_fingerprint
from rewards.compose import build_reward_set
from rl.data import load_prompt_source
from rl.sampler import FluxSampler, encode_prompts

# Seeds of one collection: seed * SEED_STRIDE + rollout index (collections with different --seed never share noise).
SEED_STRIDE = 10_000_000


@dataclasses.dataclass
class CollectSettings:
    """Everything that determines a collection (recorded in ``manifest.json``; a resume must match it).

    Attributes:
        pipeline: pipeline id or path (recorded as the probe's base model).
        prompts: a trainer prompt source (``rl.data``): ``shapes:<split>`` or a ``.txt`` / ``.jsonl`` file.
        num_prompts: N prompt draws (with replacement, category-balanced, for ``shapes:``; shuffled passes
            over a file), each one group.
        group_size: G seeds per prompt.
        num_steps: T denoising steps.
        capture_steps: k values to capture at (each k-th transformer call).
        noise_level: SDE noise level (GRPO rollouts use the SDE; match the trainer's).
        same_initial_noise: a group shares its initial noise (the trainer's ``same_initial_noise``).
        sde_steps: the steps that add SDE noise, the others being ODE steps (the trainer's ``sde_window_only``
            window); ``None``: every step.
        precision: ``no`` or ``bf16``: the trainer's ``mixed_precision`` (bf16 rollouts run under autocast).
        guidance_scale: FLUX distilled guidance.
        resolution: image side in pixels.
        text_length: max_sequence_length.
        blocks: global attention block indices to capture.
        reward: reward spec (registry names or ``pkg.mod:Callable``, comma-separated).
        reward_kwargs: constructor kwargs per reward component.
        reward_weights: one weight per reward component, in order (the trainer's ``reward_weights``); None: 1 each.
        prompts_per_shard: prompt groups per shard.
        seed: prompt draws and rollout seeds.
        fingerprint: the transformer's config fingerprint.
        weights: :func:`weights_fingerprint` of the transformer (retrained weights of the same architecture make
            a resumed collection an error instead of a silent mix).
        prompt_category_weights: the trainer's ``prompt_category_weights`` for ``shapes:`` draws; None: balanced.
    """

    pipeline: str
    prompts: str
    num_prompts: int
    group_size: int
    num_steps: int
    capture_steps: list[int]
    noise_level: float
    guidance_scale: float
    resolution: int
    text_length: int
    blocks: list[int]
    reward: str
    reward_kwargs: dict
    prompts_per_shard: int
    seed: int
    same_initial_noise: bool = False
    sde_steps: list[int] | None = None
    precision: str = "no"
    fingerprint: str = ""
    weights: str = ""
    reward_weights: list[float] | None = None
    prompt_category_weights: str | None = None


def prompt_source(spec: str, count: int, seed: int, category_weights: str | None = None) -> list[tuple[str, dict]]:
    """``count`` (prompt, metadata) draws from a trainer prompt source (``rl.data.load_prompt_source``).

    The draws are the source's training batch for ``(seed, step 0)``: category-balanced (or ``category_weights``-
    weighted) with replacement for ``shapes:<split>``, a shuffled pass for files, exactly as GRPO draws them.
    """
    source = load_prompt_source(spec, category_weights or "")
    return [(p.text, p.metadata) for p in source.batch(0, count, seed)]


def pipeline_sizes(pipeline: FluxPipeline) -> dict[str, int]:
    """Default ``resolution`` (the VAE's sample size) and ``text_length`` (T5's max length, at most 512)."""
    return {
        "resolution": pipeline.vae.config.sample_size,
        "text_length": min(pipeline.tokenizer_2.model_max_length, 512),
    }


def weights_fingerprint(module: torch.nn.Module, values: int = 16) -> str:
    """A 16-hex-digit hash of every parameter's name, shape and first and last ``values`` entries.

    Cheap even for FLUX.1-dev (a few hundred tensors, 32 numbers each) and changed by any training run.
    """
    digest = hashlib.sha256()
    for name, parameter in module.named_parameters():
        flat = parameter.detach().reshape(-1)
        sample = torch.cat([flat[:values], flat[-values:]]).float().cpu()
        digest.update(f"{name}{tuple(parameter.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_settings(pipeline: FluxPipeline, settings: CollectSettings) -> CollectSettings:
    """Fill the blocks (default middle blocks) and the config and weights fingerprints from the pipeline."""
    transformer = pipeline.transformer
    blocks = list(default_blocks(transformer)) if not settings.blocks else list(settings.blocks)
    return dataclasses.replace(
        settings,
        blocks=blocks,
        fingerprint=transformer_fingerprint(transformer),
        weights=weights_fingerprint(transformer),
    )


def run_config_defaults(path: str) -> dict:
    """Collection options from a run config file: the trainer's model, prompts, reward and whole sampler.

    Keys are ``launch/probe_collect.py``'s options (``reward_kwargs`` as JSON text, ``sde_steps`` empty for
    every step), so a probe collected with them ranks exactly the rollouts that run makes.
    """
    from rl.config_parse import parse_config

    config = parse_config(["--config", path])
    m, s, r = config.model, config.sampling, config.reward
    if s.height != s.width:
        raise ValueError(f"{path}: collection renders square images, the run is {s.height}x{s.width}")
    return {
        "pipeline": m.pretrained,
        "prompts": s.prompts,
        "prompt_category_weights": s.prompt_category_weights,
        "group_size": s.group_size,
        "num_steps": s.num_steps,
        "noise_level": s.noise_level,
        "same_initial_noise": s.same_initial_noise,
        "sde_steps": list(s.train_window) if s.sde_window_only else [],
        "guidance_scale": s.guidance_scale,
        "resolution": s.height,
        "text_length": m.max_sequence_length,
        "reward": r.reward,
        "reward_kwargs": json.dumps(r.reward_kwargs or {}),
        "reward_weights": [float(w) for w in r.reward_weights or []],  # the total the trainer ranks by
        "precision": config.training.mixed_precision,
        "dtype": "bfloat16" if config.training.mixed_precision == "bf16" else "float32",  # the trainer's weights
    }


def collect(
    pipeline: FluxPipeline,
    settings: CollectSettings,
    out: str | Path,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: bool = True,
    after_shard: Callable[[int], None] | None = None,
) -> list[Path]:
    """Collect (or finish collecting) ``settings`` into ``out``; returns every shard path.

    Args:
        pipeline: the loaded pipeline (on ``device``).
        settings: see :class:`CollectSettings` (``blocks`` empty: the default blocks).
        out: collection directory (created; an existing one must hold the same settings).
        batch_size: rollouts per transformer call.
        after_shard: called with each newly written shard's index (tests interrupt here).
    """
    settings = resolve_settings(pipeline, settings)
    write_manifest(out, dataclasses.asdict(settings))
    sampler = FluxSampler(
        pipeline,
        num_steps=settings.num_steps,
        noise_level=settings.noise_level,
        guidance_scale=settings.guidance_scale,
        height=settings.resolution,
        width=settings.resolution,
        batch_size=batch_size,
        sde_steps=settings.sde_steps,
    )
    reward_set = build_reward_set(settings.reward, settings.reward_weights, kwargs=settings.reward_kwargs)
    items = prompt_source(settings.prompts, settings.num_prompts, settings.seed, settings.prompt_category_weights)
    per_shard, group_size = settings.prompts_per_shard, settings.group_size
    num_shards = -(-len(items) // per_shard)
    paths = [shard_path(out, i) for i in range(num_shards)]
    work_per_prompt = group_size * settings.num_steps
    done = sum(len(items[i * per_shard : (i + 1) * per_shard]) for i in range(num_shards) if paths[i].exists())
    bar = tqdm(total=len(items) * work_per_prompt, initial=done * work_per_prompt, desc="collect", unit="step",
               disable=not progress)  # fmt: skip
    try:
        for index in range(num_shards):
            if paths[index].exists():
                continue
            first = index * per_shard
            chunk = items[first : first + per_shard]
            shard = _collect_shard(pipeline, sampler, reward_set, settings, chunk, first, device, bar.update)
            atomic_save(shard, paths[index])
            if after_shard:
                after_shard(index)
    finally:
        bar.close()
        reward_set.close()
    return paths


@torch.no_grad()
def _collect_shard(pipeline, sampler, reward_set, settings, chunk, first_group, device, progress) -> dict:
    group_size = settings.group_size
    texts = [prompt for prompt, _ in chunk]
    embeds = encode_prompts(pipeline, texts, settings.text_length).to(device)
    prompt_index = torch.arange(len(chunk)).repeat_interleave(group_size)
    group = prompt_index + first_group
    seeds = settings.seed * SEED_STRIDE + group * group_size + torch.arange(group_size).repeat(len(chunk))
    longest = int(embeds.token_mask.sum(-1).max())
    recorders = [
        ProbeRecorder.for_sampler(
            sampler, k, settings.blocks, settings.text_length, keep_text_tokens=longest, dtype=torch.float16
        )
        for k in settings.capture_steps
    ]
    initial = seeds[::group_size].repeat_interleave(group_size) if settings.same_initial_noise else None
    start = sampler.start(prompt_index, seeds, device, initial_seeds=initial)
    autocast = torch.autocast(torch.device(device).type, torch.bfloat16, enabled=settings.precision == "bf16")
    with autocast:  # the trainer's accelerator.autocast()
        done = sampler.advance(start, embeds, settings.num_steps, observer=ObserverGroup(recorders), progress=progress)
        images = sampler.decode(done.latents)
    prompts = [texts[i] for i in prompt_index.tolist()]
    metadata = [chunk[i][1] for i in prompt_index.tolist()]
    result = reward_set(images, prompts, metadata)
    if not torch.isfinite(result.total).all():
        raise FloatingPointError(f"reward {settings.reward!r} returned non-finite scores for prompts {texts}")
    captures = {}
    for recorder in recorders:
        capture = recorder.result(done)
        captures[capture.capture_step] = {
            "attention": capture.attention.cpu(),
            "x0": capture.x0.cpu(),
            "latents": capture.latents.cpu(),
            "sigma": capture.sigma,
        }
    return {
        "format_version": SHARD_FORMAT_VERSION,
        "prompts": prompts,
        "metadata": [json.dumps(m) for m in metadata],
        "group": group,
        "seed": seeds,
        "reward": result.total,
        "components": result.components,
        "token_mask": embeds.token_mask[prompt_index].cpu(),
        "captures": captures,
        "blocks": list(settings.blocks),
        "grid": [sampler.latent_height // 2, sampler.latent_width // 2],
    }
