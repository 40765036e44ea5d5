"""``awm``: advantage-weighted matching (Xue et al. 2025): the flow-matching error of each finished image,
noised afresh to the trained steps' sigmas, through the concave -e^p / p, weighted by the group advantage.

No ratio and no clip, so the PPO diagnostics do not exist here and are not logged.
"""

from __future__ import annotations

import torch

from rl.loss import LossOutput, awm_loss
from rl.objectives import Needs, Objective, register
from rl.sde import kl_to_reference, matching_log_prob


@register("awm")
class AWM(Objective):
    needs = Needs(sde_noise=False, transitions=False, finished_images=True)
    metrics = ("loss", "policy_loss", "kl_ref", "matching_error")

    def loss(self, embeds, rollouts, rows, step, advantages, weights) -> LossOutput:
        trainer, t = self.trainer, self.trainer.config.training
        error, velocity = trainer.sampler.matching_error(rollouts, step, embeds, rows, model=trainer.model)
        count = float(weights.sum())
        if count > 0:
            trainer.metrics.add("policy/matching_error", float((error.detach() * weights).sum()) / count, count)
        kl = None
        if t.kl_beta > 0:  # in velocity space: KL of unit-variance Gaussians around the two predictions
            with torch.no_grad(), trainer.reference_weights():
                _, reference = trainer.sampler.matching_error(rollouts, step, embeds, rows)
            kl = kl_to_reference(velocity, reference, torch.ones(()))
        log_prob = matching_log_prob(error, t.awm_error_power)
        return awm_loss(log_prob, advantages[rows], kl, t.kl_beta, weights)
