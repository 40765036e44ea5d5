"""Probe quality, across prompts and within prompt groups (docs/design.md section 4).

Global (all rollouts pooled):
- ``pcc``: Pearson correlation of prediction and real reward.
- ``srcc``: Spearman rank correlation (average ranks for ties).
- ``auc``: AUC-ROC of the prediction for the label "real reward strictly above the median real reward of the
  evaluated set" (ties in the prediction count one half).

Within groups (rollouts of one prompt, different noise: what GRPO pruning needs):
- ``within_group_srcc``: mean over groups of the Spearman correlation inside the group.
- ``top_half_recall``: of the group's true top half (the ``G // 2`` best real rewards), the fraction the probe
  also puts in its top half. Ties in the real reward are resolved at random and averaged over, so a rollout
  tied at the boundary counts by its chance of belonging to the top half.
- ``regret``: best real reward of the group minus the best real reward among the probe's top half (0 is
  perfect); ``regret_random`` is the same expected for a uniformly random half, for scale.

Groups whose real rewards are all equal have nothing to rank: they are left out of ``within_group_srcc`` and
``top_half_recall`` (their count is reported as ``constant_groups``) but kept in ``regret`` (where they give 0).
Ties in the prediction are broken at random too (a constant probe scores as a random pick, whatever the rows'
order), and a group with a non-finite prediction makes the within-group metrics NaN: a diverged probe has no
score, not a neutral one.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats


def _numpy(x: torch.Tensor | np.ndarray) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def pearson(prediction, target) -> float:
    p, t = _numpy(prediction), _numpy(target)
    if p.std() == 0 or t.std() == 0:
        return float("nan")
    return float(np.corrcoef(p, t)[0, 1])


def spearman(prediction, target) -> float:
    p, t = _numpy(prediction), _numpy(target)
    if len(p) < 2 or np.all(p == p[0]) or np.all(t == t[0]):
        return float("nan")
    return pearson(stats.rankdata(p), stats.rankdata(t))


def auc_roc(prediction, label) -> float:
    """Probability that a random positive outranks a random negative (ties count 1/2); nan with one class."""
    p, y = _numpy(prediction), _numpy(label).astype(bool)
    positives, negatives = y.sum(), (~y).sum()
    if positives == 0 or negatives == 0:
        return float("nan")
    ranks = stats.rankdata(p)
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def top_half_membership(reward: np.ndarray, keep: int) -> np.ndarray:
    """Per rollout, the probability of being among the ``keep`` best when reward ties break at random."""
    membership = np.zeros(len(reward))
    order = np.sort(reward)[::-1]
    cutoff = order[keep - 1]
    above = reward > cutoff
    membership[above] = 1.0
    tied = reward == cutoff
    membership[tied] = (keep - above.sum()) / tied.sum()
    return membership


def expected_best_of_random_subset(reward: np.ndarray, keep: int) -> float:
    """E[max reward of a uniformly random ``keep``-subset]: the j-th best is the max with prob C(G-j, keep-1)/C(G, keep)."""
    ordered = np.sort(reward)[::-1]
    size = len(reward)
    total = math.comb(size, keep)
    return float(sum(ordered[j - 1] * math.comb(size - j, keep - 1) for j in range(1, size - keep + 2)) / total)


def expected_best_of_picks(prediction: np.ndarray, reward: np.ndarray, keep: int) -> float:
    """E[max reward of the ``keep`` best predicted], ties in the prediction broken uniformly at random."""
    cutoff = np.sort(prediction)[::-1][keep - 1]
    above, tied = reward[prediction > cutoff], reward[prediction == cutoff]
    best_above = above.max() if len(above) else -math.inf
    need = keep - len(above)
    ordered = np.sort(tied)[::-1]
    total = math.comb(len(tied), need)
    return float(sum(max(best_above, ordered[j - 1]) * math.comb(len(tied) - j, need - 1)
                     for j in range(1, len(tied) - need + 2)) / total)  # fmt: skip


# the metrics that can pick a probe's checkpoint, and which way is better (+1: higher, -1: lower)
SELECTABLE_METRICS = {"pcc": 1, "srcc": 1, "auc": 1, "within_group_srcc": 1, "top_half_recall": 1, "regret": -1}


def probe_metrics(prediction, reward, group) -> dict[str, float]:
    """Every metric of the module docstring for one evaluation set.

    Args:
        prediction: ``[N]`` probe predictions.
        reward: ``[N]`` real final rewards.
        group: ``[N]`` group ids (one per prompt draw; groups of size < 2 are ignored by group metrics).

    Returns:
        ``pcc, srcc, auc, within_group_srcc, top_half_recall, regret, regret_random, groups, constant_groups,
        n, median`` (``median``: the AUC label's threshold).
    """
    p, r, g = _numpy(prediction), _numpy(reward), _numpy(group)
    median = float(np.median(r))
    result = {
        "pcc": pearson(p, r),
        "srcc": spearman(p, r),
        "auc": auc_roc(p, r > median),
        "median": median,
        "n": float(len(r)),
    }
    srccs, recalls, regrets, regrets_random = [], [], [], []
    constant = 0
    for gid in np.unique(g):
        members = g == gid
        gp, gr = p[members], r[members]
        if len(gr) < 2:
            continue
        keep = len(gr) // 2
        if not np.isfinite(gp).all():  # a diverged probe: no score, not a neutral one
            regrets.append(math.nan)
            regrets_random.append(gr.max() - expected_best_of_random_subset(gr, keep))
            srccs.append(math.nan)
            recalls.append(math.nan)
            continue
        regrets.append(gr.max() - expected_best_of_picks(gp, gr, keep))
        regrets_random.append(gr.max() - expected_best_of_random_subset(gr, keep))
        if np.all(gr == gr[0]):
            constant += 1
            continue
        srcc = spearman(gp, gr)
        srccs.append(0.0 if math.isnan(srcc) else srcc)  # a constant prediction ranks nothing
        # ties in the prediction are broken at random: the expected share of the true top half picked
        recalls.append(float(top_half_membership(gp, keep) @ top_half_membership(gr, keep)) / keep)
    result.update(
        within_group_srcc=float(np.mean(srccs)) if srccs else float("nan"),
        top_half_recall=float(np.mean(recalls)) if recalls else float("nan"),
        regret=float(np.mean(regrets)) if regrets else float("nan"),
        regret_random=float(np.mean(regrets_random)) if regrets_random else float("nan"),
        groups=float(len(regrets)),
        constant_groups=float(constant),
    )
    return result
