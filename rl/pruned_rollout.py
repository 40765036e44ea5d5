"""The pruned rollout phase of GRPO and the online probe refresh (DESIGN.md sections 2 and 5).

Per GRPO step, in place of the trainer's ``rollout -> score -> advantages``::

    every rollout to capture step k (the probe's recorder observing)       trainer.rollout(until_step=k)
      -> features, probe prediction [B]                                      phase "probe"
      -> survivors: rl.pruning.select_survivors (policy, exploration slice, group skipping)
      -> survivors only continue to step T (re-batched, same noise as unpruned: rl/sampler.py)
      -> decode + real reward on survivors only                              trainer.score
      -> advantages ("survivors" or "imputed")                               rl.pruning.pruned_advantages
      -> prune_train_early: pruned rollouts join the trained set for their steps < k (imputed advantages)
      -> online metrics of the probe on this batch, buffer += (features, real reward) of survivors
      -> every probe_refresh_every steps: fine-tune the probe on the buffer  phase "probe_refresh"

With ``prune_policy: none`` every rollout survives and the step is bit-identical to the unpruned trainer's
(the sampler's noise is per rollout and the capture processors return the default ones' outputs).

The online figures ``probe/pcc_online`` and ``probe/within_group_srcc_online`` compare predictions made
before the probe saw the batch with its real rewards (survivors only: pruned rollouts have no real reward;
under ``topk`` the survivors' range is truncated, so these read lower than on unpruned data).
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import torch
from accelerate.utils import gather_object

from probe import FeatureConfig, FitConfig, Probe, ProbeDataset, ProbeMeta, fit, probe_metrics
from probe.capture import default_blocks
from probe.model import ProbeModelConfig
from probe.probe import transformer_fingerprint
from rl.config import RunConfig
from rl.pruning import Selection, calibrate, impute_rewards, pruned_advantages, select_survivors
from rl.sampler import FluxSampler, Rollouts

if TYPE_CHECKING:
    from rl.trainer import GRPOTrainer, PromptBatch, ScoredRollouts


def init_probe_for(sampler: FluxSampler, config: RunConfig, seed: int = 0) -> Probe:
    """A randomly initialised probe (default blocks, combined features) for ``sampler``'s model at ``capture_step``.

    Identity normalisation; it predicts noise until refreshed online. Used by ``probe_path: init``, tests and
    benchmarks that only need the probe's cost.
    """
    transformer = sampler.transformer
    blocks = default_blocks(transformer)
    features = FeatureConfig()
    meta = ProbeMeta(
        base_model=config.model.pretrained,
        transformer_fingerprint=transformer_fingerprint(transformer),
        capture_step=config.pruning.capture_step,
        num_steps=sampler.num_steps,
        blocks=blocks,
        grid=(sampler.latent_height // 2, sampler.latent_width // 2),
        text_length=config.model.max_sequence_length,
        noise_level=sampler.noise_level,
        reward=config.reward.reward,
    )
    torch.manual_seed(seed)
    channels = features.num_channels(len(blocks), sampler.channels)
    return Probe(ProbeModelConfig(in_channels=channels), features, meta)


class ProbeBuffer:
    """First-in first-out store of (features, real reward, group) for the online refresh; checkpointable.

    Features are kept in fp16 (``C h w`` x 2 bytes per rollout: 8 KiB on the tiny model, ~1 MiB for FLUX at
    1024 px with the combined feature set, so size ``probe_buffer_size`` accordingly).

    Args:
        capacity: most rollouts held; the oldest leave first.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: ProbeDataset | None = None

    def __len__(self) -> int:
        return 0 if self.data is None else len(self.data)

    def add(self, batch: ProbeDataset) -> None:
        batch = dataclasses.replace(batch, features=batch.features.half())
        data = batch if self.data is None else ProbeDataset.concatenate([self.data, batch])
        self.data = data.subset(torch.arange(max(0, len(data) - self.capacity), len(data)))

    def dataset(self) -> ProbeDataset:
        """The buffer with fp32 features (what :func:`probe.fit` trains on)."""
        if self.data is None:
            raise RuntimeError("the probe buffer is empty")
        return dataclasses.replace(self.data, features=self.data.features.float())

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "data": None if self.data is None else dataclasses.asdict(self.data)}

    def load_state_dict(self, state: dict) -> None:
        self.capacity = state["capacity"]
        self.data = None if state["data"] is None else ProbeDataset(**state["data"])


@dataclasses.dataclass
class PrunedStep:
    """What the pruned phase decided for B rollouts (kept for logging, tests and benchmarks).

    Attributes:
        predicted: ``[B]`` probe predictions (zeros without a probe: the ``random`` control).
        group_ids: ``[B]`` group of each rollout in the step's global batch.
        selection: survivors, exploration slice and skipped groups.
        features: ``[B, C, h, w]`` probe features, or None without a probe.
        sigma: the sigma of the captured transformer call (the probe's timestep input).
    """

    predicted: torch.Tensor
    group_ids: torch.Tensor
    selection: Selection
    features: torch.Tensor | None
    sigma: float


class PrunedRollout:
    """The trainer's rollout phase with probe pruning; ``GRPOTrainer`` calls :meth:`sample_and_score` per step.

    Args:
        config: the run's config (its ``pruning`` section drives everything here).
        probe: the probe, or None (only the ``random`` and ``none`` policies run without one).
        accelerator: the run's accelerator, whose processes counts and the buffer are reduced over (None: one).
    """

    def __init__(self, config: RunConfig, probe: Probe | None, accelerator=None) -> None:
        self.config = config
        self.accelerator = accelerator
        self.pruning = config.pruning
        self.probe = probe
        self.buffer = ProbeBuffer(self.pruning.probe_buffer_size)
        self.last: PrunedStep | None = None

    @classmethod
    def from_config(cls, config: RunConfig, sampler: FluxSampler, accelerator) -> PrunedRollout | None:
        """The pruned phase of a run, or None when it trains unpruned (policy ``none`` without a probe).

        Raises:
            FileNotFoundError, probe.ProbeMismatchError: a missing probe file, or one for another model/step.
        """
        p = config.pruning
        if p.prune_policy == "none" and not p.probe_path:
            return None
        probe = None
        if p.probe_path == "init":
            probe = init_probe_for(sampler, config, config.training.seed)
        elif p.probe_path:
            probe = Probe.load(p.probe_path, sampler.transformer, p.capture_step, sampler.num_steps)
        return cls(config, probe.to(accelerator.device) if probe is not None else None, accelerator)

    # ------------------------------------------------------------------ the phase

    def sample_and_score(self, trainer: GRPOTrainer, batch: PromptBatch) -> tuple[ScoredRollouts, torch.Tensor]:
        """Sample to k, probe, prune, finish and score the survivors; returns them and their advantages ``[B']``."""
        p, k = self.pruning, self.pruning.capture_step
        sampler = trainer.sampler
        recorder = self.probe.recorder(sampler) if self.probe is not None else None
        early = trainer.rollout(batch, until_step=k, observer=recorder)
        with trainer.phase("probe"):
            group_ids = batch.group_ids[early.prompt_index.cpu()]
            features, predicted = None, torch.zeros(len(early))
            if self.probe is not None:
                capture = recorder.result(early)
                features = self.probe.features(capture, batch.embeds.token_mask[early.prompt_index])
                predicted = self.probe.predict(features, capture.sigma, early.prompt_index).cpu()
            seed = [self.config.training.seed, trainer.state.step, 4]
            selection = select_survivors(
                predicted, group_ids, p.prune_policy, p.prune_keep_fraction, p.prune_explore, p.prune_threshold,
                p.prune_min_spread, seed,
            )  # fmt: skip
        sigma = float(sampler.sigmas[k - 1])  # the captured call's (what ProbeCapture.sigma records)
        self.last = PrunedStep(predicted, group_ids, selection, features, sigma)
        finished = trainer.continue_rollouts(batch, early.select(selection.survivors))  # re-batched
        scored = trainer.score(batch, finished)
        if p.prune_advantage == "survivors":
            advantages = trainer.advantages(scored)
        else:
            every, imputed = self.imputed_advantages(trainer, scored)
            advantages = every[selection.survivors]
        self.record(trainer, scored, len(early))
        if p.probe_refresh_every and (trainer.state.step + 1) % p.probe_refresh_every == 0:
            with trainer.phase("probe_refresh"):
                self.refresh(trainer.state.step)
        if p.prune_train_early:  # the config requires prune_advantage: imputed
            pruned = torch.nonzero(imputed & ~selection.keep).flatten()
            return self.with_early_steps(scored, advantages, early, pruned, every, sampler.num_steps)
        return scored, advantages

    def imputed_advantages(self, trainer: GRPOTrainer, scored: ScoredRollouts) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B]`` advantages of every rollout, pruned ones imputed from calibrated predictions, and ``[B]`` bool
        of the rollouts that have one.

        Groups the reward's failure policy dropped (any invalid survivor) and skipped groups take no part (0).
        """
        t, step = trainer.config.training, self.last
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
        trainer.metrics.add("prune/calibration_slope", slope)
        survivor_advantages = advantages[survivors]
        valid = survivor_advantages[scored.valid]
        trainer.metrics.add("adv/abs_mean", float(valid.abs().mean()) if len(valid) else 0.0, float(len(valid)))
        trainer.metrics.add("adv/zero_frac", float((valid == 0).float().mean()) if len(valid) else 0.0)
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

    def record(self, trainer: GRPOTrainer, scored: ScoredRollouts, started: int) -> None:
        """Log the step's pruning figures and the probe's online quality; add the survivors to the buffer.

        Every process gathers every process's survivors, so all hold the same buffer and (refreshing with the
        same seed) the same probe.
        """
        step, metrics = self.last, trainer.metrics
        selection = step.selection
        metrics.add("prune/survivor_frac", float(selection.keep.float().mean()), started)
        metrics.add("prune/explore_frac", float(selection.explore.float().mean()), started)
        # a global count: every process adds the same reduced total once, so the reduced mean is that total
        metrics.add("prune/skipped_groups", self.global_sum(selection.skipped_groups(step.group_ids)))
        if self.probe is None:
            return
        survivors = selection.survivors[scored.valid]
        unique_groups = step.group_ids[survivors] + trainer.state.step * 1_000_003  # unique across steps
        local = ProbeDataset.from_tensors(
            step.features[survivors].cpu(), step.sigma, scored.rewards[scored.valid].float(), unique_groups
        )
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
        self.buffer.add(local)

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
            self.probe = Probe.from_state(state["probe"]).to(device)
        self.buffer.load_state_dict(state["buffer"])
