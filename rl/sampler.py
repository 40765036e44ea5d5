"""Group rollouts of a FLUX transformer with the Flow-GRPO SDE, resumable at any step.

Mirrors ``diffusers.FluxPipeline``'s phases (encode prompts, prepare latents, timesteps, denoise, decode)
and reuses its helpers, but owns the loop: it records every step's latents and log-probs, runs rollouts
only up to a given step and continues any subset of them later (probe pruning stops most rollouts at step
k). Every rollout draws its noise from its own seed, so a rollout's trajectory does not depend on which
other rollouts share its batch: survivors of pruning follow exactly the path they would have followed
unpruned. With ``noise_level = 0`` the loop is FluxPipeline's deterministic Euler sampler.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from rl.sde import forward_noise, matching_error, sde_step


@dataclasses.dataclass
class PromptEmbeddings:
    """Cached text-encoder outputs for N prompts (the text encoders are frozen: encode once).

    Attributes:
        prompt_embeds: ``[N, L, D]`` T5 token embeddings.
        pooled_embeds: ``[N, Dp]`` CLIP pooled embedding.
        text_ids: ``[L, 3]`` FLUX text position ids (all zero).
        token_mask: ``[N, L]`` bool, True on real T5 tokens (words and the end token), False on padding.
        prompts: the N prompt strings.
    """

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    text_ids: torch.Tensor
    token_mask: torch.Tensor
    prompts: list[str]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PromptEmbeddings:
        return PromptEmbeddings(
            prompt_embeds=self.prompt_embeds.to(device, dtype),
            pooled_embeds=self.pooled_embeds.to(device, dtype),
            text_ids=self.text_ids.to(device, dtype),
            token_mask=self.token_mask.to(device),
            prompts=self.prompts,
        )


@torch.no_grad()
def encode_prompts(pipeline: FluxPipeline, prompts: list[str], max_sequence_length: int) -> PromptEmbeddings:
    """Encode prompts with the pipeline's own ``encode_prompt`` and record which T5 tokens are real."""
    prompt_embeds, pooled, text_ids = pipeline.encode_prompt(
        prompts, None, max_sequence_length=max_sequence_length, num_images_per_prompt=1
    )
    mask = pipeline.tokenizer_2(
        prompts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).attention_mask.bool()
    return PromptEmbeddings(prompt_embeds, pooled, text_ids, mask.to(prompt_embeds.device), list(prompts))


@dataclasses.dataclass
class Rollouts:
    """B rollouts that have all completed ``step`` denoising steps.

    Attributes:
        prompt_index: ``[B]`` row of each rollout's prompt in the :class:`PromptEmbeddings`.
        seeds: ``[B]`` per-rollout noise seed (initial noise and every SDE step's noise derive from it).
        states: ``[B, step + 1, S, C]`` packed latents before step 0 (the noise), after step 1, ... after
            ``step``; ``states[:, i]`` and ``states[:, i + 1]`` are step i's input and output.
        log_probs: ``[B, step]`` log-prob of each step's transition under the sampling policy.
    """

    prompt_index: torch.Tensor
    seeds: torch.Tensor
    states: torch.Tensor
    log_probs: torch.Tensor

    @property
    def step(self) -> int:
        return self.states.shape[1] - 1

    @property
    def latents(self) -> torch.Tensor:
        """``[B, S, C]`` the current latents."""
        return self.states[:, -1]

    def __len__(self) -> int:
        return self.prompt_index.shape[0]

    @classmethod
    def concatenate(cls, parts: list[Rollouts]) -> Rollouts:
        """Rollouts at the same step, one after another (the trainer finishes a step in chunks)."""
        if len(parts) == 1:
            return parts[0]
        fields = ("prompt_index", "seeds", "states", "log_probs")
        return cls(*(torch.cat([getattr(part, name) for part in parts]) for name in fields))

    def select(self, indices: torch.Tensor | list[int]) -> Rollouts:
        """The subset ``indices`` (e.g. the survivors of pruning), in that order."""
        indices = torch.as_tensor(indices, dtype=torch.long, device=self.prompt_index.device)
        return Rollouts(self.prompt_index[indices], self.seeds[indices], self.states[indices], self.log_probs[indices])


class StepObserver(Protocol):
    """Hooks into the denoising loop (the probe's attention capture and x0 features use them)."""

    def forward_context(self, step: int, rows: torch.Tensor) -> AbstractContextManager: ...

    def after_forward(
        self, step: int, rows: torch.Tensor, latents: torch.Tensor, velocity: torch.Tensor, sigma: float
    ) -> None: ...


def _rows_and_steps(
    rollouts: Rollouts, step: int | torch.Tensor, rows: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The selected rows (default: all) and one step index per row (``step``: an int or ``[B']``)."""
    rows = torch.arange(len(rollouts), device=rollouts.states.device) if rows is None else rows
    return rows, torch.as_tensor(step, device=rows.device).long().expand(len(rows))


def step_noise(
    seeds: torch.Tensor, step: int | torch.Tensor, shape: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """``[B, *shape]`` standard-normal noise of each rollout at ``step`` (an int or ``[B]``; -1: the initial latents,
    ``0..T-1``: the SDE steps, ``T + k``: AWM's forward noise at trained step k)."""
    steps = torch.as_tensor(step).expand(len(seeds)).tolist()
    noise = []
    for seed, index in zip(seeds.tolist(), steps):
        generator = torch.Generator("cpu").manual_seed((seed * 1_000_003 + index + 1) % 2**63)
        noise.append(torch.randn(shape, generator=generator))
    return torch.stack(noise).to(device)


# FLUX models render well near the size they were trained at: FLUX.1-dev (1024 px) is fine at 512, while the
# shipped tiny model (trained at 64 px only) draws blank images at 512, so every reward is flat and GRPO learns
# nothing. Farther than this factor from the native size, either way, the launcher warns.
NATIVE_SIZE_FACTOR = 2.0


def native_size_warning(height: int, width: int, native: int) -> str | None:
    """The warning for an image size more than ``NATIVE_SIZE_FACTOR`` off the pipeline's native size, else None.

    Args:
        height, width: the configured image size in pixels.
        native: the pipeline's native side in pixels, ``pipeline.vae.config.sample_size`` (FLUX.1-dev: 1024; the
            shipped tiny model: 64).
    """
    low, high = native / NATIVE_SIZE_FACTOR, native * NATIVE_SIZE_FACTOR
    if all(low <= side <= high for side in (height, width)):
        return None
    return (
        f"height x width = {height} x {width} px is more than {NATIVE_SIZE_FACTOR:g}x off this pipeline's native "
        f"{native} x {native} px (its VAE's sample_size): images far from the trained size come out degraded or "
        f"blank and every reward flat. Set height and width within [{low:g}, {high:g}] (e.g. --height {native} "
        f"--width {native}), or run the config made for this model (configs/tiny_shapes.yaml for the tiny model, "
        "configs/flux_dev_*.yaml for FLUX.1-dev)."
    )


class FluxSampler:
    """Samples and scores rollouts of a FLUX transformer.

    Args:
        pipeline: a loaded FluxPipeline; the sampler uses its transformer (possibly LoRA-wrapped), VAE and
            scheduler config, never its ``__call__``.
        num_steps: T, denoising steps.
        noise_level: ``a`` of the SDE (0 = deterministic ODE, as FluxPipeline).
        guidance_scale: FLUX's distilled guidance value (3.5 for FLUX.1-dev); ignored by models without a
            guidance embedding.
        height, width: image size in pixels.
        batch_size: most rollouts per transformer call (a memory knob; batched kernels may round a rollout
            differently beside other batch-mates, in the last bits: batch 1 is bit-exact per seed).
        sde_steps: the steps that add SDE noise (default all); the others are deterministic Euler steps with
            no density, so only ``sde_steps`` can be scored (Flow-GRPO-Fast's SDE window).
    """

    def __init__(
        self,
        pipeline: FluxPipeline,
        num_steps: int,
        noise_level: float,
        guidance_scale: float,
        height: int,
        width: int,
        batch_size: int = 16,
        sde_steps: Sequence[int] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.num_steps = num_steps
        self.noise_level = noise_level
        self.sde_steps = frozenset(range(num_steps) if sde_steps is None else sde_steps)
        self.guidance_scale = guidance_scale
        self.batch_size = batch_size
        self.height, self.width = height, width
        factor = pipeline.vae_scale_factor * 2
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor} for this VAE, got {height}x{width}")
        self.latent_height = 2 * (height // factor)
        self.latent_width = 2 * (width // factor)
        self.num_tokens = (self.latent_height // 2) * (self.latent_width // 2)
        self.channels = pipeline.transformer.config.in_channels
        self.image_ids = pipeline._prepare_latent_image_ids(
            1, self.latent_height // 2, self.latent_width // 2, "cpu", torch.float32
        )
        sigmas, timesteps = self.schedule(pipeline, num_steps, self.num_tokens)
        self.sigmas, self.timesteps = sigmas, timesteps
        self.sigma_below_one = float(sigmas[1]) if float(sigmas[0]) >= 1.0 else float(sigmas[0])

    @staticmethod
    def shift_mu(scheduler, num_tokens: int) -> float:
        """FLUX's resolution-dependent time-shift exponent ``mu`` for ``num_tokens`` image tokens."""
        config = scheduler.config
        return calculate_shift(
            num_tokens,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )

    @staticmethod
    def schedule(pipeline: FluxPipeline, num_steps: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """FluxPipeline's sigmas ``[T + 1]`` (ending at 0) and timesteps ``[T]`` for this image size."""
        scheduler = pipeline.scheduler.__class__.from_config(pipeline.scheduler.config)
        mu = FluxSampler.shift_mu(scheduler, num_tokens)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu, device="cpu")
        return scheduler.sigmas.float(), scheduler.timesteps.float()

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipeline.transformer

    def velocity(
        self,
        latents: torch.Tensor,
        step: int | torch.Tensor,
        embeds: PromptEmbeddings,
        prompt_index: torch.Tensor,
        model: torch.nn.Module | None = None,
    ) -> torch.Tensor:
        """Transformer prediction ``[B, S, C]`` at ``step`` (an int, or ``[B]`` steps for mixed batches).

        ``model`` is the module to call instead of the pipeline's transformer, e.g. the same transformer wrapped
        by ``accelerator.prepare`` (DDP) for training; its config and dtype are read from the pipeline's.
        """
        transformer = self.transformer
        dtype = next(transformer.parameters()).dtype
        device = latents.device
        batch = latents.shape[0]
        timestep = self.timesteps.to(device)[torch.as_tensor(step, device=device).long()].expand(batch) / 1000
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((batch,), self.guidance_scale, device=device, dtype=torch.float32)
        return (model or transformer)(
            hidden_states=latents.to(dtype),
            timestep=timestep.to(dtype),
            guidance=guidance,
            pooled_projections=embeds.pooled_embeds[prompt_index].to(dtype),
            encoder_hidden_states=embeds.prompt_embeds[prompt_index].to(dtype),
            txt_ids=embeds.text_ids.to(device, dtype),
            img_ids=self.image_ids.to(device, dtype),
            return_dict=False,
        )[0]

    def calls(self, rows: int, steps: int) -> int:
        """Transformer calls that take ``rows`` rollouts ``steps`` denoising steps: :meth:`advance` (and any loop
        over ``batch_size`` rows per call) makes one per chunk per step."""
        return math.ceil(rows / self.batch_size) * steps

    @torch.no_grad()
    def idle_forward(self, text_tokens: int, device: torch.device | str) -> None:
        """One transformer call on zero inputs (one latent, a prompt of ``text_tokens`` zero tokens), output dropped.

        What a process with fewer forwards than the others runs under FSDP or ZeRO-3, where every forward is a
        collective (``rl.trainer.GRPOTrainer.even_forwards``): the weights it gathers are what counts, not the inputs.
        """
        config = self.transformer.config
        embeds = PromptEmbeddings(
            prompt_embeds=torch.zeros(1, text_tokens, config.joint_attention_dim, device=device),
            pooled_embeds=torch.zeros(1, config.pooled_projection_dim, device=device),
            text_ids=torch.zeros(text_tokens, 3, device=device),
            token_mask=torch.zeros(1, text_tokens, dtype=torch.bool, device=device),
            prompts=[""],
        )
        latents = torch.zeros(1, self.num_tokens, self.channels, device=device)
        self.velocity(latents, 0, embeds, torch.zeros(1, dtype=torch.long, device=device))

    def start(
        self,
        prompt_index: torch.Tensor,
        seeds: torch.Tensor,
        device: torch.device | str = "cpu",
        initial_seeds: torch.Tensor | None = None,
    ) -> Rollouts:
        """Rollouts at step 0: each one's initial noise drawn from its seed (equal seeds: shared noise).

        ``initial_seeds`` (``[B]``, default ``seeds``) seed the initial noise alone: equal initial seeds with
        distinct ``seeds`` share the starting latents but not the SDE noise (Flow-GRPO's ``same_latent``).
        """
        noise_seeds = seeds if initial_seeds is None else initial_seeds
        noise = step_noise(noise_seeds, -1, (16, self.latent_height, self.latent_width), torch.device(device))
        packed = FluxPipeline._pack_latents(noise, len(seeds), 16, self.latent_height, self.latent_width)
        return Rollouts(
            prompt_index=prompt_index.to(device),
            seeds=seeds.to(device),
            states=packed[:, None],
            log_probs=torch.zeros(len(seeds), 0, device=device),
        )

    @torch.no_grad()
    def advance(
        self,
        rollouts: Rollouts,
        embeds: PromptEmbeddings,
        until_step: int,
        observer: StepObserver | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Rollouts:
        """Denoise ``rollouts`` from their current step to ``until_step`` (<= T), recording every transition.

        Args:
            rollouts: rollouts all at the same step.
            embeds: the prompt embeddings ``rollouts.prompt_index`` points into.
            until_step: the step count to stop at; T finishes the rollouts.
            observer: optional hooks around each transformer call (attention capture, x0 features).
            progress: called with the number of rollout-steps done after each chunk (progress bars).
        """
        if not rollouts.step <= until_step <= self.num_steps:
            raise ValueError(f"until_step={until_step} must lie in [{rollouts.step}, {self.num_steps}]")
        states = [rollouts.states]
        log_probs = [rollouts.log_probs]
        latents = rollouts.latents
        device = latents.device
        sigmas = self.sigmas.to(device)
        for step in range(rollouts.step, until_step):
            next_chunks, log_prob_chunks = [], []
            for start in range(0, len(rollouts), self.batch_size):
                rows = torch.arange(start, min(start + self.batch_size, len(rollouts)), device=device)
                x = latents[rows]
                context = observer.forward_context(step, rows) if observer else contextlib.nullcontext()
                with context:
                    v = self.velocity(x, step, embeds, rollouts.prompt_index[rows])
                if observer:
                    observer.after_forward(step, rows, x, v, float(sigmas[step]))
                level = self.noise_level if step in self.sde_steps else 0.0
                noise = step_noise(rollouts.seeds[rows], step, tuple(x.shape[1:]), device) if level else None
                out = sde_step(x, v, sigmas[step], sigmas[step + 1], level, self.sigma_below_one, noise=noise)
                next_chunks.append(out.next_latents)
                log_prob_chunks.append(out.log_prob)
                if progress:
                    progress(len(rows))
            latents = torch.cat(next_chunks)
            states.append(latents[:, None])
            log_probs.append(torch.cat(log_prob_chunks)[:, None])
        return Rollouts(rollouts.prompt_index, rollouts.seeds, torch.cat(states, 1), torch.cat(log_probs, 1))

    def step_log_prob(
        self,
        rollouts: Rollouts,
        step: int | torch.Tensor,
        embeds: PromptEmbeddings,
        rows: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
    ):
        """Re-score the recorded transition(s) at ``step`` under the current weights (differentiable).

        Args:
            step: an int, or ``[B']`` steps (one per row) for batches mixing steps.
            rows: which rollouts (default: all).
            model: the module to call (see :meth:`velocity`), e.g. the accelerate-wrapped transformer.

        Returns:
            The :class:`rl.sde.SdeStep` of the recorded next latents: ``log_prob [B']`` and ``mean``/``std``
            for the KL term.
        """
        rows, step_t = _rows_and_steps(rollouts, step, rows)
        if len(self.sde_steps) < self.num_steps:  # a window: the check reads the steps back (a device sync)
            deterministic = set(step_t.tolist()) - self.sde_steps
            if deterministic:
                raise ValueError(f"steps {sorted(deterministic)} were sampled without SDE noise")
        x = rollouts.states[rows, step_t]
        x_next = rollouts.states[rows, step_t + 1]
        v = self.velocity(x, step_t, embeds, rollouts.prompt_index[rows], model=model)
        sigmas = self.sigmas.to(x.device)
        return sde_step(
            x, v, sigmas[step_t], sigmas[step_t + 1], self.noise_level, self.sigma_below_one, next_latents=x_next
        )

    def matching_error(
        self,
        rollouts: Rollouts,
        step: int | torch.Tensor,
        embeds: PromptEmbeddings,
        rows: torch.Tensor | None = None,
        model: torch.nn.Module | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """AWM's flow-matching error of finished rollouts at trained step(s) ``step`` (differentiable).

        The rollouts' clean latents are noised to the step's sigma with noise seeded by (rollout seed, step), so
        the same call always sees the same input (a reference forward, a second inner epoch).

        Args:
            rollouts: finished rollouts (``step == T``).
            step: an int, or ``[B']`` steps (one per row).
            rows: which rollouts (default: all).
            model: the module to call (see :meth:`velocity`).

        Returns:
            ``(error [B'], velocity [B', S, C])``: ``rl.sde.matching_error`` and the prediction it scored.
        """
        if rollouts.step != self.num_steps:
            raise ValueError(f"AWM scores finished rollouts; these stopped at step {rollouts.step} of {self.num_steps}")
        rows, step_t = _rows_and_steps(rollouts, step, rows)
        clean = rollouts.latents[rows].float()
        noise = step_noise(rollouts.seeds[rows], self.num_steps + step_t.cpu(), tuple(clean.shape[1:]), clean.device)
        noisy = forward_noise(clean, noise, self.sigmas.to(clean.device)[step_t])
        v = self.velocity(noisy, step_t, embeds, rollouts.prompt_index[rows], model=model)
        return matching_error(v, clean, noise), v

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents ``[B, S, C]`` to images ``[B, 3, H, W]`` in [0, 1] (fp32), in chunks of ``batch_size``."""
        vae = self.pipeline.vae
        images = []
        for chunk in latents.split(self.batch_size):
            unpacked = FluxPipeline._unpack_latents(chunk, self.height, self.width, self.pipeline.vae_scale_factor)
            unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
            decoded = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
            images.append((decoded.float() / 2 + 0.5).clamp(0, 1))
        return torch.cat(images)
