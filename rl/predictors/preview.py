"""``preview``: Pro-GRPO's proxy (arXiv 2512.15347): the k-th call's x0 prediction, decoded and scored.

The k-th transformer call predicts the clean latents as ``x0 = x - sigma v``; the rollout makes that call on
its way to the capture step anyway, so the preview costs no transformer call, only one decode and one reward
call per rollout. Under the trainer's windowed sampler (SDE on steps 0-2, ODE after) call 4 reads the state
that determines the final image (bench/RESULTS.md, "Predictors").
"""

from __future__ import annotations

import contextlib

import torch

from rl.predictors import Prediction, PredictionCost, PredictionInputs, Predictor, register, reward_scores


class X0Recorder:
    """A step observer keeping the x0 prediction ``x - sigma v`` of one transformer call (0-based ``step``)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.sigma = float("nan")

    def forward_context(self, step: int, rows: torch.Tensor) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def after_forward(
        self, step: int, rows: torch.Tensor, latents: torch.Tensor, velocity: torch.Tensor, sigma: float
    ) -> None:
        if step == self.step:
            self.sigma = float(sigma)
            self.chunks.append((rows.cpu(), latents.float() - float(sigma) * velocity.float()))

    def x0(self) -> torch.Tensor:
        """``[B, S, C]`` in row order."""
        if not self.chunks:
            raise RuntimeError(f"the sampler never ran call {self.step + 1}: advance to at least that step")
        rows = torch.cat([r for r, _ in self.chunks])
        return torch.cat([x for _, x in self.chunks])[torch.argsort(rows)]


@register("preview")
class PreviewPredictor(Predictor):
    scores_with_reward = True

    def __init__(self, capture_step: int) -> None:
        self.call = capture_step

    @classmethod
    def from_config(cls, config, sampler) -> PreviewPredictor:
        return cls(config.pruning.capture_step)

    def observer(self, sampler) -> X0Recorder:
        return X0Recorder(self.call - 1)

    def predict(self, inputs: PredictionInputs) -> Prediction:
        recorder: X0Recorder = inputs.observer
        result = inputs.score_latents(recorder.x0().to(inputs.early.latents.device))
        count = float(len(inputs.early))
        return Prediction(reward_scores(result), PredictionCost(0.0, count, count), recorder.sigma)
