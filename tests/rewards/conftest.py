"""Fixtures for the reward tests: a tiny random CLIP saved the way hub checkpoints are, built offline, and
reward servers on loopback."""

from __future__ import annotations

import contextlib

import pytest
import torch

from bench.server_faults import served_in_thread, stub_server
from rewards.server import ServerLimits, make_server
from rewards.shapes import vocabulary
from rl.tiny_flux import build_tokenizers

CLIP_TEXT_LENGTH = 16
CLIP_IMAGE_SIZE = 32
CLIP_PROJECTION = 16


def build_tiny_clip(folder, seed: int = 0) -> None:
    """A random CLIPModel (1 layer per tower, 32x32 images, 16-d projection), its tokenizer and image processor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer, _ = build_tokenizers(vocabulary() + ["hello", "sign", "says", "open"], CLIP_TEXT_LENGTH)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": CLIP_TEXT_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": CLIP_IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=CLIP_PROJECTION,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    crop = {"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}
    CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE}, crop_size=crop).save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """Folder of a tiny random CLIP (model, tokenizer, image processor) in ``save_pretrained`` layout."""
    folder = tmp_path_factory.mktemp("tiny_clip")
    build_tiny_clip(folder)
    return str(folder)


@pytest.fixture
def images() -> torch.Tensor:
    """Six fixed 48x40 images in [0, 1] on an 8-bit grid (so PNG and PIL round trips are exact)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (6, 3, 48, 40), generator=generator).float() / 255


@pytest.fixture
def serve():
    """Start servers in threads; ``serve(reward, limits=...)`` or ``serve(handler=...)`` returns the base URL."""
    with contextlib.ExitStack() as servers:

        def start(reward=None, handler=None, limits: ServerLimits | None = None) -> str:
            if handler is not None:
                return servers.enter_context(stub_server(handler))
            return servers.enter_context(served_in_thread(make_server(reward, "test", limits=limits)))

        yield start
