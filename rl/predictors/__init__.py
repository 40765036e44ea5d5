"""Predictors of a rollout's final reward, read a few denoising steps in: what pruning selects by.

Every predictor is a registered unit (one file in this package, registered with :func:`register`) behind one
small interface: :meth:`Predictor.observer` hooks the rollout up to the capture step (or returns None),
:meth:`Predictor.predict` turns the rollouts at that step into a ``[B]`` prediction and reports its
:class:`PredictionCost` (extra transformer calls, VAE decodes, reward calls), which the trainer adds to the
run's compute (rl/cost.py). Shipped:

- ``probe``: the CNN on attention maps and x0 features at capture step k (probe/); no reward call.
- ``preview``: the x0 prediction ``x - sigma v`` of the k-th transformer call, decoded and scored by the real
  reward (Pro-GRPO's proxy, arXiv 2512.15347); no extra transformer call. With ``preview_steps`` n > 1 it reaches
  sigma 0 in n Euler steps from that call's input, the first on its own velocity (n - 1 calls).
- ``lookahead``: from the state after step k, ``lookahead_steps`` Euler steps to sigma 0 on the schedule's
  own sigmas, decoded and scored by the real reward.
- ``reward``: every rollout finished, decoded and scored (the oracle; with the ``variance`` policy this is
  PODS, arXiv 2504.13818). Its scores are the real rewards, so the trainer reuses them for the survivors.

To add one: a file here with a :class:`Predictor` subclass decorated ``@register("name")`` whose
``from_config(config, sampler)`` builds it, and its tests (every module here is imported, so it registers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import torch

from rl.distributed import EvenForwards, unsharded_forwards
from rl.registry import import_units, registrar

if TYPE_CHECKING:
    from rewards.compose import RewardResult
    from rl.config import RunConfig
    from rl.sampler import FluxSampler, PromptEmbeddings, Rollouts, StepObserver

PREDICTORS: dict[str, type[Predictor]] = {}


@dataclasses.dataclass
class PredictionCost:
    """What one prediction spent beyond the rollouts' own denoising (rollout counts, summed over the batch)."""

    transformer_calls: float = 0.0
    decodes: float = 0.0
    reward_calls: float = 0.0

    def per_rollout(self, rollouts: int) -> PredictionCost:
        """This cost of ``rollouts`` rollouts, per rollout (every predictor's cost is linear in the rollouts)."""
        return PredictionCost(*(value / rollouts for value in dataclasses.astuple(self)))

    def times(self, rollouts: float) -> PredictionCost:
        """A per-rollout cost for ``rollouts`` rollouts."""
        return PredictionCost(*(value * rollouts for value in dataclasses.astuple(self)))


@dataclasses.dataclass
class PredictionInputs:
    """What a predictor may read: the rollouts at the capture step and the means to decode and score them.

    Attributes:
        sampler: the training sampler (its transformer, schedule and VAE).
        embeds: the step's prompt embeddings (``early.prompt_index`` points into them).
        early: the B rollouts, all at the capture step (``reward``: finished).
        observer: what :meth:`Predictor.observer` returned, having watched the rollout to the capture step.
        score_latents: decodes ``[B, S, C]`` packed latents of the rollouts ``early`` (in order) and scores
            them with the run's reward: returns the reward's :class:`rewards.compose.RewardResult`.
        even_forwards: a predictor's own transformer calls run inside ``even_forwards(count)``: under FSDP and
            ZeRO-3 (every forward a collective) the processes agree on the most any makes before they start
            (``rl.trainer.GRPOTrainer.even_forwards``); nothing elsewhere.
    """

    sampler: FluxSampler
    embeds: PromptEmbeddings
    early: Rollouts
    observer: StepObserver | None
    score_latents: Callable[[torch.Tensor], RewardResult]
    even_forwards: EvenForwards = unsharded_forwards


@dataclasses.dataclass
class Prediction:
    """A predictor's output for B rollouts.

    Attributes:
        scores: ``[B]`` predicted final rewards (higher is better; reward units for all but an uncalibrated probe).
        cost: what predicting cost.
        sigma: the sigma the prediction read (the probe's timestep input; logging).
        features: ``[B, C, h, w]`` probe features (the online refresh trains on them), or None.
        result: the reward's result on the finished rollouts when the scores are the real rewards (``reward``).
        valid: ``[B]`` whether each score is a prediction (False: the reward failed on that rollout's preview, and
            its score is the batch's lowest, so pruning ranks it last); None: all are.
    """

    scores: torch.Tensor
    cost: PredictionCost
    sigma: float
    features: torch.Tensor | None = None
    result: RewardResult | None = None
    valid: torch.Tensor | None = None

    def known_scores(self) -> torch.Tensor:
        """``scores`` with NaN where there is no prediction (what ranks a failed preview below every real one)."""
        if self.valid is None:
            return self.scores
        return torch.where(self.valid.to(self.scores.device), self.scores, torch.full_like(self.scores, math.nan))


class Predictor:
    """Base of the registered predictors (see the module docstring)."""

    name: ClassVar[str]
    finishes_rollouts: ClassVar[bool] = False  # True: predicts from finished rollouts (no denoising saved)
    scores_with_reward: ClassVar[bool] = False  # True: calls the real reward (inference must be given one)

    @classmethod
    def from_config(cls, config: RunConfig, sampler: FluxSampler) -> Predictor:
        return cls()

    def capture_step(self, config: RunConfig) -> int:
        """The step the rollouts stop at before :meth:`predict` (T for predictors that finish them)."""
        return config.sampling.num_steps if self.finishes_rollouts else config.pruning.capture_step

    def observer(self, sampler: FluxSampler) -> StepObserver | None:
        """A fresh observer for one rollout to the capture step, or None."""
        return None

    @property
    def cost_per_rollout(self) -> PredictionCost:
        """What one rollout's prediction costs beyond its own denoising (known before predicting: benchmarks price
        recorded predictions with it)."""
        return PredictionCost()

    def predict(self, inputs: PredictionInputs) -> Prediction:
        raise NotImplementedError


register = registrar(PREDICTORS, "predictor")  # @register("name") makes a Predictor subclass selectable


def build_predictor(config: RunConfig, sampler: FluxSampler) -> Predictor:
    """The configured predictor (``pruning.predictor``) for ``sampler``."""
    name = config.pruning.predictor
    if name not in PREDICTORS:
        raise ValueError(f"predictor={name!r} is not one of {sorted(PREDICTORS)}")
    return PREDICTORS[name].from_config(config, sampler)


def scored_rows(result: RewardResult) -> torch.Tensor:
    """``[B]`` whether the reward scored each rollout (valid and finite)."""
    return result.valid.bool() & torch.isfinite(result.total.float())


def known_rewards(result: RewardResult) -> torch.Tensor:
    """``[B]`` reward totals, NaN where the reward could not score."""
    total = result.total.float()
    return torch.where(scored_rows(result), total, torch.full_like(total, math.nan))


def reward_scores(result: RewardResult) -> torch.Tensor:
    """``[B]`` reward totals as predictions; rollouts the reward could not score rank last (the batch minimum)."""
    total, valid = result.total.float(), scored_rows(result)
    floor = float(total[valid].min()) if valid.any() else 0.0
    return torch.where(valid, total, torch.full_like(total, floor))


import_units(__name__, __path__)  # every module here registers its units
