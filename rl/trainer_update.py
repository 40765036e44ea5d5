"""The trainer's update phase: PPO-clipped (or AWM) optimizer steps over a scored GRPO step.

A mixin of :class:`rl.trainer.GRPOTrainer` (docs/design.md section 2), as ``rl/trainer_persistence.py`` is for
saving and resuming: it reads the trainer's accelerator, model, optimizer, EMA, objective, metrics and state, and
keeps the micro-batching, the per-sample loss weights, the skipping of non-finite or empty updates and the stop of
a diverged run out of ``rl/trainer.py``'s loop.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from rl.advantages import scale_advantages
from rl.batches import PromptBatch, ScoredRollouts, trained_steps
from rl.distributed import is_deepspeed
from rl.loss import per_sample_scale
from rl.pruning import trained_step_weights
from rl.sampler import Rollouts
from rl.schedule import lr_factor

logger = logging.getLogger("rl.trainer")

NONFINITE_STEPS_TO_STOP = 3  # steps in a row whose every update had a NaN/inf gradient: the run has diverged


class NonFiniteGradientError(ArithmeticError):
    """Training diverged: every update of several steps in a row had a non-finite gradient (none was applied)."""


class TrainerUpdate:
    """Optimizer steps over a scored GRPO step, for :class:`rl.trainer.GRPOTrainer`."""

    def optimise(self, batch: PromptBatch, scored: ScoredRollouts, advantages: torch.Tensor) -> None:
        """PPO-clipped updates over the trained steps of every valid rollout, ``num_inner_epochs`` times.

        The rollouts are split into micro-batches of at most ``train_batch_size``; every process runs the same
        number (the largest any process needs; a process short of rollouts runs zero-weight filler), so
        distributed gradient synchronisation and accumulation windows line up. Each (rollout, trained step)
        sample has its own weight (:func:`rl.pruning.trained_step_weights`): a step a pruned rollout did not
        record keeps its place with weight 0 and re-scores a recorded step instead (finite, out of the loss).
        """
        t, acc = self.config.training, self.accelerator
        rollouts = scored.rollouts
        device = rollouts.states.device
        steps = trained_steps(self.config.sampling, t.seed, self.state.step, len(rollouts), acc.process_index)
        steps = steps.to(device)
        recorded = scored.recorded.to(device) if scored.recorded is not None else None
        weights = trained_step_weights(scored.valid.to(device), steps, recorded)
        if recorded is not None:
            early = recorded < self.sampler.num_steps
            total = float(weights.sum())
            self.metrics.add("prune/early_trained_frac", float(weights[early].sum()) / max(total, 1.0), total)
        if self.global_count(int(bool(weights.sum() > 0))) == 0:  # every rollout dropped (drop_group), everywhere
            self.info(f"step {self.state.step + 1}: no valid rollout on any process, no update")
            return  # AdamW would still move the LoRA on its momentum and weight decay alone
        advantages = scale_advantages(advantages.to(device), t.adv_clip_max, t.adv_scale_max)
        factor = lr_factor(t.lr_schedule, self.state.step, t.max_steps, t.lr_warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = t.learning_rate * factor
        most = int(acc.gather(torch.tensor([len(rollouts)], device=acc.device)).max())
        updates = math.ceil(most / (t.train_batch_size * t.gradient_accumulation_steps))
        updated, passes, skipped = False, 0, 0
        deepspeed = is_deepspeed(acc)
        with self.phase("train"):
            for epoch in range(t.num_inner_epochs):
                order = torch.from_numpy(np.random.default_rng([t.seed, self.state.step, epoch, 2]).permutation(most))
                order = order[order < len(rollouts)]
                chunks = torch.tensor_split(order, updates * t.gradient_accumulation_steps)
                live, window_weights = self.live_weights(chunks, weights)
                micro_steps = t.gradient_accumulation_steps * steps.shape[1]
                for index, chunk in enumerate(chunks):
                    rows = chunk.to(device) if len(chunk) else torch.zeros(1, dtype=torch.long, device=device)
                    window_weight = float(window_weights[index // t.gradient_accumulation_steps])
                    # a window of dropped rollouts only (on every process) makes no update: AdamW would still move
                    # the LoRA on its momentum and weight decay alone. DeepSpeed steps inside backward regardless,
                    # so there the step is counted and the EMA follows it
                    live_window = window_weight > 0 or deepspeed
                    for column in range(steps.shape[1]):
                        passes += len(rows)
                        step = steps[rows, column]
                        chunk_weights = weights[rows, column] if len(chunk) else torch.zeros(1, device=device)
                        scale = per_sample_scale(
                            float(live[index, column]), window_weight, micro_steps, acc.num_processes
                        )
                        if recorded is not None:  # an unrecorded step (weight 0) re-scores the last recorded one
                            step = torch.minimum(step, recorded[rows] - 1)
                        finite = True
                        with acc.accumulate(self.model):
                            out = self.policy_loss(batch.embeds, rollouts, rows, step, advantages, chunk_weights)
                            acc.backward(out.loss * scale)
                            if acc.sync_gradients:
                                grad_norm = acc.clip_grad_norm_(self.lora_params, t.max_grad_norm)
                                if grad_norm is not None:  # DeepSpeed clips inside its step and may report none
                                    # the norm of the reduced gradient: every process skips the same updates
                                    finite = math.isfinite(float(grad_norm))
                                    if finite and live_window:
                                        self.metrics.add("train/grad_norm", float(grad_norm))
                            if finite and live_window:  # a NaN/inf gradient would make AdamW's moments NaN
                                self.optimizer.step()
                            self.optimizer.zero_grad()
                        self.objective.record(out, self.metrics, first_inner=not updated)
                        if acc.sync_gradients and not finite:
                            skipped += 1
                        elif acc.sync_gradients and live_window:
                            updated = True
                            self.state.optimizer_steps += 1
                            if self.ema is not None:
                                self.ema.update()
        self.objective.after_optimise()
        self.count_skipped_updates(skipped, updated)
        passes = self.global_count(passes)
        self.state.train_passes += passes
        self.state.transformer_calls += passes * self.objective.reference_forwards  # the KL references' forwards

    def live_weights(
        self, chunks: tuple[torch.Tensor, ...], weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The live weight (valid, recorded samples) of each micro-step, ``[chunks, trained steps]`` on the CPU
        (read once, not synchronised per micro-step), and of each accumulation window of ``chunks``, summed over
        every process (the terms of the update's per-sample mean, :func:`rl.loss.per_sample_scale`)."""
        per_step = torch.stack([weights[chunk.to(weights.device)].sum(dim=0) for chunk in chunks]).double()
        per_window = per_step.sum(dim=1).view(-1, self.config.training.gradient_accumulation_steps).sum(dim=1)
        if self.accelerator.num_processes > 1:
            per_window = self.accelerator.reduce(per_window.to(self.accelerator.device), reduction="sum")
        return per_step.cpu(), per_window.cpu()

    def count_skipped_updates(self, skipped: int, updated: bool) -> None:
        """Log updates skipped for a non-finite gradient and count the steps in a row with no update at all."""
        self.metrics.add("train/skipped_updates", skipped)
        if skipped and self.accelerator.is_main_process:
            logger.warning("step %d: %d update(s) skipped for a non-finite gradient", self.state.step + 1, skipped)
        self.state.nonfinite_steps = 0 if updated or not skipped else self.state.nonfinite_steps + 1

    def stop_if_diverged(self) -> None:
        """After ``NONFINITE_STEPS_TO_STOP`` steps in a row with no update at all, stop (checkpointing the intact
        LoRA first) instead of training on nothing. Called once the step is counted, so the checkpoint holds the
        step whose counters and metrics it already has (a skipped step is a step done, as the ones before it)."""
        if self.state.nonfinite_steps < NONFINITE_STEPS_TO_STOP:
            return
        self.stop_if_the_step_failed(
            NonFiniteGradientError(
                f"the gradient was NaN or infinite in every update of the last {self.state.nonfinite_steps} "
                f"steps (to step {self.state.step}), so none of them was applied; the run is checkpointed. "
                "Lower learning_rate or adv_clip_max, or try mixed_precision no, and continue from this checkpoint "
                "with --resume_from latest --allow_config_change true, or from an earlier one in "
                f"{self.output_dir / 'checkpoints'} with --resume_from <its folder> --allow_config_change true "
                "--output_dir <a new folder>"
            ),
            what=f"step {self.state.step}",
        )

    def policy_loss(self, embeds, rollouts: Rollouts, rows, step, advantages, weights):
        """The objective's loss of rollouts ``rows`` at denoising steps ``step`` (rl/objectives/)."""
        return self.objective.loss(embeds, rollouts, rows, step, advantages, weights)
