import dataclasses

import pytest
import torch

import probe.collect as collect_module
from probe.collect import CollectSettings, collect
from probe.data import iter_shards, load_dataset, shard_path
from probe.probe import Probe
from probe.train import FitConfig, train_from_collections

SETTINGS = CollectSettings(
    pipeline="fixture", prompts="shapes:train", num_prompts=3, group_size=2, num_steps=2, capture_steps=[1, 2],
    noise_level=0.8, guidance_scale=3.5, resolution=32, text_length=16, blocks=[], reward="shapes",
    reward_kwargs={}, prompts_per_shard=1, seed=0,
)  # fmt: skip


class Interrupt(Exception):
    pass


def test_collect_resumes_after_interruption_and_trains(tiny_flux_pipeline, tmp_path, monkeypatch):
    out = tmp_path / "train"

    def stop_after_first(index):
        raise Interrupt

    with pytest.raises(Interrupt):
        collect(tiny_flux_pipeline, SETTINGS, out, progress=False, after_shard=stop_after_first)
    assert shard_path(out, 0).exists() and not shard_path(out, 1).exists()
    (out / "shard_00001.pt.tmp").write_bytes(b"partial")  # a write killed half-way leaves only a .tmp
    first = shard_path(out, 0).stat().st_mtime_ns

    calls = []
    original = collect_module._collect_shard
    monkeypatch.setattr(collect_module, "_collect_shard", lambda *a, **k: calls.append(a[5]) or original(*a, **k))
    paths = collect(tiny_flux_pipeline, SETTINGS, out, progress=False)
    assert calls == [1, 2]  # complete shard 0 skipped; groups numbered by prompt draw
    assert shard_path(out, 0).stat().st_mtime_ns == first and all(p.exists() for p in paths)

    shards = list(iter_shards(out))
    assert [s["group"].tolist() for s in shards] == [[0, 0], [1, 1], [2, 2]]
    assert len({s for shard in shards for s in shard["seed"].tolist()}) == 6
    capture = shards[0]["captures"][2]
    assert capture["attention"].shape[:3] == (2, 3, 64) and capture["attention"].dtype == torch.float16
    assert capture["x0"].shape == capture["latents"].shape == (2, 64, 64) and capture["sigma"] < 1

    with pytest.raises(ValueError, match="noise_level"):
        collect(tiny_flux_pipeline, dataclasses.replace(SETTINGS, noise_level=0.5), out, progress=False)
    with torch.no_grad():  # retrained weights, same architecture: resuming would mix two models' data
        weight = next(tiny_flux_pipeline.transformer.parameters()).view(-1)[:1]
        saved = weight.clone()
        weight += 1
        with pytest.raises(ValueError, match="weights"):
            collect(tiny_flux_pipeline, SETTINGS, out, progress=False)
        weight.copy_(saved)

    data = load_dataset(out, 2, "combined")
    assert data.features.shape == (6, 3 * 5 + 8 + 64, 8, 8) and data.group.tolist() == [0, 0, 1, 1, 2, 2]
    test_dir = tmp_path / "test"
    collect(tiny_flux_pipeline, dataclasses.replace(SETTINGS, prompts="shapes:test", seed=1), test_dir, progress=False)
    fit_config = FitConfig(steps=3, batch_groups=2, select_metric="within_group_srcc", eval_every=1)
    probe, report = train_from_collections(
        [str(out)], [str(test_dir)], 2, "combined", fit_config, {"width": 8}, val_fraction=0.34
    )
    assert report.test_rollouts == 6 and report.train_rollouts == 4 and "within_group_srcc" in report.test
    window_dir = tmp_path / "window"  # the trainer's sde_window_only rollouts: SDE at step 0 only
    collect(tiny_flux_pipeline, dataclasses.replace(SETTINGS, sde_steps=[0]), window_dir, progress=False)
    window_shard = next(iter_shards(window_dir))
    # The same SDE step 0, then an ODE step 1 instead of an SDE one
    assert torch.equal(window_shard["captures"][1]["latents"], shards[0]["captures"][1]["latents"])
    assert not torch.allclose(window_shard["captures"][2]["latents"], shards[0]["captures"][2]["latents"], atol=0.5)
    with pytest.raises(ValueError, match="collections differ in sde_steps"):
        train_from_collections([str(out)], [str(window_dir)], 2, "combined", fit_config, {"width": 8})
    with pytest.raises(ValueError, match=r"3 of the 3 test prompts are training prompts too .*shapes:test"):
        train_from_collections([str(out)], [str(out)], 2, "combined", fit_config, {"width": 8})
    probe.save(tmp_path / "probe.pt")
    loaded = Probe.load(tmp_path / "probe.pt", tiny_flux_pipeline.transformer, capture_step=2, num_steps=2)
    assert loaded.meta.blocks == (0, 1, 2) and loaded.meta.metrics == report.test


def test_a_damaged_shard_is_named_with_what_to_do(tmp_path):
    shard_path(tmp_path, 0).write_bytes(b"PK\x03\x04 cut short")  # a zip header and nothing more
    with pytest.raises(
        ValueError, match=r"probe data shard .*shard_00000\.pt cannot be read: .*re-run .*probe_collect"
    ):
        list(iter_shards(tmp_path))
