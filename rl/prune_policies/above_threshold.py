"""``threshold``: every rollout predicted at least the cut survives, at least two per group, best first."""

from __future__ import annotations

import numpy as np

from rl.prune_policies import MIN_SURVIVORS, PrunePolicy, ranked, register


@register("threshold")
class Threshold(PrunePolicy):
    fixed_count = False

    def count(self, members: np.ndarray, scores: np.ndarray) -> int:
        return max(min(MIN_SURVIVORS, len(members)), int((scores[members] >= self.threshold).sum()))

    def choose(self, rest: np.ndarray, scores: np.ndarray, need: int, rng: np.random.Generator) -> np.ndarray:
        # the best `need` of the rest are exactly those above the cut, or the top-up to two
        return ranked(rest, scores)[:need]
