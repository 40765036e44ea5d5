import copy
import dataclasses

import pytest
import torch
from diffusers import FluxTransformer2DModel

from probe.capture import ProbeCapture
from probe.features import FeatureConfig
from probe.model import ProbeModelConfig
from probe.probe import Probe, ProbeMeta, ProbeMismatchError, transformer_fingerprint


def _probe(transformer, capture_step=2, blocks=(0, 2)):
    config = FeatureConfig(token_slots=2)
    meta = ProbeMeta(
        "fixture", transformer_fingerprint(transformer), capture_step, 4, blocks, (8, 8), 16, 0.8, "shapes"
    )
    channels = config.num_channels(len(blocks), 64)
    torch.manual_seed(0)
    return Probe(
        ProbeModelConfig(in_channels=channels, width=8),
        config,
        meta,
        torch.rand(channels),
        1 + torch.rand(channels),
        0.5,
        0.2,
    )


def _capture(blocks=(0, 2), step=2):
    torch.manual_seed(1)
    return ProbeCapture(torch.rand(3, len(blocks), 64, 6), torch.randn(3, 64, 64), 0.9, step, blocks, (8, 8))


def test_round_trip_gives_identical_predictions(tiny_flux_pipeline, tmp_path):
    transformer = tiny_flux_pipeline.transformer
    probe = _probe(transformer)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[:, :4] = True
    before = probe.score(_capture(), mask)
    assert before.shape == (3,)
    probe.save(tmp_path / "p.pt")
    loaded = Probe.load(tmp_path / "p.pt", transformer, capture_step=2, num_steps=4)
    assert torch.equal(loaded.score(_capture(), mask), before)
    assert loaded.meta == probe.meta and loaded.feature_config == probe.feature_config
    assert (tmp_path / "p.pt").stat().st_size < 2 * 1024 * 1024


def test_mismatches_are_clear_errors(tiny_flux_pipeline, tmp_path):
    transformer = tiny_flux_pipeline.transformer
    _probe(transformer).save(tmp_path / "p.pt")
    other = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    )  # fmt: skip
    with pytest.raises(ProbeMismatchError, match="fingerprint"):
        Probe.load(tmp_path / "p.pt", other)
    with pytest.raises(ProbeMismatchError, match="capture step 2, not 3"):
        Probe.load(tmp_path / "p.pt", transformer, capture_step=3)
    with pytest.raises(ProbeMismatchError, match="4 sampling steps, not 10"):
        Probe.load(tmp_path / "p.pt", transformer, capture_step=2, num_steps=10)
    probe = Probe.load(tmp_path / "p.pt", transformer)
    with pytest.raises(ProbeMismatchError, match="capture at step 3"):
        probe.score(_capture(step=3), torch.ones(3, 16, dtype=torch.bool))
    # The fingerprint ignores where and by which version the model was saved.
    renamed = copy.deepcopy(transformer)
    renamed.register_to_config(_name_or_path="/elsewhere")
    assert transformer_fingerprint(renamed) == transformer_fingerprint(transformer)


def test_a_damaged_probe_file_is_named_with_what_to_do(tiny_flux_pipeline, tmp_path):
    _probe(tiny_flux_pipeline.transformer).save(tmp_path / "p.pt")
    whole = (tmp_path / "p.pt").read_bytes()
    damaged = {
        "truncated.pt": whole[: len(whole) // 2],  # RuntimeError: failed finding central directory
        "stop.pt": b"\x80\x02.",  # a pickle that stops at once: IndexError: pop from empty list
        "empty.pt": b"",  # EOFError
    }
    for name, data in damaged.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"probe file .*{name} cannot be read: .*probe_train\.py.*probe_path"):
            Probe.load(tmp_path / name, tiny_flux_pipeline.transformer)
    torch.save(torch.zeros(2), tmp_path / "tensor.pt")  # loads, but is no probe
    with pytest.raises(ValueError, match=r"tensor\.pt holds a Tensor"):
        Probe.load(tmp_path / "tensor.pt")
    with pytest.raises(FileNotFoundError, match=r"probe file .*none\.pt does not exist"):
        Probe.load(tmp_path / "none.pt")


def test_group_relative_probe_needs_groups_and_is_batch_invariant(tiny_flux_pipeline, tmp_path):
    probe = _probe(tiny_flux_pipeline.transformer)
    config = dataclasses.replace(probe.model_config, group_relative=True)
    torch.manual_seed(0)
    relative = Probe(config, probe.feature_config, probe.meta, deviation_std=2 * torch.ones(config.in_channels))
    features, group = torch.randn(6, config.in_channels, 8, 8), torch.tensor([0, 0, 0, 1, 1, 1])
    with pytest.raises(ValueError, match="group id"):
        relative.predict(features, 0.9)
    whole = relative.predict(features, 0.9, group)
    torch.testing.assert_close(relative.predict(features, 0.9, group, batch_size=2), whole)
    order = torch.tensor([4, 1, 5, 0, 3, 2])  # groups are found by id, not by position
    torch.testing.assert_close(relative.predict(features[order], 0.9, group[order]), whole[order])
    # The appended channels are the deviations from the group mean over deviation_std.
    x = relative.network_input(features, group)
    expected = (features[:3] - features[:3].mean(0)) / 2
    torch.testing.assert_close(x[:3, config.in_channels :], expected)
    relative.save(tmp_path / "r.pt")
    torch.testing.assert_close(Probe.load(tmp_path / "r.pt").predict(features, 0.9, group), whole)
