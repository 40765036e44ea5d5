"""``awm``: advantage-weighted matching (Xue et al. 2025): the flow-matching error of each finished image,
noised afresh to the trained steps' sigmas, through the concave -e^p / p, weighted by the group advantage.

No ratio and no clip, so the PPO diagnostics do not exist here and are not logged. The options that follow AWM's
reference code (``awm_sigma_weight``, ``awm_kl_form``, ``awm_ema_kl_beta``; docs/design.md section 3) are read here.
"""

from __future__ import annotations

import torch

from rl.lora import LoraEMA
from rl.loss import LossOutput, awm_loss
from rl.objectives import Needs, Objective, register
from rl.sde import matching_log_prob, velocity_kl

# AWM's reference raises its policy EMA's decay by 0.001 per optimizer step, up to kl_ema_decay ("linear",
# train_sd3_awm.py lines 1410-1413); its GenEval and OCR configs take one optimizer step per epoch, so here per GRPO step.
EMA_DECAY_RAMP = 1e-3


def policy_ema_decay(steps_done: int, max_decay: float) -> float:
    """Decay of the policy EMA's update after ``steps_done`` GRPO steps: ``min(max_decay, 0.001 steps_done)``."""
    return min(max_decay, EMA_DECAY_RAMP * steps_done)


@register("awm")
class AWM(Objective):
    needs = Needs(sde_noise=False, transitions=False, finished_images=True)
    metrics = ("loss", "policy_loss", "kl_ref", "kl_ema", "matching_error")
    option_prefix = "awm_"

    def __init__(self, trainer) -> None:
        super().__init__(trainer)
        t = trainer.config.training
        # the LoRA's EMA that awm_ema_kl_beta holds the policy near; it starts at the initial weights
        self.policy_ema = LoraEMA(trainer.lora, t.awm_ema_kl_decay) if t.awm_ema_kl_beta > 0 else None

    @property
    def reference_forwards(self) -> int:
        return super().reference_forwards + int(self.policy_ema is not None)

    def loss(self, embeds, rollouts, rows, step, advantages, weights) -> LossOutput:
        trainer, t = self.trainer, self.trainer.config.training
        ema = None
        if self.policy_ema is not None:  # before the policy forward: the swap must not touch weights a graph saved
            with torch.no_grad(), self.policy_ema.average_parameters():
                _, ema = trainer.sampler.matching_error(rollouts, step, embeds, rows)
        error, velocity = trainer.sampler.matching_error(rollouts, step, embeds, rows, model=trainer.model)
        count = float(weights.sum())
        if count > 0:
            trainer.metrics.add("policy/matching_error", float((error.detach() * weights).sum()) / count, count)
        kl = None
        if t.kl_beta > 0:  # in velocity space, the same noised input under the base weights
            with torch.no_grad(), trainer.reference_weights():
                _, reference = trainer.sampler.matching_error(rollouts, step, embeds, rows)
            kl = velocity_kl(velocity, reference, t.awm_kl_form)
        kl_ema = None if ema is None else velocity_kl(velocity, ema, t.awm_kl_form)
        sigma = trainer.sampler.sigmas.to(error.device)[step] if t.awm_sigma_weight else None
        log_prob = matching_log_prob(error, t.awm_error_power, sigma)
        return awm_loss(log_prob, advantages[rows], kl, t.kl_beta, weights, kl_ema, t.awm_ema_kl_beta)

    def record(self, out: LossOutput, metrics, first_inner: bool) -> None:
        super().record(out, metrics, first_inner)
        if out.kl_ema is not None and float(out.count) > 0:
            metrics.add("policy/kl_ema", float(out.kl_ema), float(out.count))

    def after_optimise(self) -> None:
        """Fold the step's weights into the policy EMA (the reference does so after each epoch, line 1416)."""
        if self.policy_ema is not None:
            steps_done = self.trainer.state.step + 1
            self.policy_ema.update(policy_ema_decay(steps_done, self.trainer.config.training.awm_ema_kl_decay))

    def state_dict(self) -> dict:
        return {"policy_ema": self.policy_ema.state_dict()} if self.policy_ema is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.policy_ema is not None and "policy_ema" in state:
            self.policy_ema.load_state_dict(state["policy_ema"])
