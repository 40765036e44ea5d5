import dataclasses
import math

import pytest
import torch

from probe.capture import ProbeCapture
from probe.features import FEATURE_SETS, FeatureConfig, build_features


def _capture(attention, x0=None, grid=(2, 2)):
    return ProbeCapture(attention, x0, sigma=0.9, capture_step=2, blocks=tuple(range(attention.shape[1])), grid=grid)


def test_layout_and_values_by_hand():
    # One block, 2x2 grid, 3 captured text columns; row 0 has 2 real tokens, row 1 has 1.
    attention = torch.tensor(
        [
            [[[0.1, 0.3, 0.5], [0.1, 0.1, 0.5], [0.2, 0.1, 0.5], [0.0, 0.3, 0.5]]],
            [[[0.2, 0.4, 0.4], [0.2, 0.4, 0.4], [0.4, 0.4, 0.4], [0.0, 0.4, 0.4]]],
        ]
    )
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    x0 = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    config = FeatureConfig(token_slots=2)
    features = build_features(_capture(attention, x0), mask, config)
    names = config.channel_names((0,), 3)
    assert names == ["block0/mass", "block0/max", "block0/mean", "block0/std", "block0/entropy", "slot0", "slot1",
                     "x0/0", "x0/1", "x0/2"]  # fmt: skip
    assert features.shape == (2, config.num_channels(1, 3), 2, 2) == (2, 10, 2, 2)
    f = {name: features[:, i].flatten(1) for i, name in enumerate(names)}
    # mass: sum over real tokens only (the padding column 2 is ignored).
    torch.testing.assert_close(f["block0/mass"][0], torch.tensor([0.4, 0.2, 0.3, 0.3]))
    torch.testing.assert_close(f["block0/mass"][1], torch.tensor([0.2, 0.2, 0.4, 0.0]))
    # Token maps normalised to mean 1 over the grid: token 0 of row 0 has mean 0.1 -> [1, 1, 2, 0].
    torch.testing.assert_close(f["slot0"][0], torch.tensor([1.0, 1.0, 2.0, 0.0]))
    torch.testing.assert_close(f["slot1"][0], torch.tensor([0.3, 0.1, 0.1, 0.3]) / 0.2)
    torch.testing.assert_close(f["slot1"][1], torch.zeros(4))  # row 1 has one real token
    torch.testing.assert_close(f["block0/max"][0], torch.tensor([1.5, 1.0, 2.0, 1.5]))
    torch.testing.assert_close(f["block0/mean"][0], torch.tensor([1.25, 0.75, 1.25, 0.75]))
    torch.testing.assert_close(f["block0/std"][0], torch.tensor([0.25, 0.25, 0.75, 0.75]))
    # Entropy over real tokens / log 2: pixel 0 splits 0.1/0.3 -> p = (1/4, 3/4).
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    assert f["block0/entropy"][0, 0].item() == pytest.approx(h, abs=1e-5)
    assert f["block0/entropy"][0, 1].item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(f["block0/entropy"][1], torch.zeros(4))  # one token: no uncertainty
    # x0 on the grid: token i = (i // w, i % w), channel c.
    assert features[1, 7 + 2, 1, 0] == x0[1, 2, 2]


def test_presets_and_errors():
    attention = torch.rand(3, 2, 16, 5)
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, :4] = True
    x0 = torch.randn(3, 16, 64)
    capture = _capture(attention, x0, grid=(4, 4))
    with_latents = build_features(dataclasses.replace(capture, latents=-x0), mask, FeatureConfig(latents=True))
    torch.testing.assert_close(with_latents[:, -64:].flatten(2), -x0.transpose(1, 2))
    stored = dataclasses.replace(capture, latents=-x0)
    sizes = {name: build_features(stored, mask, name).shape for name in FEATURE_SETS}
    assert sizes == {"attention": (3, 2 * 5 + 8, 4, 4), "x0": (3, 64, 4, 4), "combined": (3, 2 * 5 + 8 + 64, 4, 4),
                     "latents": (3, 64, 4, 4), "all": (3, 2 * 5 + 8 + 128, 4, 4)}  # fmt: skip
    torch.testing.assert_close(build_features(stored, mask, "latents"), with_latents[:, -64:])
    combined = build_features(capture, mask, "combined")
    torch.testing.assert_close(combined[:, :18], build_features(capture, mask, "attention"))
    torch.testing.assert_close(combined[:, 18:], build_features(capture, mask, "x0"))
    bad = mask.clone()
    bad[0, 6] = True  # a real token past the 5 captured columns
    with pytest.raises(ValueError, match="beyond"):
        build_features(capture, bad, "attention")
    with pytest.raises(ValueError, match="has none"):
        build_features(_capture(attention, None, grid=(4, 4)), mask, "combined")
    with pytest.raises(ValueError, match="unknown"):
        FeatureConfig(attention_stats=("median",))
