"""``lookahead``: from the state after step k, a few Euler steps to sigma 0, decoded and scored.

The steps land on the schedule's own sigmas (indices spread evenly from k to T), so each call uses a timestep
the model was sampled at. One step is the preview of call k + 1; two read the final image better (within-group
Spearman 0.77 from the state after step 3 against 0.57 for the call-4 preview on the shipped model:
bench/RESULTS.md, "Predictors").
"""

from __future__ import annotations

import numpy as np
import torch

from rl.distributed import EvenForwards, unsharded_forwards
from rl.predictors import Prediction, PredictionCost, PredictionInputs, Predictor, register, reward_scores, scored_rows


def lookahead_indices(capture_step: int, num_steps: int, steps: int) -> list[int]:
    """Schedule indices ``[k, ..., T]`` of an n-step Euler jump from step k to sigma 0 (distinct, increasing)."""
    if steps < 1 or capture_step >= num_steps:
        raise ValueError(f"a lookahead needs >= 1 step and capture_step < T, got {steps}, {capture_step}/{num_steps}")
    steps = min(steps, num_steps - capture_step)
    return sorted({int(round(i)) for i in np.linspace(capture_step, num_steps, steps + 1)})


@torch.no_grad()
def euler_to_clean(
    sampler,
    latents: torch.Tensor,
    embeds,
    prompt_index: torch.Tensor,
    indices: list[int],
    even_forwards: EvenForwards = unsharded_forwards,
):
    """Deterministic Euler steps ``x += (sigma_j - sigma_i) v(x, t_i)`` over consecutive ``indices``, its
    transformer calls run inside ``even_forwards(count)`` (``PredictionInputs.even_forwards``)."""
    sigmas = sampler.sigmas.to(latents.device)
    x = latents
    with even_forwards(sampler.calls(len(x), len(indices) - 1)):
        for i, j in zip(indices[:-1], indices[1:]):
            chunks = []
            for rows in torch.arange(len(x), device=x.device).split(sampler.batch_size):
                v = sampler.velocity(x[rows], i, embeds, prompt_index[rows])
                chunks.append(x[rows].float() + (sigmas[j] - sigmas[i]) * v.float())
            x = torch.cat(chunks).to(latents.dtype)
    return x


@register("lookahead")
class LookaheadPredictor(Predictor):
    scores_with_reward = True

    def __init__(self, capture_step: int, num_steps: int, steps: int) -> None:
        self.indices = lookahead_indices(capture_step, num_steps, steps)

    @classmethod
    def from_config(cls, config, sampler) -> LookaheadPredictor:
        p = config.pruning
        return cls(p.capture_step, sampler.num_steps, p.lookahead_steps)

    @property
    def cost_per_rollout(self) -> PredictionCost:
        return PredictionCost(len(self.indices) - 1, 1.0, 1.0)  # an Euler step per call, one decode, one score

    def predict(self, inputs: PredictionInputs) -> Prediction:
        early = inputs.early
        clean = euler_to_clean(
            inputs.sampler, early.latents, inputs.embeds, early.prompt_index, self.indices, inputs.even_forwards
        )
        result = inputs.score_latents(clean)
        cost = self.cost_per_rollout.times(len(early))
        sigma = float(inputs.sampler.sigmas[self.indices[0]])
        return Prediction(reward_scores(result), cost, sigma, valid=scored_rows(result))
