"""Probe pruning of GRPO groups: which rollouts continue past the capture step, and their advantages.

Pure functions on tensors (docs/design.md section 5); :mod:`rl.pruned_rollout` runs them inside the trainer.
Every group of G rollouts of one prompt reaches capture step k together; the predictor predicts each rollout's
final reward; :func:`select_survivors` picks who is denoised to the end, decoded and scored, by a registered
pruning policy (rl/prune_policies/: ``none``, ``topk``, ``maxvar``, ``variance``, ``random``, ``threshold``).

Options, applied to every policy but ``none``:

- exploration slice: ``explore`` rollouts per group drawn uniformly at random are kept regardless, and the
  policy fills the remaining ``n - explore`` slots from the others; the survivor count (hence the cost) is
  unchanged, and the online probe update sees rollouts chosen independently of its own predictions.
- group skipping: a group whose predicted rewards have population std below ``min_spread`` is dropped
  whole (exploration slice included): its advantages would be ~0, so finishing it buys nothing. If that
  would skip every group, the one with the largest predicted spread is kept: a step needs something to train.

Advantage modes (:func:`pruned_advantages`):

- ``survivors``: GRPO's group normalisation among the survivors only.
- ``imputed``: each pruned rollout's reward is imputed from its prediction, calibrated on the survivors
  (:func:`calibrate`), and the group mean and std run over the whole group, survivors' real rewards and
  pruned rollouts' imputed ones. The survivors of ``topk`` are then scored against the full group, not only
  against each other.
  With ``prune_train_early``, pruned rollouts' recorded steps before k are trained too, with the advantages
  of their imputed rewards (:func:`trained_step_weights` masks their later steps).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from rl.advantages import group_advantages
from rl.prune_policies import build_policy, keep_count

ADVANTAGE_MODES = ("survivors", "imputed")


@dataclasses.dataclass
class Selection:
    """The outcome of pruning B rollouts.

    Attributes:
        keep: ``[B]`` bool, the survivors (denoised to the end, decoded, scored, trained on).
        explore: ``[B]`` bool, survivors kept by the exploration slice (a subset of ``keep``).
        skipped: ``[B]`` bool, rollouts of groups skipped for a low predicted spread (none of them is kept).
    """

    keep: torch.Tensor
    explore: torch.Tensor
    skipped: torch.Tensor

    @property
    def survivors(self) -> torch.Tensor:
        """``[B']`` indices of the survivors, ascending."""
        return torch.nonzero(self.keep).flatten()

    def skipped_groups(self, group_ids: torch.Tensor) -> int:
        return len(torch.unique(group_ids[self.skipped]))


def select_survivors(
    predicted: torch.Tensor,
    group_ids: torch.Tensor,
    policy: str,
    keep_fraction: float = 0.5,
    explore: int = 0,
    threshold: float = 0.0,
    min_spread: float = 0.0,
    seed: int | list[int] = 0,
) -> Selection:
    """Choose the survivors of every group (see the module docstring for the policies and options).

    Args:
        predicted: ``[B]`` probe predictions (ignored by ``none`` and ``random`` except for group skipping).
        group_ids: ``[B]`` group (prompt) of each rollout; a group's members need not be contiguous.
        policy: a registered policy's name (rl/prune_policies/).
        keep_fraction: r of the fixed-count policies (:func:`keep_count`).
        explore: rollouts per group kept at random regardless of the prediction (capped at the keep count).
        threshold: the ``threshold`` policy's cut, in reward units.
        min_spread: skip groups whose predicted population std is below this; 0 never skips.
        seed: seed (or seed sequence) of the exploration slice and the ``random`` policy.

    Raises:
        ValueError: for an unknown policy, mismatched shapes or a keep fraction outside (0, 1].
    """
    rule = build_policy(policy, keep_fraction, threshold)
    if predicted.shape != group_ids.shape or predicted.ndim != 1:
        raise ValueError(f"predicted {tuple(predicted.shape)} and group_ids {tuple(group_ids.shape)} must both be [B]")
    size = len(predicted)
    keep = np.zeros(size, dtype=bool)
    explored = np.zeros(size, dtype=bool)
    skipped = np.zeros(size, dtype=bool)
    if not rule.prunes:
        keep[:] = True
        return Selection(torch.from_numpy(keep), torch.from_numpy(explored), torch.from_numpy(skipped))
    scores = predicted.detach().double().cpu().numpy()
    groups = group_ids.cpu().numpy()
    rng = np.random.default_rng(seed)
    unique = np.unique(groups)
    spreads = np.array([scores[groups == group].std() for group in unique])
    flat = spreads < min_spread if min_spread > 0 else np.zeros(len(unique), dtype=bool)
    if flat.all():
        flat[np.argmax(spreads)] = False
    for group, skip in zip(unique, flat):
        members = np.flatnonzero(groups == group)
        if skip:
            skipped[members] = True
            continue
        count = rule.count(members, scores)
        slice_ = rng.choice(members, size=min(explore, count), replace=False)
        explored[slice_] = keep[slice_] = True
        rest = members[~np.isin(members, slice_)]
        need = count - len(slice_)
        if rule.reads_predictions:  # a NaN prediction (a preview whose reward failed) is no prediction at all
            unknown = rest[~np.isfinite(scores[rest])]
            rest = rest[np.isfinite(scores[rest])]
            chosen = rule.choose(rest, scores, min(need, len(rest)), rng)
            chosen = np.concatenate([chosen, unknown[: need - len(chosen)]]).astype(members.dtype)
        else:
            chosen = rule.choose(rest, scores, need, rng)
        keep[chosen] = True
    return Selection(torch.from_numpy(keep), torch.from_numpy(explored), torch.from_numpy(skipped))


def parse_funnel(spec: str, num_steps: int) -> list[tuple[int, float]]:
    """Stages ``"k1:r1,k2:r2,..."`` of a pruning funnel as ``[(k, r), ...]``: after k steps, r of the rollouts
    still running survive (Pro-GRPO prunes 48 -> 24 -> 12 this way: ``"2:0.5,4:0.5"`` from 4 G started).

    Raises:
        ValueError: a malformed stage, a step outside [1, num_steps - 1], steps not increasing, or r outside (0, 1].
    """
    stages = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        try:
            step, fraction = part.split(":")
            stages.append((int(step), float(fraction)))
        except ValueError:
            raise ValueError(f"prune_funnel stage {part!r} is not 'step:fraction' (e.g. '2:0.5,4:0.5')") from None
    for step, fraction in stages:
        if not 1 <= step < num_steps:
            raise ValueError(f"prune_funnel step {step} must lie in [1, num_steps - 1 = {num_steps - 1}]")
        if not 0 < fraction <= 1:
            raise ValueError(f"prune_funnel fraction {fraction} must lie in (0, 1]")
    steps = [step for step, _ in stages]
    if steps != sorted(set(steps)):
        raise ValueError(f"prune_funnel steps must increase, got {steps}")
    return stages


def funnel_group_sizes(started: int, stages: list[tuple[int, float]]) -> list[int]:
    """Rollouts per group left after each stage of a fixed-count policy (:func:`keep_count` at each)."""
    sizes = []
    for _, fraction in stages:
        started = keep_count(started, fraction)
        sizes.append(started)
    return sizes


def calibrate(predicted: torch.Tensor, rewards: torch.Tensor, group_ids: torch.Tensor) -> float:
    """Slope of real reward on prediction within groups (least squares on deviations from the group means).

    Only the within-group relation matters for imputing a pruned rollout from its group's survivors (the
    group level comes from the survivors' real rewards), so prompt-to-prompt differences must not set the
    slope. A probe without within-group signal gets slope ~0, and its imputations shrink to the survivors'
    mean instead of adding noise. A negative slope (a probe ranking backwards on this batch, e.g. a fresh one
    fitted to noise) is clamped to 0 for the same reason: its imputations would invent contrast.

    Args:
        predicted, rewards, group_ids: ``[N]`` the survivors' predictions, real rewards and groups.

    Returns:
        The slope ``a >= 0``; 0 when no group has two survivors with different predictions.
    """
    p, r = predicted.double(), rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(int(inverse.max()) + 1 if len(inverse) else 0, dtype=torch.float64)
    count.index_add_(0, inverse, torch.ones_like(p))
    p_dev = p - torch.zeros_like(count).index_add_(0, inverse, p)[inverse] / count[inverse]
    r_dev = r - torch.zeros_like(count).index_add_(0, inverse, r)[inverse] / count[inverse]
    denominator = float((p_dev**2).sum())
    return max(0.0, float((p_dev * r_dev).sum()) / denominator) if denominator > 1e-12 else 0.0


def impute_rewards(
    rewards: torch.Tensor, predicted: torch.Tensor, keep: torch.Tensor, group_ids: torch.Tensor, slope: float
) -> torch.Tensor:
    """``[B]`` real rewards of survivors; for a pruned rollout i of group g,

        r_i = mean(real r of g's survivors) + slope * (p_i - mean(p of g's survivors)),

    clipped to the range of every survivor's real reward in the batch (no extrapolation past what the reward
    has produced: a steep slope from a few survivors must not invent outliers).

    Args:
        rewards: ``[B]`` real rewards (values at pruned rows are ignored, e.g. NaN).
        predicted: ``[B]`` probe predictions.
        keep: ``[B]`` bool survivors; every group with a pruned rollout needs at least one survivor.
        group_ids: ``[B]`` groups.
        slope: from :func:`calibrate`.

    Raises:
        ValueError: if a group has no survivor to anchor its imputations.
    """
    out = torch.where(keep, rewards.double(), torch.zeros_like(rewards, dtype=torch.float64))
    p = predicted.double()
    low, high = (float(out[keep].min()), float(out[keep].max())) if keep.any() else (0.0, 0.0)
    for group in torch.unique(group_ids[~keep]):
        members = group_ids == group
        alive = members & keep
        if not alive.any():
            raise ValueError(f"group {int(group)} has no survivor: imputed rewards need one (skip the group instead)")
        level = rewards.double()[alive].mean() - slope * p[alive].mean()
        pruned = members & ~keep
        out[pruned] = (level + slope * p[pruned]).clamp(low, high)
    return out


def pruned_advantages(
    rewards: torch.Tensor,
    predicted: torch.Tensor,
    keep: torch.Tensor,
    group_ids: torch.Tensor,
    mode: str,
    std_mode: str = "group",
    adv_clip_max: float = 5.0,
    batch_std: float | None = None,
    slope: float | None = None,
) -> torch.Tensor:
    """``[B]`` advantages of every rollout under advantage ``mode``; survivors' ones are what GRPO trains on.

    ``survivors``: :func:`rl.advantages.group_advantages` over the survivors; pruned rows get 0.
    ``imputed``: the same over the whole group with :func:`impute_rewards` standing in for pruned rollouts;
    pruned rows get the advantage of their imputed reward (used only if their early steps are trained).

    Args:
        rewards: ``[B]`` real rewards (finite at survivors).
        predicted: ``[B]`` probe predictions (unused in ``survivors`` mode).
        keep: ``[B]`` bool survivors.
        group_ids: ``[B]`` groups.
        mode: one of :data:`ADVANTAGE_MODES`.
        std_mode, adv_clip_max, batch_std: as :func:`rl.advantages.group_advantages`.
        slope: the calibration slope; default :func:`calibrate` on this batch's survivors.
    """
    if mode not in ADVANTAGE_MODES:
        raise ValueError(f"prune_advantage={mode!r} is not one of {ADVANTAGE_MODES}")
    advantages = torch.zeros(len(rewards))
    if mode == "survivors":
        advantages[keep] = group_advantages(rewards[keep], group_ids[keep], std_mode, adv_clip_max, batch_std=batch_std)
        return advantages
    if slope is None:
        slope = calibrate(predicted[keep], rewards[keep], group_ids[keep])
    full = impute_rewards(rewards, predicted, keep, group_ids, slope)
    return group_advantages(full, group_ids, std_mode, adv_clip_max, batch_std=batch_std)


def trained_step_weights(
    valid: torch.Tensor, steps: torch.Tensor, recorded: torch.Tensor | None = None
) -> torch.Tensor:
    """``[B, K]`` loss weight of each (rollout, trained step) sample: 1 if the rollout is valid and recorded that
    step's transition, else 0.

    A pruned rollout trained early (``prune_train_early``) recorded only steps ``0..k-1``; its trained steps from
    ``k`` on keep their place in the micro-batch with weight 0, so every process still runs the same number of
    backward passes and accumulation windows stay aligned.

    Args:
        valid: ``[B]`` bool, rollouts the loss may use (the reward's failure policy drops the others).
        steps: ``[B, K]`` denoising step of each sample (:func:`rl.batches.trained_steps`).
        recorded: ``[B]`` transitions each rollout recorded (T finished, k pruned), or None: all of them.
    """
    weights = valid.float()[:, None].expand(steps.shape)
    if recorded is None:
        return weights
    return weights * (steps < recorded[:, None]).float()
