"""A run's reward: a weighted sum of named components, evaluated off the training thread.

``RewardSet.submit`` returns a future, so the trainer can score one batch while it samples the next;
``RewardResult.components`` holds every component's every score for logging (``<component>/<key>``).
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from rewards.base import Reward, load_reward


@dataclasses.dataclass
class RewardResult:
    """Scores of B images.

    Attributes:
        total: ``[B]`` weighted sum of each component's main (first) score.
        components: ``"<component>/<key>" -> [B]`` every score each component returned.
        valid: ``[B]`` bool; False where the failure policy dropped the image's group.
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    valid: torch.Tensor


class RewardSet:
    """Weighted components, each ``(name, reward, weight)``; ``name`` prefixes its logged scores."""

    def __init__(self, components: list[tuple[str, Reward, float]], max_workers: int = 1) -> None:
        if not components:
            raise ValueError("a reward set needs at least one component")
        self.components = components
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> RewardResult:
        total = torch.zeros(len(images))
        scores: dict[str, torch.Tensor] = {}
        for name, reward, weight in self.components:
            output = reward(images, prompts, metadata)
            for key, value in output.items():
                scores[f"{name}/{key}"] = value.detach().float().cpu()
            total += weight * next(iter(output.values())).detach().float().cpu()
        return RewardResult(total=total, components=scores, valid=torch.ones(len(images), dtype=torch.bool))

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> Future[RewardResult]:
        """Score on a worker thread; ``images`` are moved to the CPU first so sampling can reuse the GPU."""
        return self._pool.submit(self, images.detach().float().cpu(), list(prompts), list(metadata))

    def close(self) -> None:
        self._pool.shutdown(wait=True)


def build_reward_set(
    spec: str,
    weights: list[float] | None = None,
    kwargs: dict[str, dict] | None = None,
    max_workers: int = 1,
) -> RewardSet:
    """Build from a comma-separated list of registry names / dotted paths, e.g. ``"pickscore,clipscore"``.

    Args:
        spec: components; each is a built-in name or ``package.module:Callable``.
        weights: one per component (default 1 each).
        kwargs: constructor arguments keyed by the component's spec string.

    Raises:
        ValueError: on a length mismatch between components and weights, or kwargs for an unknown component.
    """
    names = [part.strip() for part in spec.split(",") if part.strip()]
    weights = list(weights) if weights else [1.0] * len(names)
    kwargs = kwargs or {}
    if len(weights) != len(names):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(names)} rewards ({names})")
    unknown = set(kwargs) - set(names)
    if unknown:
        raise ValueError(f"reward_kwargs names {sorted(unknown)}, which are not among the rewards {names}")
    components = [(name, load_reward(name, **kwargs.get(name, {})), w) for name, w in zip(names, weights)]
    return RewardSet(components, max_workers=max_workers)
