"""The probe entry scripts end to end on the tiny random FLUX fixture: collect, resume, train, load."""

import json
import subprocess
import sys
from pathlib import Path

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
    run_launch_script("probe_train", *data, "--capture_step", "2", "--steps", "3", "--eval_every", "1", "--val_fraction",
                      "0.5", "--width", "8", "--aux_targets", "shapes/objects", "shapes/extras", "--out", str(out))  # fmt: skip
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["test_rollouts"] == 4 and summary["train_rollouts"] == 2
    assert summary["auc_label"].startswith("real reward > median")
    probe = Probe.load(out, tiny_flux_pipeline.transformer, capture_step=2, num_steps=2)
    assert probe.meta.metrics == summary["test"] and probe.meta.base_model == str(tmp_path / "base")
    assert probe.meta.capture_step == 2 and probe.meta.blocks == (0, 1, 2) and probe.feature_config.x0
    assert "held-out (4 rollouts)" in capsys.readouterr().out
    assert torch.load(out, weights_only=True)["format_version"] == 1
    assert probe.model_config.aux_outputs == 2 and summary["args"]["aux_targets"] == ["shapes/objects", "shapes/extras"]
    with pytest.raises(ValueError, match=rf"^{out} exists; choose another --out, or pass --overwrite true"):
        run_launch_script("probe_train", *data, "--capture_step", "2", "--out", str(out))
    with pytest.raises(ValueError, match=r"the data has capture steps \[1, 2\] .*: pass --capture_step with one"):
        run_launch_script("probe_train", *data, "--out", str(tmp_path / "other.pt"))
    with pytest.raises(ValueError, match="no reward component 'shapes/colour'; it has .*'shapes/objects'"):
        run_launch_script("probe_train", *data, "--capture_step", "2", "--aux_targets", "shapes/colour", "--out",
                          str(out), "--overwrite", "true")  # fmt: skip


ROOT = Path(__file__).resolve().parents[2]


def run_script(name: str, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "launch" / f"{name}.py"), *argv], capture_output=True,
                          text=True, timeout=300, env={**__import__("os").environ, "GRPO_DEBUG": ""})  # fmt: skip


def test_a_misspelled_collect_option_is_one_line_with_the_closest_and_exit_2(tmp_path):
    done = run_script("probe_collect", "--num_promts", "2", "--out", str(tmp_path / "c"))
    assert done.returncode == 2
    assert done.stderr == "error: unknown config key 'num_promts' in the command line; did you mean 'num_prompts'?\n"


def test_capture_steps_beyond_the_sampler_are_refused_before_sampling(launch_script):
    collect = launch_script("probe_collect")
    with pytest.raises(ValueError, match=r"^capture_steps \[12\] must lie in \[1, num_steps = 10\]"):
        collect.parse_args(["--capture_steps", "12"])
    with pytest.raises(ValueError, match=r"^capture_steps \[0, 5\] must lie in \[1, num_steps = 4\]"):
        collect.parse_args(["--num_steps", "4", "--capture_steps", "0", "2", "5"])
    assert collect.parse_args(["--num_steps", "4", "--capture_steps", "4", "1"]).capture_steps == [4, 1]


def test_no_collection_is_one_line_naming_the_folder_and_the_collect_script(tmp_path):
    done = run_script("probe_train", "--train_data", str(tmp_path / "nodata"), "--out", str(tmp_path / "p.pt"))
    assert done.returncode == 2
    assert done.stderr == (
        f"error: {tmp_path / 'nodata'} holds no probe data (no manifest.json); collect it with python "
        f"launch/probe_collect.py --config <run config> --out {tmp_path / 'nodata'}\n"
    )


def collections(tmp_path, **steps):
    for name, captured in steps.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps({"capture_steps": captured}))
    return [str(tmp_path / name) for name in steps]


def test_the_capture_step_defaults_to_the_datas_only_one(tmp_path, launch_script):
    train = launch_script("probe_train")
    train_dir, test_dir, other = collections(tmp_path, train=[3, 4], test=[4], other=[3])
    assert train.resolve_capture_step(None, [train_dir, test_dir]) == 4  # the only step both hold
    assert train.resolve_capture_step(3, [train_dir]) == 3
    with pytest.raises(ValueError, match=rf"^the data has capture steps \[3, 4\] \({train_dir}: \[3, 4\]\): pass "
                                         "--capture_step with one of them$"):  # fmt: skip
        train.resolve_capture_step(None, [train_dir])
    with pytest.raises(ValueError, match=r"^--capture_step 2: the data has capture steps \[3, 4\]"):
        train.resolve_capture_step(2, [train_dir])
    with pytest.raises(ValueError, match="the collections share no capture step"):
        train.resolve_capture_step(None, [test_dir, other])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--features", "atention"], r"^unknown feature set 'atention'; choose from \['all', 'attention', "),
        (["--capture_step", "2"], r"^--capture_step 2: the data has capture steps \[4\]"),
    ],
)
def test_probe_train_user_errors_come_before_training(argv, message, tmp_path, launch_script):
    train_dir, test_dir = collections(tmp_path, train=[4], test=[4])
    with pytest.raises(ValueError, match=message):
        launch_script("probe_train").main(["--train_data", train_dir, "--test_data", test_dir, *argv])


def test_probe_train_never_replaces_a_probe_file_unasked(tmp_path, launch_script):
    train_dir, test_dir = collections(tmp_path, train=[4], test=[4])
    shipped = tmp_path / "shipped.pt"
    shipped.write_bytes(b"a committed probe")
    argv = ["--train_data", train_dir, "--test_data", test_dir, "--out", str(shipped)]
    with pytest.raises(ValueError, match=rf"^{shipped} exists; choose another --out, or pass --overwrite true"):
        launch_script("probe_train").main(argv)
    assert shipped.read_bytes() == b"a committed probe"
    with pytest.raises(ValueError, match=r"^--capture_step 2: the data has"):  # past the check, to the data
        launch_script("probe_train").main([*argv, "--overwrite", "true", "--capture_step", "2"])


def test_the_probe_commands_write_no_shipped_asset(launch_script):
    docs = (ROOT / "docs" / "experiments.md").read_text() + launch_script("probe_train").__doc__
    assert "--out assets/" not in docs
