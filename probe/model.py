"""The probe network and its loss.

:class:`ProbeCNN`: a small residual CNN over the feature maps ``[B, C, h, w]`` whose residual blocks are
modulated by a timestep embedding through FiLM (per-channel scale and shift), ending in one scalar per
rollout. The timestep is the capture call's sigma, so one network can serve several capture steps.

:func:`probe_loss`: weighted MSE, where rollouts with low rewards weigh more (the paper oversamples low
scores; a per-sample weight ``w`` is the same objective in expectation as drawing that sample ``w`` times as
often, without breaking up prompt groups in a batch), plus an optional within-group pairwise ranking term
(RankNet's logistic loss on score differences of rollouts of the same prompt), plus :func:`aux_loss` when the
network has auxiliary heads: they predict the reward's parts (``shapes/objects``, ``shapes/extras``, ...), a
denser signal about what the features must show than the one total; only training reads them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass
class ProbeModelConfig:
    """Sizes of :class:`ProbeCNN`.

    Attributes:
        in_channels: feature channels C.
        width: channels of the first stage (doubled at each downsampling).
        blocks_per_stage: residual blocks per resolution stage; one stage per entry.
        time_dim: size of the timestep embedding that drives FiLM.
        dropout: before the output head.
        group_relative: the network also reads each rollout's features minus its group's mean (rollouts of one
            prompt): ranking inside a GRPO group depends only on these deviations, which between-prompt
            differences otherwise dwarf. Needs group ids wherever the probe predicts (GRPO has them: the
            whole group reaches step k together).
        aux_outputs: auxiliary heads, one per reward part the network also learns to predict (0: none).
    """

    in_channels: int
    width: int = 32
    blocks_per_stage: tuple[int, ...] = (1, 1, 1)
    time_dim: int = 64
    dropout: float = 0.1
    group_relative: bool = False
    aux_outputs: int = 0

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["blocks_per_stage"] = list(self.blocks_per_stage)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ProbeModelConfig:
        return cls(**{**data, "blocks_per_stage": tuple(data["blocks_per_stage"])})


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of ``1000 * sigma`` (the transformer's timestep scale)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10_000) * torch.arange(half, device=sigma.device, dtype=torch.float32) / half)
    angles = 1000 * sigma.float()[:, None] * frequencies[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class FiLMResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> FiLM(t) -> SiLU -> conv, plus the input (1x1-projected if widths differ)."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.film = nn.Linear(time_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(min(8, out_channels), out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(t)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class ProbeCNN(nn.Module):
    """Residual CNN with FiLM timestep conditioning: ``(features [B, C, h, w], sigma [B]) -> [B]``.

    A 1x1 stem to ``width``; stages of :class:`FiLMResBlock` at halving resolutions (average pooling between
    stages, widths doubling); global mean and max pooling; a two-layer head to one scalar (and ``aux_outputs``
    more, sharing the head's hidden layer, read by :meth:`forward_with_aux`).
    """

    def __init__(self, config: ProbeModelConfig) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.stem = nn.Conv2d(config.in_channels * (2 if config.group_relative else 1), width, 1)
        self.time = nn.Sequential(
            nn.Linear(config.time_dim, config.time_dim), nn.SiLU(), nn.Linear(config.time_dim, config.time_dim)
        )
        self.stages = nn.ModuleList()
        channels = width
        for index, count in enumerate(config.blocks_per_stage):
            out = width * 2**index
            blocks = nn.ModuleList()
            for _ in range(count):
                blocks.append(FiLMResBlock(channels, out, config.time_dim))
                channels = out
            self.stages.append(blocks)
        self.head = nn.Sequential(
            nn.Linear(2 * channels, channels),
            nn.SiLU(),
            nn.Dropout(config.dropout),
            nn.Linear(channels, 1 + config.aux_outputs),
        )

    def forward(self, features: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Scores ``[B]`` (in the units the network was trained on; see :class:`probe.probe.Probe`)."""
        return self.forward_with_aux(features, sigma)[0]

    def forward_with_aux(self, features: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores ``[B]`` and the auxiliary heads' predictions ``[B, aux_outputs]``."""
        t = self.time(timestep_embedding(sigma.expand(features.shape[0]), self.config.time_dim))
        x = self.stem(features)
        for index, blocks in enumerate(self.stages):
            if index and min(x.shape[-2:]) >= 2:
                x = F.avg_pool2d(x, 2)
            for block in blocks:
                x = block(x, t)
        pooled = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        out = self.head(pooled)
        return out[:, 0], out[:, 1:]


def group_mean(x: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Each row's group mean of ``x`` ``[B, ...]`` (groups given by ids ``[B]``), broadcast back to ``[B, ...]``."""
    _, inverse = torch.unique(group, return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, *x.shape[1:], dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    counts = torch.bincount(inverse).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return (sums / counts)[inverse]


def low_score_weights(target: torch.Tensor, threshold: float, weight: float) -> torch.Tensor:
    """``[B]``: ``weight`` where ``target < threshold`` (the low-score tail), 1 elsewhere."""
    return torch.where(target < threshold, torch.full_like(target, weight), torch.ones_like(target))


def pairwise_ranking_loss(
    scores: torch.Tensor, target: torch.Tensor, group: torch.Tensor, margin: float = 1e-6
) -> tuple[torch.Tensor, int]:
    """RankNet loss over ordered pairs of the same group: ``mean softplus(-(s_i - s_j))`` for ``r_i > r_j``.

    Args:
        scores: ``[B]`` predictions.
        target: ``[B]`` real rewards (any monotone transform gives the same pairs).
        group: ``[B]`` group id (same prompt, different noise).
        margin: reward differences at most this are ties and give no pair.

    Returns:
        The loss (0 when there is no pair) and the number of pairs.
    """
    same = group[:, None] == group[None, :]
    better = (target[:, None] - target[None, :]) > margin
    pairs = same & better
    count = int(pairs.sum())
    if count == 0:
        return scores.sum() * 0.0, 0
    difference = scores[:, None] - scores[None, :]
    return F.softplus(-difference[pairs]).mean(), count


def aux_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the auxiliary heads ``[B, A]`` against standardised reward parts ``[B, A]``, each
    part weighing the same; NaN targets (a part a reward did not return) are left out."""
    known = torch.isfinite(target)
    if not known.any():
        return predicted.sum() * 0.0
    return (predicted[known] - target[known]).square().mean()


def probe_loss(
    scores: torch.Tensor,
    target: torch.Tensor,
    group: torch.Tensor,
    weights: torch.Tensor | None = None,
    rank_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss: weighted MSE + ``rank_weight`` x within-group pairwise ranking loss.

    Args:
        scores: ``[B]`` predictions, in standardised reward units.
        target: ``[B]`` standardised real rewards.
        group: ``[B]`` prompt-group ids.
        weights: ``[B]`` per-sample MSE weights (low-score oversampling); None for uniform.
        rank_weight: weight of the ranking term (0 disables it).

    Returns:
        The scalar loss and detached diagnostics ``{"mse", "rank", "pairs"}``.
    """
    weights = torch.ones_like(target) if weights is None else weights
    mse = (weights * (scores - target).square()).sum() / weights.sum()
    loss = mse
    rank, pairs = scores.sum() * 0.0, 0
    if rank_weight:
        rank, pairs = pairwise_ranking_loss(scores, target, group)
        loss = loss + rank_weight * rank
    return loss, {"mse": mse.item(), "rank": rank.item(), "pairs": float(pairs)}
