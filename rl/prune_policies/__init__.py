"""Pruning policies: which rollouts of a group survive the capture step. Each is one registered unit here.

A policy sees one group's predictions and returns the survivors among the rollouts the exploration slice left
(:func:`rl.pruning.select_survivors` runs it per group, after the slice and group skipping, which every policy
shares). A policy declares whether it reads the predictions (the config then requires a predictor that makes
them) and whether it keeps a fixed count per group (``keep_count(G, r)``: what a funnel and an exploration slice
need). Shipped:

- ``none`` (:mod:`.keep_all`): everyone, exactly the unpruned trainer.
- ``topk``: the ``keep_count(G, r)`` best predicted.
- ``maxvar``: the predicted extremes, alternately best, worst, 2nd best, 2nd worst, ...: GRPO learns from the
  contrast inside a group, which a group of near-equal survivors does not have.
- ``variance``: the subset of maximal predicted variance, exactly (PODS' rule, arXiv 2504.13818). Unlike
  ``maxvar`` it takes an uneven split when the predictions are skewed (one outlier and many alike).
- ``random``: uniformly random survivors (the ablation control: same cost, no predictor).
- ``threshold``: every rollout predicted at least ``prune_threshold`` (reward units), at least two per group
  (fewer has no contrast), the best predicted first; the surviving count varies.

To add one: a file here with a :class:`PrunePolicy` subclass decorated ``@register("name")`` that implements
:meth:`PrunePolicy.choose` (and :meth:`PrunePolicy.count` if its count is not ``keep_count``), and its tests;
every module here is imported, so ``--prune_policy name`` then selects it.
"""

from __future__ import annotations

import math
from typing import ClassVar

import numpy as np

from rl.registry import import_units, registrar

MIN_SURVIVORS = 2  # a group needs two scored rollouts for a nonzero advantage
PRUNE_POLICIES: dict[str, type[PrunePolicy]] = {}


def keep_count(group_size: int, keep_fraction: float) -> int:
    """Survivors per group of the fixed-count policies: ``round(r G)`` (halves up), at least 2, at most G."""
    return min(group_size, max(MIN_SURVIVORS, math.floor(keep_fraction * group_size + 0.5)))


def ranked(members: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """``members`` from best to worst predicted (ties: lower index first)."""
    return members[np.argsort(-scores[members], kind="stable")]


class PrunePolicy:
    """Base of the registered pruning policies (see the module docstring)."""

    name: ClassVar[str]
    prunes: ClassVar[bool] = True  # False: every rollout survives (no slice, no skipping: the unpruned trainer)
    reads_predictions: ClassVar[bool] = True  # False: chooses without the predictor (``random``)
    fixed_count: ClassVar[bool] = True  # True: keeps ``keep_count(G, r)`` per group whatever the predictions

    def __init__(self, keep_fraction: float = 0.5, threshold: float = 0.0) -> None:
        self.keep_fraction = keep_fraction
        self.threshold = threshold

    def count(self, members: np.ndarray, scores: np.ndarray) -> int:
        """Survivors of the group ``members`` (row indices into ``scores``, the batch's predictions)."""
        return keep_count(len(members), self.keep_fraction)

    def choose(self, rest: np.ndarray, scores: np.ndarray, need: int, rng: np.random.Generator) -> np.ndarray:
        """``need`` survivors among ``rest`` (the group's rows the exploration slice did not take)."""
        raise NotImplementedError


register = registrar(PRUNE_POLICIES, "pruning policy")  # @register("name") makes a PrunePolicy selectable


def build_policy(name: str, keep_fraction: float = 0.5, threshold: float = 0.0) -> PrunePolicy:
    """The registered policy ``name``.

    Raises:
        ValueError: an unknown name (the message lists the registered ones) or a keep fraction outside (0, 1].
    """
    if name not in PRUNE_POLICIES:
        raise ValueError(f"prune_policy={name!r} is not one of {tuple(PRUNE_POLICIES)}")
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must lie in (0, 1], got {keep_fraction}")
    return PRUNE_POLICIES[name](keep_fraction, threshold)


import_units(__name__, __path__)  # every module here registers its units
