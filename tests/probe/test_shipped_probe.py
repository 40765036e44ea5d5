"""The shipped probe loads onto the shipped tiny model and predicts from a real capture."""

import json
from pathlib import Path

import pytest
import torch

from probe.probe import Probe, ProbeMismatchError, sampler_signature
from rl.sampler import FluxSampler, encode_prompts

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "assets" / "probe" / "tiny-flux-shapes-step2.pt"
PIPELINE = ROOT / "assets" / "tiny-flux-shapes"


def _predicts_from_a_real_capture(probe: Probe, sampler: FluxSampler, pipeline) -> None:
    """Two prompts x two seeds run to the probe's capture step; the probe scores each (groups: the prompts)."""
    embeds = encode_prompts(pipeline, ["a red circle", "two blue squares"], max_sequence_length=16)
    prompt_index = torch.tensor([0, 0, 1, 1])
    recorder = probe.recorder(sampler)
    early = sampler.advance(
        sampler.start(prompt_index, torch.arange(4)), embeds, until_step=probe.capture_step, observer=recorder
    )
    predicted = probe.score(recorder.result(early), embeds.token_mask[prompt_index], group=prompt_index)
    assert predicted.shape == (4,) and torch.isfinite(predicted).all()


@pytest.mark.skipif(not PROBE.exists(), reason="no shipped probe (launch/probe_train.py writes it)")
def test_shipped_probe_fits_the_shipped_model():
    from diffusers import FluxPipeline

    assert PROBE.stat().st_size < 1024 * 1024
    pipeline = FluxPipeline.from_pretrained(PIPELINE, torch_dtype=torch.float32)
    probe = Probe.load(PROBE, pipeline.transformer, capture_step=2, num_steps=10)
    assert probe.meta.grid == (8, 8) and probe.meta.text_length == 16
    assert {"pcc", "auc", "within_group_srcc", "top_half_recall", "regret"} <= set(probe.meta.metrics)
    assert json.loads(PROBE.with_suffix(".json").read_text())["test"] == probe.meta.metrics
    with pytest.raises(ProbeMismatchError, match="capture step 2, not 3"):
        Probe.load(PROBE, pipeline.transformer, capture_step=3, num_steps=10)

    sampler = FluxSampler(pipeline, num_steps=10, noise_level=0.9, guidance_scale=3.5, height=64, width=64)
    _predicts_from_a_real_capture(probe, sampler, pipeline)


def test_the_large_window_probe_ranks_under_the_trainers_sampler():
    """The probe trained on 58k rollouts of the trainer's sampler, with auxiliary heads (bench/RESULTS.md, "Probe
    training data and auxiliary targets"): it loads under the trainer's sampler and predicts from a real capture."""
    from diffusers import FluxPipeline

    path = ROOT / "assets" / "probe" / "tiny-flux-shapes-window-step4-58k.pt"
    assert path.stat().st_size < 1024 * 1024
    pipeline = FluxPipeline.from_pretrained(PIPELINE, torch_dtype=torch.float32)
    sampler = FluxSampler(pipeline, 10, 0.9, 3.5, 64, 64, sde_steps=[0, 1, 2])
    probe = Probe.load(
        path, pipeline.transformer, capture_step=4, num_steps=10, sampler=sampler_signature(sampler, "bf16")
    )
    assert probe.model_config.aux_outputs == 4 and probe.model_config.group_relative
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["test"] == probe.meta.metrics and summary["train_rollouts"] > 50_000
    assert probe.meta.metrics["within_group_srcc"] > 0.34  # the shipped probe of 4k rollouts: 0.164
    _predicts_from_a_real_capture(probe, sampler, pipeline)
