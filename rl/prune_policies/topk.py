"""``topk``: the best predicted survive."""

from __future__ import annotations

import numpy as np

from rl.prune_policies import PrunePolicy, ranked, register


@register("topk")
class TopK(PrunePolicy):
    def choose(self, rest: np.ndarray, scores: np.ndarray, need: int, rng: np.random.Generator) -> np.ndarray:
        return ranked(rest, scores)[:need]
