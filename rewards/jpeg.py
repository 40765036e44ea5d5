"""DDPO's JPEG rewards (Black et al., 2023): the size of an image saved as JPEG, a proxy for its detail.

``jpeg_incompressibility`` is the JPEG size in kB (1 kB = 1000 bytes) at quality 95; ``jpeg_compressibility``
is its negation. Images are rounded to 8 bits first, exactly as DDPO does. Offline, no weights.
"""

from __future__ import annotations

import io

import torch

from rewards.base import register, to_pil


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """``[B]`` JPEG size in kB of ``[B, 3, H, W]`` images in [0, 1] saved at ``quality``."""
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


@register("jpeg_incompressibility")
class JpegIncompressibility:
    """``score``: JPEG size in kB at ``quality`` (higher = more detail)."""

    def __init__(self, quality: int = 95) -> None:
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = quality

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        return {"score": jpeg_size_kb(images, self.quality)}


@register("jpeg_compressibility")
class JpegCompressibility(JpegIncompressibility):
    """``score``: minus the JPEG size in kB (higher = smaller file); ``size_kb``: the size itself."""

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
        size = jpeg_size_kb(images, self.quality)
        return {"score": -size, "size_kb": size}
