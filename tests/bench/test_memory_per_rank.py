"""The FLUX.1-dev memory projection against hand-computed bytes; what a process stores, counted once."""

from types import SimpleNamespace

import pytest
import torch

from bench.memory_per_rank import GIB, ModelCounts, flux_dev_counts, projection
from rl.memory import local_bytes, model_state_mib, optimizer_state_bytes


def test_projection_by_hand():
    counts = ModelCounts(transformer=1000, lora=10, largest_block=100, whole_on_every_rank=50)
    two = {mode: round(values["total_gib"] * GIB) for mode, values in projection(counts, gpus=2).items()}
    # ddp: 2 x 1000 bf16 base + 16 x 10 (fp32 LoRA, gradients, two moments) + 2 x 50 encoders
    assert two["ddp"] == 2000 + 160 + 100
    assert two["zero2"] == 2000 + 40 + 120 / 2 + 100  # gradients and moments split
    assert two["zero3"] == two["fsdp"] == 2000 / 2 + 2 * 200 + 160 / 2 + 100  # plus two gathered bf16 blocks
    one = {mode: round(values["total_gib"] * GIB) for mode, values in projection(counts, gpus=1).items()}
    assert set(one.values()) == {2260}  # on one GPU nothing is split and nothing gathered


def test_flux_dev_counts_from_the_architectures():
    counts = flux_dev_counts()
    assert counts.transformer == 11_901_408_320 and counts.lora == 179_306_496  # as counted on the GPU
    assert 4.9e9 < counts.whole_on_every_rank < 5.0e9  # T5-XXL encoder 4.76B + CLIP-L 0.12B + VAE 0.08B
    assert 3.0e8 < counts.largest_block < 4.0e8  # a double-stream block


def test_model_state_counts_each_tensor_once():
    model = torch.nn.Linear(4, 3)
    model.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([model.bias])
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()
    # a wrapper that hands out its inner optimizer's state (as DeepSpeed's does) is not counted twice
    wrapped = SimpleNamespace(optimizer=SimpleNamespace(state=optimizer.state, optimizer=optimizer))
    assert optimizer_state_bytes(wrapped) == 2 * 3 * 4  # two fp32 moments of the bias; the scalar step is not state
    mib = model_state_mib(model, wrapped)
    assert mib["memory/frozen_mib"] == pytest.approx(12 * 4 / 2**20)
    assert mib["memory/lora_mib"] == pytest.approx(3 * 4 / 2**20)
    assert local_bytes(torch.zeros(5, dtype=torch.bfloat16)) == 10
