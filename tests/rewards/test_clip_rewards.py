"""CLIPScore, PickScore and the aesthetic predictor on a tiny random CLIP built and saved locally."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rewards.base import load_reward, resolve_file
from rewards.clip import ClipEmbedder, mlp_from_state_dict

CLIP_PROJECTION = 16  # the tiny CLIP of conftest.py
PROMPTS = ["a red circle", "a blue square", "a red circle", "two green triangles", "a cyan cross", "a red circle"]
METADATA = [{}] * 6


def score_in_halves(reward, images, prompts):
    first = reward(images[:3], prompts[:3], METADATA[:3])
    second = reward(images[3:], prompts[3:], METADATA[3:])
    return {key: torch.cat([first[key], second[key]]) for key in first}


def save_head(path, widths=(CLIP_PROJECTION, 32, 8, 1), seed=0):
    """An aesthetic head in the LAION/DDPO layout: Linear layers at even indices, keys prefixed 'layers.'."""
    torch.manual_seed(seed)
    layers = []
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(width_in, width_out), nn.Dropout(0.1)]
    head = nn.Sequential(*layers[:-1])
    torch.save({f"layers.{k}": v for k, v in head.state_dict().items()}, path)
    return head


def test_embedder_embeddings_are_unit_norm_and_prompts_cached(tiny_clip, images):
    clip = ClipEmbedder(tiny_clip)
    image_embeddings = clip.embed_images(images)
    text_embeddings = clip.embed_texts(PROMPTS)
    assert image_embeddings.shape == text_embeddings.shape == (6, CLIP_PROJECTION)
    assert torch.allclose(image_embeddings.norm(dim=-1), torch.ones(6), atol=1e-5)
    assert torch.equal(text_embeddings[0], text_embeddings[2])
    assert clip.dtype == torch.float32 and clip.device.type == "cpu"


def test_clipscore(tiny_clip, images):
    reward = load_reward("clipscore", model=tiny_clip)
    scores = reward(images, PROMPTS, METADATA)
    assert list(scores) == ["score", "cosine"] and scores["score"].shape == (6,)
    assert (scores["cosine"].abs() <= 1).all()
    assert torch.allclose(scores["score"], 2.5 * scores["cosine"].clamp(min=0))
    assert torch.equal(reward(images, PROMPTS, METADATA)["cosine"], scores["cosine"])  # deterministic
    halves = score_in_halves(reward, images, PROMPTS)
    assert torch.allclose(halves["cosine"], scores["cosine"], atol=1e-5)


def test_pickscore_is_logit_scale_times_cosine(tiny_clip, images):
    reward = load_reward("pickscore", model=tiny_clip, processor=tiny_clip)
    scores = reward(images, PROMPTS, METADATA)["score"]
    clip = reward.clip
    cosine = (clip.embed_images(images) * clip.embed_texts(PROMPTS)).sum(-1)
    assert clip.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)  # CLIP's initial temperature
    assert torch.allclose(scores, clip.logit_scale * cosine)
    assert (scores.abs() <= clip.logit_scale + 1e-4).all()
    assert torch.allclose(score_in_halves(reward, images, PROMPTS)["score"], scores, atol=1e-4)
    scaled = load_reward("pickscore", model=tiny_clip, processor=tiny_clip, scale=1 / 26)
    assert torch.allclose(scaled(images, PROMPTS, METADATA)["score"], scores / 26, atol=1e-5)


def test_aesthetic_from_local_file_and_folder(tiny_clip, images, tmp_path):
    head = save_head(tmp_path / "head.pth").eval()
    reward = load_reward("aesthetic", model=tiny_clip, head=str(tmp_path / "head.pth"))
    scores = reward(images, PROMPTS, METADATA)["score"]
    expected = head(ClipEmbedder(tiny_clip).embed_images(images)).squeeze(-1)
    assert scores.shape == (6,) and torch.allclose(scores, expected, atol=1e-6)
    assert torch.allclose(score_in_halves(reward, images, PROMPTS)["score"], scores, atol=1e-5)
    from_folder = load_reward("aesthetic", model=tiny_clip, head=str(tmp_path), head_file="head.pth")
    assert torch.equal(from_folder(images, PROMPTS, METADATA)["score"], scores)


def test_aesthetic_head_layout_of_the_laion_file():
    torch.manual_seed(0)
    laion = nn.Sequential(
        nn.Linear(768, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
        nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
    )  # fmt: skip
    head = mlp_from_state_dict({f"layers.{k}": v for k, v in laion.state_dict().items()})
    assert [type(m).__name__ for m in head] == [type(m).__name__.replace("Dropout", "Identity") for m in laion]
    x = torch.randn(2, 768)
    assert torch.allclose(head(x), laion.eval()(x))
    with pytest.raises(ValueError, match="not an MLP head"):
        mlp_from_state_dict({"weird": torch.ones(1)})


def test_aesthetic_head_width_mismatch(tiny_clip, tmp_path):
    save_head(tmp_path / "head.pth", widths=(768, 16, 1))
    with pytest.raises(ValueError, match="takes 768-d embeddings .* gives 16-d"):
        load_reward("aesthetic", model=tiny_clip, head=str(tmp_path / "head.pth"))


def test_missing_weights_say_what_to_pass(tmp_path):
    with pytest.raises(OSError, match=r"cannot load the CLIP model from .*reward_kwargs 'model'.*HF_HUB_OFFLINE"):
        load_reward("clipscore", model=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="aesthetic head: cannot find 'aesthetic-model.pth'"):
        resolve_file(str(tmp_path / "nowhere"), "aesthetic-model.pth", "aesthetic head")


def test_half_precision_path(tiny_clip, images):
    """The GPU path's casts (weights and pixels in bf16, scores back in fp32), exercised on the CPU."""
    full = load_reward("clipscore", model=tiny_clip)(images, PROMPTS, METADATA)["cosine"]
    reward = load_reward("clipscore", model=tiny_clip, dtype="bf16")
    assert reward.clip.model.dtype == torch.bfloat16
    half = reward(images, PROMPTS, METADATA)["cosine"]
    assert half.dtype == torch.float32 and torch.allclose(half, full, atol=0.05)


def test_pickscore_in_bf16_keeps_the_checkpoints_logit_scale(tiny_clip):
    """Cast to bf16 first, exp(logit_scale) read 14.24 for 14.29 (PickScore's 100: 98.9); it is read before."""
    reward = load_reward("pickscore", model=tiny_clip, processor=tiny_clip, dtype="bf16")
    assert reward.clip.model.dtype == torch.bfloat16
    assert reward.clip.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-4)  # bf16 would be 3e-3 off
