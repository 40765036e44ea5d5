"""Rewards whose models come with their own PyPI packages: ImageReward and HPSv2 (optional extras).

- ``imagereward`` (Xu et al., 2023): BLIP + MLP trained on human preferences; needs the ``image-reward``
  package (``pip install 'flux-probe-grpo[imagereward]'``). Weights: ``"ImageReward-v1.0"`` (downloaded from
  ``THUDM/ImageReward``) or a local checkpoint file. image-reward 1.5 predates transformers 4.56 and fails
  to import with it: serve it from an environment of its own (``launch/reward_server.py``).
- ``hpsv2`` (Wu et al., 2023): an OpenCLIP ViT-H/14 fine-tuned on human preferences; score = cosine of the
  image and prompt embeddings, about 0.2-0.35. Built with ``open_clip_torch``
  (``pip install 'flux-probe-grpo[hpsv2]'``), as DanceGRPO does with the HPSv2 repo's copy of OpenCLIP; the
  ``hpsv2`` PyPI package itself pins ``protobuf<4`` and ``pytest==7.2.0`` and misses its tokenizer file, so
  it is not used. Weights: ``xswu/HPSv2`` on the Hub (``v2.0`` or ``v2.1``) or a local checkpoint file.

Both score batches in one forward pass (the packages' own ``score`` functions loop image by image).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from rewards.base import register, require, resolve_device, resolve_dtype, resolve_file, to_pil


@torch.no_grad()
def score_in_chunks(
    images: torch.Tensor, prompts: list[str], batch_size: int, score: Callable[[list, list[str]], torch.Tensor]
) -> torch.Tensor:
    """``[B]`` fp32 CPU scores from ``score(pil_images, prompts)`` applied to chunks of ``batch_size``."""
    pil = to_pil(images)
    chunks = range(0, len(pil), batch_size)
    return torch.cat(
        [score(pil[i : i + batch_size], prompts[i : i + batch_size]).float().reshape(-1).cpu() for i in chunks]
    )


IMAGEREWARD_HINT = (
    "image-reward 1.5 (PyPI) imports helpers that transformers removed after 4.55, and needs torchvision, "
    "timm 0.6.13 and fairscale: install it in its own environment with transformers<=4.55 and serve it from "
    "there: python launch/reward_server.py --reward imagereward (then --reward remote in the run)."
)
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}


@register("imagereward")
class ImageRewardScore:
    """``score``: ImageReward's normalised preference score (mean 0, std 1 on its training set).

    Args:
        model: ``"ImageReward-v1.0"`` or a local checkpoint file.
        med_config: local ``med_config.json`` (BLIP's text-encoder config); downloaded when omitted.
        download_root: where the package caches downloads (its default ``~/.cache/ImageReward``).
        device, dtype, batch_size: as for the CLIP rewards.
    """

    def __init__(
        self,
        model: str = "ImageReward-v1.0",
        med_config: str | None = None,
        download_root: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 16,
    ) -> None:
        image_reward = require("ImageReward", extra="imagereward", what="imagereward", broken_hint=IMAGEREWARD_HINT)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        net = image_reward.load(model, device=str(self.device), download_root=download_root, med_config=med_config)
        self.model = net.to(self.device, self.dtype).eval().requires_grad_(False)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        return {"score": score_in_chunks(images, prompts, self.batch_size, self._score)}

    def _score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        # The package's own tokenisation and preprocessing (ImageReward.score), batched.
        text = self.model.blip.tokenizer(
            prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt"
        ).to(self.device)
        pixels = torch.stack([self.model.preprocess(image) for image in images]).to(self.device, self.dtype)
        return self.model.score_gard(text.input_ids, text.attention_mask, pixels)


@register("hpsv2")
class HPSv2Score:
    """``score``: HPSv2 (cosine of OpenCLIP ViT-H/14 image and prompt embeddings, fine-tuned on HPD v2).

    Args:
        checkpoint: local checkpoint file (``{"state_dict": ...}``) or ``None`` for the Hub's ``xswu/HPSv2``.
        version: ``"v2.1"`` (default, as DanceGRPO) or ``"v2.0"``; picks the Hub file.
        architecture: the OpenCLIP model name the checkpoint fits.
        device, dtype, batch_size: as for the CLIP rewards.
    """

    def __init__(
        self,
        checkpoint: str | None = None,
        version: str = "v2.1",
        architecture: str = "ViT-H-14",
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 16,
    ) -> None:
        open_clip = require("open_clip", extra="hpsv2", what="hpsv2")
        if version not in HPS_FILES:
            raise ValueError(f"HPS version must be one of {sorted(HPS_FILES)}, got {version!r}")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        model, _, self.preprocess = open_clip.create_model_and_transforms(architecture, pretrained=None)
        checkpoint = resolve_file(checkpoint or "xswu/HPSv2", HPS_FILES[version], "HPSv2 checkpoint")
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state))
        self.model = model.to(self.device, self.dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(architecture)

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        return {"score": score_in_chunks(images, prompts, self.batch_size, self._score)}

    def _score(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images]).to(self.device, self.dtype)
        image_features = self.model.encode_image(pixels, normalize=True).float()
        text_features = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True).float()
        return (image_features * text_features).sum(-1)
