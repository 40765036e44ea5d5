"""``preview``: Pro-GRPO's proxy (arXiv 2512.15347): the k-th call's x0 prediction, decoded and scored.

The k-th transformer call predicts the clean latents as ``x0 = x - sigma v``; the rollout makes that call on
its way to the capture step anyway, so the preview costs no transformer call, only one decode and one reward
call per rollout. Under the trainer's windowed sampler (SDE on steps 0-2, ODE after) call 4 reads the state
that determines the final image (bench/RESULTS.md, "Predictors").

With ``preview_steps`` n > 1 the preview reaches sigma 0 in n Euler steps on the schedule's own sigmas, the
first one with call k's own velocity: it reads what ``lookahead`` with n steps from the state after step k - 1
reads (the same up to precision: the trainer makes call k under its autocast, the further calls outside it, as
the lookahead makes all of its), for n - 1 transformer calls instead of n, and the rollout has moved one step on.
"""

from __future__ import annotations

import contextlib

import torch

from rl.predictors import Prediction, PredictionCost, PredictionInputs, Predictor, register, reward_scores, scored_rows
from rl.predictors.lookahead import euler_to_clean, lookahead_indices


class X0Recorder:
    """A step observer keeping the input and velocity of one transformer call (0-based ``step``): its x0
    prediction ``x - sigma v``, or the start of a longer Euler path."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.chunks: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.sigma = float("nan")

    def forward_context(self, step: int, rows: torch.Tensor) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def after_forward(
        self, step: int, rows: torch.Tensor, latents: torch.Tensor, velocity: torch.Tensor, sigma: float
    ) -> None:
        if step == self.step:
            self.sigma = float(sigma)
            self.chunks.append((rows.cpu(), latents.detach(), velocity.detach()))

    def call(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The call's input latents and velocity, ``[B, S, C]`` each, in row order."""
        if not self.chunks:
            raise RuntimeError(f"the sampler never ran call {self.step + 1}: advance to at least that step")
        order = torch.argsort(torch.cat([rows for rows, _, _ in self.chunks]))
        latents = torch.cat([x for _, x, _ in self.chunks])
        velocity = torch.cat([v.to(latents.device) for _, _, v in self.chunks])
        return latents[order.to(latents.device)], velocity[order.to(latents.device)]

    def x0(self) -> torch.Tensor:
        """``[B, S, C]`` the call's x0 prediction ``x - sigma v`` (float32), in row order."""
        latents, velocity = self.call()
        return latents.float() - self.sigma * velocity.float()


@register("preview")
class PreviewPredictor(Predictor):
    scores_with_reward = True

    def __init__(self, capture_step: int, steps: int = 1, num_steps: int = 0) -> None:
        self.call = capture_step
        self.indices = lookahead_indices(capture_step - 1, num_steps, steps) if steps > 1 else []

    @classmethod
    def from_config(cls, config, sampler) -> PreviewPredictor:
        return cls(config.pruning.capture_step, config.pruning.preview_steps, sampler.num_steps)

    @property
    def cost_per_rollout(self) -> PredictionCost:
        # one decode and one score; a longer preview's first Euler step reuses call k's velocity
        return PredictionCost(max(len(self.indices) - 2, 0), 1.0, 1.0)

    def observer(self, sampler) -> X0Recorder:
        return X0Recorder(self.call - 1)

    def predict(self, inputs: PredictionInputs) -> Prediction:
        recorder: X0Recorder = inputs.observer
        early, device = inputs.early, inputs.early.latents.device
        if not self.indices:
            clean = recorder.x0().to(device)
        else:  # the first Euler step reuses call k's velocity; the rest are transformer calls
            latents, velocity = recorder.call()
            sigmas = inputs.sampler.sigmas.to(device)
            first, second = self.indices[:2]
            x = latents.to(device).float() + (sigmas[second] - sigmas[first]) * velocity.to(device).float()
            clean = euler_to_clean(inputs.sampler, x.to(latents.dtype), inputs.embeds, early.prompt_index,
                                   self.indices[1:], inputs.even_forwards)  # fmt: skip
        result = inputs.score_latents(clean)
        cost = self.cost_per_rollout.times(len(early))
        return Prediction(reward_scores(result), cost, recorder.sigma, valid=scored_rows(result))
