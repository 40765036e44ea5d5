"""``flow_grpo``: the PPO-clipped ratio of the recorded SDE transitions' exact log-probs (Flow-GRPO)."""

from __future__ import annotations

import torch

from rl.loss import LossOutput, grpo_loss
from rl.objectives import Needs, Objective, register
from rl.sde import kl_to_reference


@register("flow_grpo")
class FlowGRPO(Objective):
    needs = Needs(sde_noise=True, transitions=True, finished_images=False)
    metrics = ("loss", "policy_loss", "kl_ref", "approx_kl", "clipfrac", "ratio_mean", "ratio_min", "ratio_max",
               "ratio_first_inner", "ratio_first_inner_max_dev")  # fmt: skip

    def loss(self, embeds, rollouts, rows, step, advantages, weights) -> LossOutput:
        trainer, t = self.trainer, self.trainer.config.training
        current = trainer.sampler.step_log_prob(rollouts, step, embeds, rows, model=trainer.model)
        kl = None
        if t.kl_beta > 0:
            with torch.no_grad(), trainer.reference_weights():
                reference = trainer.sampler.step_log_prob(rollouts, step, embeds, rows)
            kl = kl_to_reference(current.mean, reference.mean, current.sigma_t)
        old = rollouts.log_probs[rows, step]
        return grpo_loss(current.log_prob, old, advantages[rows], t.clip_range, kl, t.kl_beta, weights)

    def record(self, out: LossOutput, metrics, first_inner: bool) -> None:
        super().record(out, metrics, first_inner)
        count = float(out.count)
        if count == 0:
            return
        for key in ("approx_kl", "clipfrac", "ratio_mean"):
            metrics.add(f"policy/{key}", float(getattr(out, key)), count)
        metrics.add_min("policy/ratio_min", out.ratio_min)
        metrics.add_max("policy/ratio_max", out.ratio_max)
        if first_inner:  # before any update the re-scored log-probs must equal the rollout's
            metrics.add("policy/ratio_first_inner", float(out.ratio_mean), count)
            deviation = max(abs(float(out.ratio_min) - 1), abs(float(out.ratio_max) - 1))
            metrics.add_max("policy/ratio_first_inner_max_dev", deviation)
