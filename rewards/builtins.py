"""Registers the built-in rewards (importing this module fills ``rewards.base.REGISTRY``).

| name | what | needs |
| --- | --- | --- |
| ``shapes`` | the shapes world's GenEval-like checker | shapes-world metadata |
| ``jpeg_compressibility`` / ``jpeg_incompressibility`` | DDPO's JPEG size rewards | nothing |
| ``clipscore`` | CLIPScore, CLIP ViT-L/14 | weights (hub or local) |
| ``pickscore`` | PickScore | weights (hub or local) |
| ``aesthetic`` | LAION aesthetic predictor v2 | weights (hub or local) |
| ``imagereward`` | ImageReward | extra ``imagereward`` |
| ``hpsv2`` | HPSv2 / v2.1 | extra ``hpsv2`` |
| ``ocr`` | OCR accuracy of quoted text | extra ``ocr`` |
| ``remote`` | any reward behind ``launch/reward_server.py`` | a server URL |
| ``slow`` | another reward after a fixed delay per image (a stand-in for a slow judge) | nothing |

Model weights and optional packages load when a reward is built, not when this module is imported.
"""

from __future__ import annotations

import time

import torch

import rewards.clip
import rewards.jpeg
import rewards.ocr
import rewards.packaged
import rewards.remote  # noqa: F401  (each module registers its rewards)
from rewards.base import load_reward, register
from rewards.shapes import PromptSpec, check


@register("shapes")
class ShapesReward:
    """The shapes world's GenEval-like checker: ``score`` (partial credit in [0, 1]), ``correct`` (0/1) and the
    score's parts (``rewards.shapes.checker``): ``objects`` (the named objects' credit in [0, 1]), ``extras``
    (objects of unnamed shapes) and ``relation`` (1 where the prompt's relation holds, 0 where it fails or no
    relation is asked, so a column never holds NaN, which reads as a failed score).

    Needs each image's metadata in the shapes world's format (``rewards.shapes.grammar``).
    """

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        if len(metadata) != len(images) or any("include" not in m for m in metadata):
            raise ValueError("the shapes reward needs shapes-world metadata ('include' entries) for every image")
        results = [check(image, PromptSpec.from_dict(meta)) for image, meta in zip(images, metadata)]
        return {
            "score": torch.tensor([r.score for r in results], dtype=torch.float32),
            "correct": torch.tensor([float(r.correct) for r in results], dtype=torch.float32),
            "objects": torch.tensor([r.object_credit for r in results], dtype=torch.float32),
            "extras": torch.tensor([float(r.extras) for r in results], dtype=torch.float32),
            "relation": torch.tensor([float(bool(r.relation_ok)) for r in results], dtype=torch.float32),
        }


@register("slow")
class SlowReward:
    """Another reward, called after sleeping ``seconds_per_image`` per image: a stand-in for a slow judge (a VLM, a
    detector on another node) when measuring scoring beside sampling (``bench/reward_overlap.py``). The sleep holds
    no CPU, as waiting on a remote judge holds none.

    Args:
        reward: the reward it wraps (a built-in name or ``package.module:Callable``); default the shapes checker.
        seconds_per_image: the delay per image scored.
        reward_kwargs: the wrapped reward's constructor arguments.
    """

    def __init__(self, reward: str = "shapes", seconds_per_image: float = 0.05, reward_kwargs: dict | None = None):
        if seconds_per_image < 0:
            raise ValueError(f"seconds_per_image must be >= 0, got {seconds_per_image}")
        self.reward = load_reward(reward, **(reward_kwargs or {}))
        self.seconds_per_image = seconds_per_image

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        time.sleep(self.seconds_per_image * len(images))
        return self.reward(images, prompts, metadata)
