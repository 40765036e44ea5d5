"""The pruning section of a run config and its checks against the rest of the run (docs/design.md section 5).

:class:`PruningConfig` holds the keys; :func:`validate_pruning` (called by ``RunConfig.validate``) checks them
against the sampling and training sections and says what to set instead.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from rl.config_base import Section, nonnegative, option, positive
from rl.objectives import OBJECTIVES
from rl.predictors import PREDICTORS
from rl.prune_policies import PRUNE_POLICIES, keep_count
from rl.pruning import ADVANTAGE_MODES, funnel_group_sizes

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from rl.config import RunConfig


@dataclasses.dataclass
class PruningConfig(Section):
    """Pruning (docs/design.md section 5; rl/pruning.py, rl/prune_policies/, rl/pruned_rollout.py) and the online probe refresh."""

    choices = {"prune_policy": PRUNE_POLICIES, "predictor": PREDICTORS, "prune_advantage": ADVANTAGE_MODES}

    prune_policy: str = option(
        "none",
        "Which rollouts continue past capture_step: 'none' (all: the unpruned trainer), 'topk' (the best "
        "predicted prune_keep_fraction of each group), 'variance' (the subset of maximal predicted variance, "
        "exactly: PODS' rule; GRPO learns from contrast), 'maxvar' (alternately the best and worst predicted), "
        "'random' (the ablation control: same cost, no predictor) or 'threshold' (predicted reward >= "
        "prune_threshold, at least 2 per group).",
    )
    predictor: str = option(
        "probe",
        "What the policy selects by (rl/predictors/): 'probe' (the CNN on attention, probe_path; no reward "
        "call), 'preview' (Pro-GRPO: the capture_step-th call's x0, in preview_steps Euler steps, decoded and "
        "scored by the reward), "
        "'lookahead' (lookahead_steps Euler steps from the state after capture_step, decoded and scored) or "
        "'reward' (every rollout finished and scored: the oracle; with prune_policy variance, PODS).",
    )
    lookahead_steps: int = option(2, "Euler steps of the 'lookahead' predictor from capture_step to sigma 0.")
    preview_steps: int = option(
        1,
        "Euler steps of the 'preview' from the capture_step-th call's input to sigma 0. 1: its x0 (no transformer "
        "call); n > 1: the first step reuses that call's velocity and each further one is a transformer call, so "
        "it reads what 'lookahead' with n steps from capture_step - 1 reads, one call cheaper.",
    )
    prune_expand: int = option(
        1,
        "m: start m x group_size rollouts per prompt and prune them to round(prune_keep_fraction m G) "
        "(expand-and-prune, Pro-GRPO; m = 2 with prune_keep_fraction 0.5 trains group_size per prompt). 1: "
        "prune the group itself.",
    )
    prune_funnel: str = option(
        "",
        "Prune at several steps: 'k1:r1,k2:r2,...' (increasing steps; r of the rollouts still running survive each "
        "stage; replaces capture_step and prune_keep_fraction). Pro-GRPO's 48 -> 24 -> 12: group_size 12, "
        "prune_expand 4, '2:0.5,4:0.5'. Predictors preview and lookahead; survivors advantages. '': one stage.",
    )
    prune_keep_fraction: float = option(
        0.5,
        "r: survivors per started group = round(r m G), at least 2. Denoising costs k/T + r (1 - k/T) of an "
        "unpruned step of the started group; the reward model runs on r of the finished images.",
    )
    capture_step: int = option(
        2,
        "k (1-based): rollouts stop after k denoising steps for the prediction ('probe': the call whose "
        "attention it reads, must equal the probe's; 'preview': the call whose x0 it decodes; 'lookahead': "
        "the state it starts from). Unused by 'reward'.",
    )
    probe_path: str = option(
        "",
        "Probe file (launch/probe_train.py; assets/probe/ for the shipped model), checked against the model, "
        "capture_step and num_steps; 'init' starts from a randomly initialised probe (learnt online only; "
        "benchmarks). Needed when predictor is 'probe'.",
    )
    prune_explore: int = option(
        1,
        "Rollouts per group kept at random regardless of the predictor (they take survivor slots, the count is "
        "unchanged), so the online refresh sees data the probe did not choose. 0: none.",
    )
    prune_threshold: float = option(0.5, "Cut of the 'threshold' policy, in reward units.")
    prune_min_spread: float = option(
        0.0,
        "Skip whole groups whose predicted rewards have a population std below this (their advantages would "
        "be ~0). 0: never skip. In reward units; try ~0.1 of the reward's typical within-group std.",
    )
    prune_advantage: str = option(
        "survivors",
        "'survivors' (group statistics over the survivors) or 'imputed' (pruned rollouts' calibrated "
        "predictions take part in each group's mean and std).",
    )
    prune_train_early: bool = option(
        False,
        "Also train on pruned rollouts' recorded steps before capture_step (their trained steps < k), with their "
        "imputed advantages; their later steps get zero weight. Needs a pruning policy and prune_advantage: "
        "imputed. Costs training compute: pruned rollouts join the micro-batches. Off by default (not yet ablated).",
    )
    probe_refresh_every: int = option(
        0,
        "Fine-tune the probe every N GRPO steps on the buffer of (features, real reward) of survivors; the "
        "online PCC / within-group SRCC on the newest batch are logged before it sees that batch. 0: never.",
    )
    probe_refresh_steps: int = option(20, "Optimizer steps of each online refresh.")
    probe_refresh_lr: float = option(3e-4, "AdamW learning rate of the online refresh (constant).")
    probe_rank_weight: float = option(
        1.0, "Weight of the within-group ranking term in the online refresh loss (0: MSE only)."
    )
    probe_buffer_size: int = option(
        2048, "Most rollouts in the online refresh buffer (the oldest leave first); saved in checkpoints."
    )
    max_images_denoised: float = option(
        0.0,
        "Budget in denoised images (a rollout stopped at step k counts k/T); training stops once exceeded. "
        "Compares pruned and unpruned runs at equal compute (launch/ablate.py). 0: none.",
    )

    def check(self) -> None:
        positive(self, "lookahead_steps", "preview_steps", "prune_expand")
        positive(self, "capture_step", "probe_refresh_steps", "probe_refresh_lr", "probe_buffer_size")
        if not 0 < self.prune_keep_fraction <= 1:
            raise ValueError(f"prune_keep_fraction must lie in (0, 1], got {self.prune_keep_fraction}")
        nonnegative(self, "prune_explore", "probe_refresh_every", "prune_min_spread", "max_images_denoised")


def validate_funnel(config: RunConfig) -> None:
    """A funnel prunes by fixed counts at increasing steps with a reward-based predictor, survivors only."""
    p = config.pruning
    stages = config.pruning_stages  # raises naming a malformed stage
    if not PRUNE_POLICIES[p.prune_policy].fixed_count:
        fixed = ", ".join(name for name, policy in PRUNE_POLICIES.items() if policy.fixed_count)
        raise ValueError(f"prune_funnel needs a fixed-count policy ({fixed}), not {p.prune_policy!r}")
    if p.predictor in ("reward", "probe") and len(stages) > 1:
        raise ValueError(
            f"prune_funnel={p.prune_funnel!r} predicts at {len(stages)} steps; predictor={p.predictor!r} cannot "
            "('reward' finishes every rollout, a probe file reads one step): use preview or lookahead."
        )
    if p.prune_advantage != "survivors" or p.prune_train_early:
        raise ValueError("prune_funnel trains survivors only: set prune_advantage: survivors, prune_train_early: false")
    ignored = [
        f"{key}={getattr(p, key)}"
        for key in ("capture_step", "prune_keep_fraction")
        if getattr(p, key) != PruningConfig.__dataclass_fields__[key].default
    ]
    if ignored:
        logger.warning("prune_funnel=%r sets each stage's step and keep count; %s ignored", p.prune_funnel, ignored)
    sizes = funnel_group_sizes(config.started_group_size, stages)
    if sizes[-1] < 2 or any(p.prune_explore > size for size in sizes):
        raise ValueError(
            f"prune_funnel={p.prune_funnel!r} leaves {sizes} rollouts per group from {config.started_group_size} "
            f"started: the last stage needs >= 2 and every stage >= prune_explore={p.prune_explore}."
        )


def validate_pruning(config: RunConfig) -> None:
    """Cross-field checks of the pruning section against the sampling section."""
    p, s = config.pruning, config.sampling
    if p.prune_funnel:
        validate_funnel(config)
    if p.prune_policy == "none":
        if p.prune_min_spread > 0:
            raise ValueError(
                "prune_min_spread > 0 skips groups, but prune_policy='none' must train exactly like the unpruned "
                "trainer. Set a pruning policy ("
                + ", ".join(n for n in PRUNE_POLICIES if n != "none")
                + ") or prune_min_spread: 0."
            )
    builds_pruner = p.prune_policy != "none" or bool(p.probe_path)  # rl/pruned_rollout.py PrunedRollout.from_config
    # every rollout runs to capture_step, except where the reward oracle's predictions finish them
    stops_at_capture = p.predictor != "reward" or not PRUNE_POLICIES[p.prune_policy].reads_predictions
    if builds_pruner and not p.prune_funnel and stops_at_capture and not 1 <= p.capture_step < s.num_steps:
        raise ValueError(
            f"capture_step={p.capture_step} must lie in [1, num_steps - 1 = {s.num_steps - 1}]: pruning stops "
            "rollouts after step k, so k = T saves nothing. The shipped window sampler: 4, its first deterministic call "
            "(3 with the lookahead)."
        )
    if s.prompt_skip_after and p.prune_policy in ("topk", "threshold"):
        raise ValueError(
            f"prompt_skip_after={s.prompt_skip_after} reads a group's flatness on its survivors, and "
            f"prune_policy={p.prune_policy!r} keeps the predicted best, which can score alike in a group that was "
            "not flat: use prune_policy variance (or none), or prompt_skip_after: 0."
        )
    if p.prune_expand > 1 and p.prune_policy == "none":
        raise ValueError(
            f"prune_expand={p.prune_expand} starts more rollouts for a policy to prune, but prune_policy='none' "
            "keeps them all: set a pruning policy (variance, topk, ...) or, for a larger unpruned group, "
            "group_size instead."
        )
    if p.probe_refresh_every > 0 and p.predictor != "probe":
        raise ValueError(
            f"probe_refresh_every={p.probe_refresh_every} refreshes the probe, but predictor={p.predictor!r}: "
            "set predictor: probe or probe_refresh_every: 0."
        )
    needs_prediction = PRUNE_POLICIES[p.prune_policy].reads_predictions or p.prune_advantage == "imputed"
    needs_prediction = needs_prediction or p.probe_refresh_every > 0 or p.prune_min_spread > 0
    if needs_prediction and p.predictor == "probe" and not p.probe_path:
        raise ValueError(
            f"prune_policy={p.prune_policy!r}, prune_advantage={p.prune_advantage!r}, probe_refresh_every="
            f"{p.probe_refresh_every}, prune_min_spread={p.prune_min_spread} need predictions, and "
            "predictor='probe' reads a probe: set probe_path to a probe file (launch/probe_train.py) or "
            "'init', choose another predictor (preview, lookahead, reward), or use prune_policy 'random' / 'none'."
        )
    if needs_prediction and p.predictor == "probe" and s.sde_window_only and s.train_window_shift_every:
        raise ValueError(
            "predictor='probe' is bound to the sampler it was trained under, and a sliding window "
            "(train_window_shift_every with sde_window_only) moves the SDE noise every few steps: choose predictor "
            "preview or lookahead, which read any sampler, or a fixed window (train_window_shift_every 0)"
        )
    if p.prune_advantage == "imputed" and p.prune_policy == "none":
        raise ValueError("prune_advantage='imputed' imputes pruned rollouts; with prune_policy='none' there are none")
    if p.prune_train_early and (p.prune_policy == "none" or p.prune_advantage != "imputed"):
        raise ValueError(
            f"prune_train_early=true trains pruned rollouts' early steps with imputed advantages, but "
            f"prune_policy={p.prune_policy!r}, prune_advantage={p.prune_advantage!r}: set a pruning policy "
            "(topk, maxvar, random, threshold) and prune_advantage: imputed, or prune_train_early: false."
        )
    needs = OBJECTIVES[config.training.policy_objective].needs
    if p.prune_train_early and (needs.finished_images or not needs.transitions):
        raise ValueError(
            "prune_train_early=true trains pruned rollouts on the steps they recorded, but policy_objective="
            f"{config.training.policy_objective!r} trains on finished images, which pruned rollouts never have, not "
            "on recorded transitions: set prune_train_early: false or an objective that trains on transitions "
            "(flow_grpo)."
        )
    started = config.started_group_size
    fixed_fraction = PRUNE_POLICIES[p.prune_policy].fixed_count and not p.prune_funnel  # a funnel: its own counts
    if fixed_fraction and p.prune_explore > keep_count(started, p.prune_keep_fraction):
        raise ValueError(
            f"prune_explore={p.prune_explore} exceeds the {keep_count(started, p.prune_keep_fraction)} "
            f"survivors per group ({started} started, prune_keep_fraction={p.prune_keep_fraction}): "
            "the policy would choose nothing. Lower prune_explore or raise prune_keep_fraction."
        )
