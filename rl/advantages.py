"""GRPO advantages: each reward relative to the other rollouts of its prompt (Shao et al., 2024; Flow-GRPO).

    advantage_i = clip((r_i - mean_{group(i)}) / (std + eps), -adv_clip_max, adv_clip_max)

``std`` is the standard deviation of the rollout's own group (``std_mode="group"``, Flow-GRPO's default) or of
every reward in the batch (``std_mode="batch"``, Flow-GRPO's global_std, for groups whose tiny spread would
otherwise be amplified). Standard deviations are population ones (``np.std``),
so a group of one has mean equal to its reward and std 0. Groups whose rewards are all equal, including
groups of one, get advantage exactly 0: they carry no contrast to learn from, and dividing float noise by
``eps`` must not invent one.
"""

from __future__ import annotations

import dataclasses

import torch

STD_MODES = ("group", "batch")


@dataclasses.dataclass
class GroupStats:
    """Per-rollout statistics of its group.

    Attributes:
        mean: ``[B]`` mean reward of the rollout's group.
        std: ``[B]`` population std of the rollout's group.
        size: ``[B]`` number of rollouts in the rollout's group.
    """

    mean: torch.Tensor
    std: torch.Tensor
    size: torch.Tensor


def _per_group(rewards: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``inverse [B]`` (dense group of each rollout) and per-group ``size``, ``mean``, population ``std``."""
    rewards = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    groups = int(inverse.max()) + 1 if len(inverse) else 0
    size = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards))
    mean = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, rewards) / size
    square = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse, (rewards - mean[inverse]) ** 2)
    return inverse, size, mean, (square / size).sqrt()


def group_stats(rewards: torch.Tensor, group_ids: torch.Tensor) -> GroupStats:
    """Mean, population std and size of each rollout's group.

    Args:
        rewards: ``[B]`` rewards.
        group_ids: ``[B]`` integer group (prompt) id of each rollout; any values, need not be contiguous.
    """
    inverse, size, mean, std = _per_group(rewards, group_ids)
    return GroupStats(mean=mean[inverse], std=std[inverse], size=size[inverse])


def group_std(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """``[n_groups]`` population std of each group's rewards (groups in ascending id order)."""
    return _per_group(rewards, group_ids)[3]


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std_mode: str = "group",
    adv_clip_max: float = 5.0,
    eps: float = 1e-4,
    batch_std: float | None = None,
) -> torch.Tensor:
    """Group-normalised advantages ``[B]`` (fp32).

    Args:
        rewards: ``[B]`` rewards (finite; invalid rollouts must be removed before).
        group_ids: ``[B]`` prompt-group id of each rollout.
        std_mode: ``"group"`` (divide by the group's std) or ``"batch"`` (by the std of all rewards).
        adv_clip_max: advantages are clipped to ``[-adv_clip_max, adv_clip_max]`` (Flow-GRPO: 5).
        eps: added to the std (Flow-GRPO: 1e-4).
        batch_std: the batch std to use in ``"batch"`` mode, e.g. reduced over every process's rewards;
            default: the population std of ``rewards``.

    Raises:
        ValueError: on an unknown ``std_mode``, a length mismatch or a non-finite reward.
    """
    if std_mode not in STD_MODES:
        raise ValueError(f"std_mode must be one of {STD_MODES}, got {std_mode!r}")
    if rewards.shape != group_ids.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must both be [B]")
    if not torch.isfinite(rewards).all():
        raise ValueError("advantages of non-finite rewards: drop invalid rollouts first")
    stats = group_stats(rewards, group_ids)
    centred = rewards.double() - stats.mean
    if std_mode == "group":
        std = stats.std
    else:
        std = torch.as_tensor(rewards.double().std(unbiased=False) if batch_std is None else batch_std).double()
    advantages = centred / (std + eps)
    advantages = torch.where(stats.std > 0, advantages, torch.zeros_like(advantages))
    return advantages.clamp(-adv_clip_max, adv_clip_max).float()


def scale_advantages(advantages: torch.Tensor, adv_clip_max: float, scale_max: float) -> torch.Tensor:
    """Clipped advantages ``[B]`` times ``scale_max / adv_clip_max``: into ``[-scale_max, scale_max]``.

    AWM's reference code does this with ``scale_max = 1`` (its ``advantage_max``). A positive constant keeps every
    advantage's sign and order; under Adam, which normalises the gradient's scale, what it changes is the weight of
    the KL terms relative to the policy term (``adv_clip_max / scale_max`` times more) and the gradient clipping.
    ``scale_max = 0`` returns the advantages unchanged.

    Args:
        advantages: ``[B]`` advantages already clipped to ``[-adv_clip_max, adv_clip_max]``
            (:func:`group_advantages`).
        adv_clip_max: their clip bound (> 0).
        scale_max: the new bound (>= 0; 0: no scaling).
    """
    if scale_max == 0:
        return advantages
    return advantages * (scale_max / adv_clip_max)
