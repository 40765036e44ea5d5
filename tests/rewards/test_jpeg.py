"""DDPO's JPEG rewards against sizes computed by hand with PIL."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.base import load_reward


def pil_jpeg_kb(array: np.ndarray, quality: int = 95) -> float:
    """DDPO's definition, by hand: HWC uint8 -> JPEG at ``quality`` -> bytes / 1000."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


@pytest.fixture
def fixed_arrays() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    flat = np.full((64, 64, 3), 200, dtype=np.uint8)
    gradient = np.broadcast_to(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 64, 3)).copy()
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return [flat, gradient, noise]


def test_sizes_match_pil(fixed_arrays):
    images = torch.from_numpy(np.stack(fixed_arrays)).permute(0, 3, 1, 2).float() / 255
    incompressibility = load_reward("jpeg_incompressibility")(images, [""] * 3, [{}] * 3)
    compressibility = load_reward("jpeg_compressibility")(images, [""] * 3, [{}] * 3)
    expected = torch.tensor([pil_jpeg_kb(a) for a in fixed_arrays])
    assert torch.allclose(incompressibility["score"], expected)
    assert torch.allclose(compressibility["score"], -expected)
    assert torch.allclose(compressibility["size_kb"], expected)
    flat, gradient, noise = expected.tolist()
    assert flat < gradient < noise  # detail costs bytes


def test_quality_is_configurable(fixed_arrays):
    images = torch.from_numpy(fixed_arrays[2][None]).permute(0, 3, 1, 2).float() / 255
    score = load_reward("jpeg_incompressibility", quality=50)(images, [""], [{}])["score"]
    assert score.item() == pytest.approx(pil_jpeg_kb(fixed_arrays[2], 50))
    with pytest.raises(ValueError, match="quality must be in"):
        load_reward("jpeg_incompressibility", quality=0)


def test_batch_invariance(images):
    reward = load_reward("jpeg_compressibility")
    whole = reward(images, [""] * 6, [{}] * 6)["score"]
    halves = torch.cat(
        [reward(images[:3], [""] * 3, [{}] * 3)["score"], reward(images[3:], [""] * 3, [{}] * 3)["score"]]
    )
    assert torch.equal(whole, halves)
