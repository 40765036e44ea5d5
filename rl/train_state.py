"""A run's progress counters and whether they have spent its budget (steps, denoised images, FLUX compute)."""

from __future__ import annotations

import dataclasses

from rl.config import RunConfig
from rl.cost import ComputeCounts, flux_equivalent


@dataclasses.dataclass
class TrainState:
    """Progress counters: with the EMA, everything resume needs besides accelerate's own state.

    Prompts and rollout noise are pure functions of ``(seed, step)`` (with prompt skipping, also of the flat-prompt
    history, which the checkpoint keeps), so ``step`` is the data position too.
    """

    step: int = 0
    images_seen: int = 0
    optimizer_steps: int = 0
    images_denoised: float = 0.0  # full-image equivalents: a rollout stopped at step k of T counts k / T
    # operation counts over every process (rl/cost.py prices them in FLUX.1-dev transformer forwards)
    transformer_calls: float = 0.0
    train_passes: float = 0.0
    decodes: float = 0.0
    reward_calls: float = 0.0
    nonfinite_steps: int = 0  # steps in a row whose every update was skipped for a NaN/inf gradient

    @property
    def compute(self) -> ComputeCounts:
        return ComputeCounts(self.transformer_calls, self.train_passes, self.decodes, self.reward_calls)


def budget_spent(config: RunConfig, state: TrainState) -> bool:
    """Whether the run has spent its steps, denoised images or FLUX.1-dev compute (the wall-clock is separate)."""
    images, compute = config.pruning.max_images_denoised, config.training.max_flux_compute
    out_of_images = images > 0 and state.images_denoised >= images
    out_of_compute = compute > 0 and flux_equivalent(state.compute) >= compute
    return state.step >= config.training.max_steps or out_of_images or out_of_compute
