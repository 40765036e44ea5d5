"""The probe entry scripts end to end on the tiny random FLUX fixture: collect, resume, train, load."""

import json

import pytest
import torch

from probe.data import read_manifest
from probe.probe import Probe


def test_collect_then_train_from_the_command_line(tiny_flux_pipeline, tmp_path, capsys, run_launch_script):
    tiny_flux_pipeline.save_pretrained(tmp_path / "base")
    common = ["--pipeline", str(tmp_path / "base"), "--num_prompts", "2", "--group_size", "2", "--num_steps", "2",
              "--capture_steps", "2", "1", "--prompts_per_shard", "1", "--batch_size", "4", "--device", "cpu"]  # fmt: skip
    run_launch_script("probe_collect", *common, "--out", str(tmp_path / "train"))
    run_launch_script("probe_collect", *common, "--out", str(tmp_path / "train"))  # resumes: nothing to do
    run_launch_script(
        "probe_collect", *common, "--prompts", "shapes:test", "--seed", "1", "--out", str(tmp_path / "test")
    )
    manifest = read_manifest(tmp_path / "train")
    assert manifest["capture_steps"] == [1, 2] and manifest["resolution"] == 32 and manifest["text_length"] == 16
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == [
        "manifest.json",
        "shard_00000.pt",
        "shard_00001.pt",
    ]

    out = tmp_path / "probe" / "p.pt"
    data = ["--train_data", str(tmp_path / "train"), "--test_data", str(tmp_path / "test")]
    run_launch_script("probe_train", *data, "--steps", "3", "--eval_every", "1", "--val_fraction", "0.5",
                      "--width", "8", "--aux_targets", "shapes/objects", "shapes/extras", "--out", str(out))  # fmt: skip
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["test_rollouts"] == 4 and summary["train_rollouts"] == 2
    assert summary["auc_label"].startswith("real reward > median")
    probe = Probe.load(out, tiny_flux_pipeline.transformer, capture_step=2, num_steps=2)
    assert probe.meta.metrics == summary["test"] and probe.meta.base_model == str(tmp_path / "base")
    assert probe.meta.capture_step == 2 and probe.meta.blocks == (0, 1, 2) and probe.feature_config.x0
    assert "held-out (4 rollouts)" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["format_version"] == 1
    assert probe.model_config.aux_outputs == 2 and summary["args"]["aux_targets"] == ["shapes/objects", "shapes/extras"]
    with pytest.raises(KeyError, match="no reward component 'shapes/colour'; it has .*'shapes/objects'"):
        run_launch_script("probe_train", *data, "--aux_targets", "shapes/colour", "--out", str(out))
