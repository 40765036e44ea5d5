"""``random``: uniformly random survivors, the ablation's control (the same cost as a policy, no predictor)."""

from __future__ import annotations

import numpy as np

from rl.prune_policies import PrunePolicy, register


@register("random")
class RandomPick(PrunePolicy):
    reads_predictions = False

    def choose(self, rest: np.ndarray, scores: np.ndarray, need: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(rest, size=need, replace=False)
