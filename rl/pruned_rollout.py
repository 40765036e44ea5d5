"""The pruned rollout phase of GRPO and the online probe refresh (docs/design.md, "Pruning").

Per GRPO step, in place of the trainer's ``rollout -> score -> advantages``::

    m G rollouts per prompt to capture step k (the predictor observing)     runner.rollout(until_step=k)
      -> predictor: [B] predicted final rewards and their cost              phase "predict" (rl/predictors/)
      -> survivors: rl.pruning.select_survivors (policy, exploration slice, group skipping)
      -> survivors only continue to step T (re-batched, same noise as unpruned: rl/sampler.py), in chunks of
         whole groups, each decoded and scored by the real reward while the next denoises  runner.finish_and_score
      -> advantages ("survivors" or "imputed")                              rl.pruning.pruned_advantages
      -> prune_train_early: pruned rollouts join the trained set for their steps < k (imputed advantages)
      -> what selection bought (survivors' real reward spread), the probe's online quality
    once every process agrees the step stands (no reward failed anywhere)   commit
      -> the survivors join the probe's buffer; every probe_refresh_every steps the probe is fine-tuned on it
                                                                            phase "probe_refresh"

m is ``prune_expand`` (expand-and-prune, Pro-GRPO); the ``reward`` predictor finishes every rollout (k = T) and
its rewards are the survivors' (PODS). With ``prune_policy: none`` every rollout survives and the step is
bit-identical to the unpruned trainer's (the sampler's noise is per rollout and the capture processors return
the default ones' outputs).

The phase takes its collaborators explicitly: a :class:`RolloutRunner` (the trainer implements it) for
sampling, scoring and counting, and a :class:`rl.predictors.Predictor`.

The online figures ``probe/pcc_online`` and ``probe/within_group_srcc_online`` compare predictions made
before the probe saw the batch with its real rewards (survivors only: pruned rollouts have no real reward;
selection truncates the survivors' range, so these read lower than on unpruned data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Protocol

import torch
from accelerate.utils import gather_object

from probe import FitConfig, Probe, ProbeDataset, fit, probe_metrics
from probe.model import group_mean
from rewards.compose import RewardResult
from rl.advantages import group_std
from rl.batches import PromptBatch, ScoredRollouts
from rl.config import RunConfig
from rl.metrics_log import MetricsAccumulator
from rl.predictors import Prediction, PredictionCost, PredictionInputs, Predictor, build_predictor
from rl.predictors.probe_cnn import ProbePredictor
from rl.prune_policies import PRUNE_POLICIES
from rl.pruning import Selection, calibrate, impute_rewards, pruned_advantages, select_survivors
from rl.sampler import FluxSampler, Rollouts, StepObserver


class RolloutRunner(Protocol):
    """What the pruned phase needs from the trainer (``rl.trainer.GRPOTrainer`` implements it)."""

    sampler: FluxSampler
    metrics: MetricsAccumulator

    @property
    def step(self) -> int: ...

    def phase(self, name: str) -> contextlib.AbstractContextManager: ...

    def rollout(
        self, batch: PromptBatch, until_step: int | None = None, observer: StepObserver | None = None
    ) -> Rollouts: ...

    def continue_rollouts(
        self,
        batch: PromptBatch,
        rollouts: Rollouts,
        until_step: int | None = None,
        observer: StepObserver | None = None,
    ) -> Rollouts: ...

    def judge(self, batch: PromptBatch, prompt_index: torch.Tensor, latents: torch.Tensor) -> RewardResult: ...

    def finish_and_score(
        self, batch: PromptBatch, rollouts: Rollouts, result: RewardResult | None = None
    ) -> ScoredRollouts: ...

    def advantages(self, scored: ScoredRollouts) -> torch.Tensor: ...

    def add_prediction_cost(self, cost: PredictionCost) -> None: ...

    def even_forwards(self, forwards: int) -> contextlib.AbstractContextManager: ...


class ProbeBuffer:
    """First-in first-out store of (features, real reward, group) for the online refresh; checkpointable.

    Features and their whole-group means are kept in fp16 (``2 C h w`` x 2 bytes per rollout: 16 KiB on the tiny
    model, ~2 MiB for FLUX at 1024 px with the combined feature set, so size ``probe_buffer_size`` accordingly).

    Args:
        capacity: most rollouts held; the oldest leave first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: ProbeDataset | None = None

    def __len__(self) -> int:
        return 0 if self.data is None else len(self.data)

    def add(self, batch: ProbeDataset) -> None:
        """Append ``batch`` (without whole-group means, its rows' own stand in), dropping the oldest past capacity."""
        means = own_group_means(batch) if batch.group_means is None else batch.group_means
        batch = dataclasses.replace(batch, features=batch.features.half(), group_means=means.half())
        data = batch if self.data is None else ProbeDataset.concatenate([self.data, batch])
        self.data = data.subset(torch.arange(max(0, len(data) - self.capacity), len(data)))

    def dataset(self) -> ProbeDataset:
        """The buffer with fp32 features (what :func:`probe.fit` trains on)."""
        if self.data is None:
            raise RuntimeError("the probe buffer is empty")
        means = None if self.data.group_means is None else self.data.group_means.float()
        return dataclasses.replace(self.data, features=self.data.features.float(), group_means=means)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "data": None if self.data is None else dataclasses.asdict(self.data)}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self.data = None if state["data"] is None else ProbeDataset(**state["data"])
        if self.data is not None and self.data.group_means is None:  # a checkpoint from before the whole-group means
            self.data = dataclasses.replace(self.data, group_means=own_group_means(self.data).half())


def own_group_means(data: ProbeDataset) -> torch.Tensor:
    """Each row's feature mean over the rows of its group in ``data`` (all there is when the whole group's is lost)."""
    return group_mean(data.features.float(), data.group)


@dataclasses.dataclass
class PrunedStep:
    """What the pruned phase decided for B started rollouts (kept for logging, tests and benchmarks).

    Attributes:
        predicted: ``[B]`` predictions (zeros when the policy reads none: the ``random`` control).
        group_ids: ``[B]`` group of each rollout in the step's global batch.
        selection: survivors, exploration slice and skipped groups.
        features: ``[B, C, h, w]`` probe features, or None for the other predictors.
        sigma: the sigma the prediction read (the probe's timestep input).
        cost: what predicting cost beyond the rollouts' own denoising.
    """

    predicted: torch.Tensor
    group_ids: torch.Tensor
    selection: Selection
    features: torch.Tensor | None
    sigma: float
    cost: PredictionCost


def result_subset(result: RewardResult, rows: torch.Tensor) -> RewardResult:
    """The reward's result for ``rows`` of the scored batch (dropped-group counts and failures kept)."""
    rows = rows.to(result.total.device)
    components = {key: values[rows] for key, values in result.components.items()}
    return dataclasses.replace(result, total=result.total[rows], components=components, valid=result.valid[rows])


def stage_config(config: RunConfig, step: int) -> RunConfig:
    """The run's config as one stage of a funnel sees it: a single prune at ``step`` (builds its predictor)."""
    pruning = dataclasses.replace(config.pruning, capture_step=step, prune_funnel="")
    return dataclasses.replace(config, pruning=pruning)


def funnel_step(stages: list[PrunedStep]) -> PrunedStep:
    """The stages of a funnel as one :class:`PrunedStep` over the started rollouts.

    Predictions are the first stage's (every started rollout has one), survivors are the last stage's, skipping
    is any stage's, and the cost is the sum. Exploration is every stage's: a row in each stage's random slice, a
    random subset of the started rows (one in a later slice only was first picked by the earlier policy, so its
    rewards would not be the unselected baseline that ``prune/explore_reward_std`` is).
    """
    first = stages[0]
    size = len(first.predicted)
    keep, skipped = (torch.zeros(size, dtype=torch.bool) for _ in range(2))
    explore = torch.ones(size, dtype=torch.bool)
    rows = torch.arange(size)
    for stage in stages:
        explored = torch.zeros(size, dtype=torch.bool)
        explored[rows[stage.selection.explore]] = True
        explore &= explored
        skipped[rows[stage.selection.skipped]] = True
        rows = rows[stage.selection.survivors]
    keep[rows] = True
    cost = PredictionCost(*(sum(getattr(s.cost, f.name) for s in stages) for f in dataclasses.fields(PredictionCost)))
    return PrunedStep(
        first.predicted, first.group_ids, Selection(keep, explore & keep, skipped), None, stages[-1].sigma, cost
    )


class PrunedRollout:
    """The trainer's rollout phase with pruning; the trainer calls :meth:`sample_and_score` once per step, then
    :meth:`commit` once the step stands.

    Args:
        config: the run's config (its ``pruning`` section drives everything here).
        predictor: what the policy selects by (rl/predictors/).
        accelerator: the run's accelerator, whose processes counts and the buffer are reduced over (None: one).
    """

    def __init__(self, config: RunConfig, predictors: list[Predictor], accelerator=None) -> None:
        self.config = config
        self.accelerator = accelerator
        self.pruning = p = config.pruning
        stages = config.pruning_stages
        if len(predictors) != len(stages):
            raise ValueError(f"{len(stages)} pruning stages need as many predictors, got {len(predictors)}")
        self.predictor = predictors[0]  # the probe (single stage only) the refresh trains and checkpoints keep
        # the random control reads no prediction and pays no predictor's cost; a probe, which costs almost
        # nothing, always predicts (its online quality is logged and its buffer filled under every policy)
        reads = (
            PRUNE_POLICIES[p.prune_policy].reads_predictions or p.prune_advantage == "imputed" or p.prune_min_spread > 0
        )
        self.predicting = type(self.predictor) is not Predictor and (
            reads or isinstance(self.predictor, ProbePredictor)
        )
        # (step the rollouts stop at, fraction of the running ones that survive, predictor) per stage
        self.stages = [
            (predictor.capture_step(stage_config(config, k)) if self.predicting else k, r, predictor)
            for (k, r), predictor in zip(stages, predictors)
        ]
        self.buffer = ProbeBuffer(p.probe_buffer_size)
        self.pending: ProbeDataset | None = None  # the step's survivors, until the step is committed
        self.last: PrunedStep | None = None
        self.stage_steps: list[PrunedStep] = []

    @property
    def probe(self) -> Probe | None:
        """The probe the ``probe`` predictor reads (and the online refresh trains), else None."""
        return self.predictor.probe if isinstance(self.predictor, ProbePredictor) else None

    @classmethod
    def from_config(cls, config: RunConfig, sampler: FluxSampler, accelerator) -> PrunedRollout | None:
        """The pruned phase of a run, or None when it trains unpruned (policy ``none`` without a probe).

        Raises:
            FileNotFoundError, probe.ProbeMismatchError: a missing probe file, or one for another model, step or
                sampler.
        """
        p = config.pruning
        if p.prune_policy == "none" and not p.probe_path:
            return None
        predictors = []
        for step, _ in config.pruning_stages:
            if p.predictor == "probe" and not p.probe_path:  # random / none without a probe: nothing to predict with
                predictor = Predictor()
            else:
                predictor = build_predictor(stage_config(config, step), sampler)
            if isinstance(predictor, ProbePredictor):
                predictor.probe = predictor.probe.to(accelerator.device)
            predictors.append(predictor)
        return cls(config, predictors, accelerator)

    # ------------------------------------------------------------------ the phase

    def sample_and_score(self, runner: RolloutRunner, batch: PromptBatch) -> tuple[ScoredRollouts, torch.Tensor]:
        """Sample to k, predict, prune, finish and score the survivors; returns them and their advantages ``[B']``."""
        p, sampler = self.pruning, runner.sampler
        rollouts, self.stage_steps = None, []
        for index, (k, fraction, predictor) in enumerate(self.stages):
            observer = predictor.observer(sampler) if self.predicting else None
            if rollouts is None:
                rollouts = early = runner.rollout(batch, until_step=k, observer=observer)
            else:
                rollouts = runner.continue_rollouts(batch, rollouts, until_step=k, observer=observer)
            group_ids = batch.group_ids[rollouts.prompt_index.cpu()]
            with runner.phase("predict"):
                if self.predicting:
                    judge = lambda latents, at=rollouts: runner.judge(batch, at.prompt_index, latents)  # noqa: E731
                    inputs = PredictionInputs(sampler, batch.embeds, rollouts, observer, judge, runner.even_forwards)
                    prediction = predictor.predict(inputs)
                else:
                    prediction = Prediction(torch.zeros(len(rollouts)), PredictionCost(), float(sampler.sigmas[k - 1]))
                runner.add_prediction_cost(prediction.cost)
                scores = prediction.scores.cpu().float()
                # the 1: NumPy pads seed lists with zeros, so [seed, step, 4, index] would be the micro-batch order
                # of inner epoch 4 ([seed, step, 4, 2]) at the funnel's third stage
                seed = [self.config.training.seed, runner.step, 4, 1, index]
                selection = select_survivors(
                    scores, group_ids, p.prune_policy, fraction, p.prune_explore, p.prune_threshold,
                    p.prune_min_spread, seed,
                )  # fmt: skip
            self.stage_steps.append(
                PrunedStep(scores, group_ids, selection, prediction.features, prediction.sigma, prediction.cost)
            )
            rollouts = rollouts.select(selection.survivors)
        self.last = self.stage_steps[0] if len(self.stage_steps) == 1 else funnel_step(self.stage_steps)
        selection = self.last.selection
        known = None if prediction.result is None else result_subset(prediction.result, selection.survivors)
        scored = runner.finish_and_score(batch, rollouts, known)  # re-batched, order kept, scored beside sampling
        if p.prune_advantage == "survivors":
            advantages = runner.advantages(scored)
        else:
            every, imputed = self.imputed_advantages(runner, scored)
            advantages = every[selection.survivors]
        self.record(runner, scored, len(early))
        if p.prune_train_early:  # the config requires prune_advantage: imputed
            pruned = torch.nonzero(imputed & ~selection.keep).flatten()
            return self.with_early_steps(scored, advantages, early, pruned, every, sampler.num_steps)
        return scored, advantages

    def imputed_advantages(self, runner: RolloutRunner, scored: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` advantages of every rollout, pruned ones imputed from calibrated predictions, and ``[B]`` bool
        of the rollouts that have one.

        Groups the reward's failure policy dropped (any invalid survivor) and skipped groups take no part (0).
        """
        t, step = self.config.training, self.last
        survivors = step.selection.survivors
        rewards = torch.full((len(step.predicted),), math.nan)
        rewards[survivors] = scored.rewards.float()
        dropped = torch.isin(step.group_ids, scored.group_ids[~scored.valid])
        rows = ~step.selection.skipped & ~dropped
        keep, groups, predicted = step.selection.keep[rows], step.group_ids[rows], step.predicted[rows]
        slope = calibrate(predicted[keep], rewards[rows][keep], groups[keep]) if keep.any() else 0.0
        batch_std = None
        if t.adv_std == "batch":  # over every process's (real and imputed) rewards, from sums and counts
            full = impute_rewards(rewards[rows], predicted, keep, groups, slope)
            batch_std = self.global_std(full)
        advantages = torch.zeros(len(step.predicted))
        if rows.any():
            advantages[rows] = pruned_advantages(
                rewards[rows], predicted, keep, groups, "imputed", t.adv_std, t.adv_clip_max, batch_std, slope
            )
        runner.metrics.add("prune/calibration_slope", slope)
        survivor_advantages = advantages[survivors]
        valid = survivor_advantages[scored.valid]
        runner.metrics.add("adv/abs_mean", float(valid.abs().mean()) if len(valid) else 0.0, float(len(valid)))
        runner.metrics.add("adv/zero_frac", float((valid == 0).float().mean()) if len(valid) else 0.0, len(valid))
        return advantages, rows

    def with_early_steps(
        self,
        scored: ScoredRollouts,
        advantages: torch.Tensor,
        early: Rollouts,
        pruned: torch.Tensor,
        every: torch.Tensor,
        steps: int,
    ) -> tuple[ScoredRollouts, torch.Tensor]:
        """The survivors followed by pruned rollouts that train on their recorded steps (``prune_train_early``).

        Pruned rollouts' states and log-probs are zero-padded from k to T steps, making one tensor for the
        trainer's micro-batches; the trainer never reads the padding (``recorded`` masks those steps, and a
        recorded step is re-scored in their place). Their rewards and reward components are NaN (never decoded).

        Args:
            scored: B' scored survivors; advantages: their ``[B']`` advantages.
            early: the step's B rollouts, stopped at step k.
            pruned: ``[P]`` indices (into ``early``) of the pruned rollouts to train.
            every: ``[B]`` every rollout's advantage (pruned ones imputed).
            steps: T.

        Returns:
            ``B' + P`` rollouts with ``recorded`` (T for survivors, k for pruned rollouts) and their advantages.
        """
        done, part = scored.rollouts, early.select(pruned)
        count, pad = len(part), steps - part.step
        states = torch.cat([part.states, part.states.new_zeros(count, pad, *part.states.shape[2:])], 1)
        log_probs = torch.cat([part.log_probs, part.log_probs.new_zeros(count, pad)], 1)
        rollouts = Rollouts(
            torch.cat([done.prompt_index, part.prompt_index]),
            torch.cat([done.seeds, part.seeds]),
            torch.cat([done.states, states]),
            torch.cat([done.log_probs, log_probs]),
        )
        unscored = torch.full((count,), math.nan)
        combined = dataclasses.replace(
            scored,
            rollouts=rollouts,
            group_ids=torch.cat([scored.group_ids, self.last.group_ids[pruned]]),
            rewards=torch.cat([scored.rewards.float(), unscored]),
            components={key: torch.cat([values.float(), unscored]) for key, values in scored.components.items()},
            valid=torch.cat([scored.valid, torch.ones(count, dtype=torch.bool)]),
            recorded=torch.tensor([steps] * len(done) + [part.step] * count),
        )
        return combined, torch.cat([advantages, every[pruned]])

    # ------------------------------------------------------------------ online probe

    def record(self, runner: RolloutRunner, scored: ScoredRollouts, started: int) -> None:
        """Log the step's pruning figures, what selection bought and the probe's online quality; hold the survivors
        for the buffer (:meth:`commit`).

        What selection bought: the survivors' real reward std inside a group (the trainer's ``reward/group_std``,
        what GRPO learns from) beside ``prune/explore_reward_std``, the same over the random exploration slice
        (an unselected subset; logged with at least 2 explorers per group). ``prune/flat_group_frac``: groups whose
        survivors all scored alike (no advantage). ``prune/predicted_std_gain``: survivors' predicted std over
        the started group's. Every process gathers every process's survivors, so all hold the same buffer and
        (refreshing with the same seed) the same probe.
        """
        step, metrics = self.last, runner.metrics
        selection = step.selection
        metrics.add("prune/survivor_frac", float(selection.keep.float().mean()), started)
        metrics.add("prune/explore_frac", float(selection.explore.float().mean()), started)
        # a global count: every process adds the same reduced total once, so the reduced mean is that total
        metrics.add("prune/skipped_groups", self.global_sum(selection.skipped_groups(step.group_ids)))
        for key, value in dataclasses.asdict(step.cost).items():
            metrics.add(f"predict/{key}", self.global_sum(value))
        valid = scored.valid.cpu()
        rewards, groups = scored.rewards.float().cpu()[valid], scored.group_ids.cpu()[valid]
        if len(rewards):
            spread = group_std(rewards, groups)
            metrics.add("prune/flat_group_frac", float((spread < 1e-6).float().mean()), float(len(spread)))
            explore = selection.explore[selection.survivors].cpu()[valid]
            if explore.any():
                slice_std = group_std(rewards[explore], groups[explore])
                counts = torch.unique(groups[explore], return_counts=True)[1]
                if (counts >= 2).any():
                    value = float(slice_std[counts >= 2].mean())
                    metrics.add("prune/explore_reward_std", value, float((counts >= 2).sum()))
        if self.predicting and selection.keep.any():
            kept = selection.keep & ~selection.skipped
            before = group_std(step.predicted[~selection.skipped], step.group_ids[~selection.skipped])
            after = group_std(step.predicted[kept], step.group_ids[kept])
            usable = before > 1e-12
            if usable.any() and len(after) == len(before):
                gain = after[usable] / before[usable]  # weighted by groups: a global mean over every process's
                metrics.add("prune/predicted_std_gain", float(gain.mean()), float(usable.sum()))
        if self.probe is None:
            return
        survivors = selection.survivors[scored.valid]
        unique_groups = step.group_ids[survivors] + runner.step * 1_000_003  # unique across steps
        # a group-relative probe predicted each survivor against its whole group: the refresh must see the same
        whole = group_mean(step.features.float(), step.group_ids.to(step.features.device))[survivors].cpu()
        local = ProbeDataset.from_tensors(
            step.features[survivors].cpu(), step.sigma, scored.rewards[scored.valid].float(), unique_groups,
            group_means=whole,
        )  # fmt: skip
        newest = step.predicted[survivors]
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            parts = gather_object([(local, newest)])
            local = ProbeDataset.concatenate([part for part, _ in parts])
            newest = torch.cat([prediction for _, prediction in parts])
        if len(local) >= 2:
            online = probe_metrics(newest, local.reward, local.group)
            for key in ("pcc", "within_group_srcc", "top_half_recall"):
                if math.isfinite(online[key]):
                    metrics.add(f"probe/{key}_online", online[key])
        self.pending = local

    def commit(self, runner: RolloutRunner) -> None:
        """Apply what the step taught the probe: its survivors join the buffer, and every ``probe_refresh_every``
        steps the probe is fine-tuned on it. The trainer calls this only once every process agreed the step stands
        (a reward failed nowhere), so a checkpoint written on a failure holds no part of the failed step."""
        if self.pending is not None:
            self.buffer.add(self.pending)
            self.pending = None
        every = self.pruning.probe_refresh_every
        if every and (runner.step + 1) % every == 0:
            with runner.phase("probe_refresh"):
                self.refresh(runner.step)

    def refresh(self, step: int) -> list[dict]:
        """Fine-tune the probe on the buffer (normalisation fixed; seeded by the step, identical on every process)."""
        if self.probe is None or len(self.buffer) < 2:
            return []
        p = self.pruning
        config = FitConfig(
            steps=p.probe_refresh_steps, lr=p.probe_refresh_lr, rank_weight=p.probe_rank_weight, cosine=False, seed=step
        )
        return fit(self.probe, self.buffer.dataset(), config)

    # ------------------------------------------------------------------ helpers and state

    def global_sum(self, value: float) -> float:
        accelerator = self.accelerator
        if accelerator is None or accelerator.num_processes == 1:
            return float(value)
        return float(accelerator.reduce(torch.tensor([float(value)], device=accelerator.device), "sum").item())

    def global_std(self, values: torch.Tensor) -> float:
        values = values.double()
        total, square, count = (self.global_sum(v) for v in (values.sum(), (values**2).sum(), len(values)))
        return math.sqrt(max(square / max(count, 1) - (total / max(count, 1)) ** 2, 0.0))

    def state_dict(self) -> dict:
        """The probe's current weights and the refresh buffer (both change during training)."""
        return {"probe": self.probe.state() if self.probe is not None else None, "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["probe"] is not None:
            device = self.probe.feature_mean.device
            self.predictor.probe = Probe.from_state(state["probe"]).to(device)
        self.buffer.load_state_dict(state["buffer"])
