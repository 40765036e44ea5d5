"""launch/train_tiny_flux.py: builds, trains, evaluates, resumes and writes a loadable FluxPipeline."""

import functools
import json

import pytest
import torch
from diffusers import FluxPipeline


@pytest.fixture
def train_tiny_flux(run_launch_script):
    return functools.partial(run_launch_script, "train_tiny_flux")


def test_trains_resumes_and_writes_a_loadable_pipeline(train_tiny_flux, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    common = ["--work_dir", str(work), "--out", str(out), "--vae_steps", "2", "--vae_batch", "2", "--batch", "2",
              "--dataset_size", "64", "--category_weights", "position=3", "--eval_every", "2", "--threads", "1"]  # fmt: skip
    train_tiny_flux(*common, "--transformer_steps", "2")
    first = json.loads((out / "training_log.json").read_text())
    assert [record["step"] for record in first["history"]] == [2]
    assert 0.0 <= first["history"][0]["heldout_score"] <= 1.0
    # The cached dataset is named by its size and category mix, so another mix never reuses it.
    assert (work / "latents-64-position3.pt").exists()
    dataset = torch.load(work / "latents-64-position3.pt", weights_only=True)
    assert dataset["latents"].shape == (64, 16, 16, 16)

    # A larger step count resumes from the saved state instead of starting over.
    train_tiny_flux(*common, "--transformer_steps", "4")
    second = json.loads((out / "training_log.json").read_text())
    assert [record["step"] for record in second["history"]] == [2, 4]
    pipe = FluxPipeline.from_pretrained(out)
    assert type(pipe.transformer).__name__ == "FluxTransformer2DModel"


def test_unknown_category_weight_fails_by_name(train_tiny_flux, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_tiny_flux("--work_dir", str(tmp_path), "--category_weights", "squares=2")
    assert "squares" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_tiny_flux("--work_dir", str(tmp_path), "--category_weights", "position")
    assert "category=weight" in capsys.readouterr().err
