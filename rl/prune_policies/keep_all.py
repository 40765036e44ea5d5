"""``none``: every rollout survives; :func:`rl.pruning.select_survivors` then trains exactly the unpruned group."""

from __future__ import annotations

import numpy as np

from rl.prune_policies import PrunePolicy, register


@register("none")
class KeepAll(PrunePolicy):
    prunes = False
    reads_predictions = False
    fixed_count = False

    def count(self, members: np.ndarray, scores: np.ndarray) -> int:
        return len(members)

    def choose(self, rest: np.ndarray, scores: np.ndarray, need: int, rng: np.random.Generator) -> np.ndarray:
        return rest
