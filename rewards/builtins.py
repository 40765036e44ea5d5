"""Registers the built-in rewards (importing this module fills ``rewards.base.REGISTRY``)."""

from __future__ import annotations

import torch

from rewards.base import register
from rewards.shapes import PromptSpec, check


@register("shapes")
class ShapesReward:
    """The shapes world's GenEval-like checker: ``score`` (partial credit in [0, 1]) and ``correct`` (0/1).

    Needs each image's metadata in the shapes world's format (``rewards.shapes.grammar``).
    """

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        if len(metadata) != len(images) or any("include" not in m for m in metadata):
            raise ValueError("the shapes reward needs shapes-world metadata ('include' entries) for every image")
        results = [check(image, PromptSpec.from_dict(meta)) for image, meta in zip(images, metadata)]
        return {
            "score": torch.tensor([r.score for r in results], dtype=torch.float32),
            "correct": torch.tensor([float(r.correct) for r in results], dtype=torch.float32),
        }
