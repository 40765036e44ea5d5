"""``variance``: the subset of maximal predicted variance survives, exactly (PODS, arXiv 2504.13818)."""

from __future__ import annotations

import numpy as np

from rl.prune_policies import PrunePolicy, register


def max_variance_subset(scores: np.ndarray, count: int) -> np.ndarray:
    """Indices of the ``count`` entries of ``scores`` with the largest population variance, ascending.

    The optimum is the i largest plus the ``count - i`` smallest for some i (PODS, arXiv 2504.13818, Thm 1:
    swapping any middle value for a more extreme one never lowers the variance), so sorting and trying the
    ``count + 1`` splits is exact in O(n log n + count n). Ties between splits go to the smaller i (fewer best).
    """
    if not 0 <= count <= len(scores):
        raise ValueError(f"cannot choose {count} of {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    best, best_variance = order[:0], -1.0
    for top in range(count + 1):
        chosen = np.concatenate([order[:top], order[len(order) - (count - top) :]])
        variance = float(scores[chosen].var()) if count else 0.0
        if variance > best_variance + 1e-9 * abs(best_variance):  # relative: spreads of any scale
            best, best_variance = chosen, variance
    return np.sort(best)


@register("variance")
class MaxVarianceSubset(PrunePolicy):
    def choose(self, rest: np.ndarray, scores: np.ndarray, need: int, rng: np.random.Generator) -> np.ndarray:
        return rest[max_variance_subset(scores[rest], need)]
