"""ImageReward and HPSv2 wrappers: the missing-extra errors, and the batching glue on stand-in packages.

The real packages need torchvision and multi-GB weights, so these tests install small stand-ins with the
same API in ``sys.modules`` (``ImageReward.load`` / ``score_gard``; ``open_clip.create_model_and_transforms``
/ ``get_tokenizer`` / ``encode_image`` / ``encode_text``) and check the wrappers against per-image scoring.
"""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch import nn

from rewards.base import MissingExtraError, load_reward

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a red circle", "a cyan cross", "a square"]


def pil_to_tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image.resize((8, 8)))).permute(2, 0, 1).float() / 255


class FakeTokens(dict):
    __getattr__ = dict.__getitem__

    def to(self, device):
        return self


class FakeBlipTokenizer:
    def __call__(self, prompts, padding, truncation, max_length, return_tensors):
        assert padding == "max_length" and max_length == 35
        ids = torch.tensor([[len(p), len(p.split())] for p in prompts], dtype=torch.float32)
        return FakeTokens(input_ids=ids, attention_mask=torch.ones_like(ids))


class FakeImageRewardModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([0.5, 0.1]))
        self.blip = types.SimpleNamespace(tokenizer=FakeBlipTokenizer())
        self.preprocess = pil_to_tensor

    def score_gard(self, prompt_ids, prompt_attention_mask, image):
        return (image.mean(dim=(1, 2, 3)) + prompt_ids @ self.weight)[:, None]  # [B, 1] like the real one


class FakeOpenClipModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.image_proj = nn.Linear(3 * 8 * 8, 4)
        self.text_proj = nn.Linear(2, 4)

    def encode_image(self, pixels, normalize=False):
        return nn.functional.normalize(self.image_proj(pixels.flatten(1)), dim=-1)

    def encode_text(self, tokens, normalize=False):
        return nn.functional.normalize(self.text_proj(tokens.float()), dim=-1)


@pytest.fixture
def fake_image_reward(monkeypatch):
    module = types.ModuleType("ImageReward")
    module.calls = []

    def load(name, device, download_root=None, med_config=None):
        module.calls.append((name, device, med_config))
        return FakeImageRewardModel()

    module.load = load
    monkeypatch.setitem(sys.modules, "ImageReward", module)
    return module


@pytest.fixture
def fake_open_clip(monkeypatch, tmp_path):
    module = types.ModuleType("open_clip")
    torch.manual_seed(0)
    trained = FakeOpenClipModel()
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "HPS_v2.1_compressed.pt")
    module.trained = trained
    module.create_model_and_transforms = lambda arch, pretrained=None: (FakeOpenClipModel(), None, pil_to_tensor)
    module.get_tokenizer = lambda arch: lambda prompts: torch.tensor([[len(p), len(p.split())] for p in prompts])
    monkeypatch.setitem(sys.modules, "open_clip", module)
    return module


@pytest.mark.parametrize(
    ("name", "module", "extra"), [("imagereward", "ImageReward", "imagereward"), ("hpsv2", "open_clip", "hpsv2")]
)
def test_missing_extra(monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(MissingExtraError, match=rf"the {name} reward needs.*pip install 'flux-probe-grpo\[{extra}\]'"):
        load_reward(name)


def test_imagereward_batches_match_single_images(fake_image_reward, images):
    reward = load_reward("imagereward", model="/weights/ImageReward.pt", med_config="/weights/med.json", batch_size=4)
    assert fake_image_reward.calls == [("/weights/ImageReward.pt", "cpu", "/weights/med.json")]
    scores = reward(images, PROMPTS, [{}] * 6)["score"]
    single = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1], [{}])["score"] for i in range(6)])
    assert scores.shape == (6,) and torch.allclose(scores, single)


def test_hpsv2_loads_checkpoint_and_scores_cosines(fake_open_clip, images, tmp_path):
    reward = load_reward("hpsv2", checkpoint=str(tmp_path / "HPS_v2.1_compressed.pt"), batch_size=4)
    assert torch.equal(reward.model.image_proj.weight, fake_open_clip.trained.image_proj.weight)
    scores = reward(images, PROMPTS, [{}] * 6)["score"]
    single = torch.cat([reward(images[i : i + 1], PROMPTS[i : i + 1], [{}])["score"] for i in range(6)])
    assert torch.allclose(scores, single, atol=1e-6) and (scores.abs() <= 1).all()
    from_folder = load_reward("hpsv2", checkpoint=str(tmp_path), version="v2.1")
    assert torch.allclose(from_folder(images, PROMPTS, [{}] * 6)["score"], scores)
    with pytest.raises(ValueError, match="HPS version must be one of"):
        load_reward("hpsv2", version="v3")
