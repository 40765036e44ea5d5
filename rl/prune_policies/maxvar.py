"""``maxvar``: the predicted extremes survive, alternately best, worst, 2nd best, 2nd worst, ..."""

from __future__ import annotations

import numpy as np

from rl.prune_policies import PrunePolicy, ranked, register


def alternate_extremes(best_first: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` of best, worst, 2nd best, 2nd worst, ... of a best-first ranking."""
    order = [best_first[i // 2] if i % 2 == 0 else best_first[-1 - i // 2] for i in range(len(best_first))]
    return np.asarray(order[:count], dtype=best_first.dtype)


@register("maxvar")
class MaxVar(PrunePolicy):
    def choose(self, rest: np.ndarray, scores: np.ndarray, need: int, rng: np.random.Generator) -> np.ndarray:
        return alternate_extremes(ranked(rest, scores), need)
