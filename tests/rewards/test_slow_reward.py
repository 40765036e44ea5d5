"""The ``slow`` built-in: another reward's scores, after a delay per image."""

import time

import pytest
import torch

from rewards.base import load_reward


def test_slow_reward_sleeps_per_image_and_returns_the_wrapped_scores():
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts, metadata = [""] * 4, [{}] * 4
    slow = load_reward("slow", reward="jpeg_compressibility", seconds_per_image=0.05)
    started = time.perf_counter()
    scores = slow(images, prompts, metadata)
    assert time.perf_counter() - started >= 0.2
    expected = load_reward("jpeg_compressibility")(images, prompts, metadata)
    assert scores.keys() == expected.keys() and all(torch.equal(scores[k], expected[k]) for k in scores)
    with pytest.raises(ValueError, match="seconds_per_image"):
        load_reward("slow", seconds_per_image=-1)
