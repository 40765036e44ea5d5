"""A probe is bound to the sampler it was trained under: recorded at collection, checked at load."""

import sys
from pathlib import Path

import pytest
import torch

from probe.probe import Probe, ProbeMismatchError, sampler_differences, sampler_signature
from probe.train import collection_sampler
from rl.config_parse import parse_config
from rl.predictors.probe_cnn import ProbePredictor

ROOT = Path(__file__).resolve().parents[2]
FULL_SDE_PROBE = ROOT / "assets" / "probe" / "tiny-flux-shapes-step2.pt"
WINDOW_PROBE = ROOT / "assets" / "probe" / "tiny-flux-shapes-window-step4.pt"
TINY = ROOT / "configs" / "tiny_shapes.yaml"


class FakeSampler:
    num_steps, noise_level, sde_steps, guidance_scale, height, width = 10, 0.9, frozenset({0, 1, 2}), 3.5, 64, 64


def trainer_signature() -> dict:
    return sampler_signature(FakeSampler(), "bf16")


def test_every_difference_is_named():
    probe = Probe.load(WINDOW_PROBE)
    probe.check_sampler(trainer_signature())  # the shipped window probe fits the tiny trainer
    other = {**trainer_signature(), "noise_level": 0.0, "sde_steps": list(range(10)), "precision": "no"}
    with pytest.raises(ProbeMismatchError) as error:
        probe.check_sampler(other, source="p.pt")
    message = str(error.value)
    for expected in ("noise_level: 0.9 -> 0.0", "sde_steps: [0, 1, 2] -> [0, 1, 2, 3", "precision: 'bf16' -> 'no'"):
        assert expected in message
    assert "launch/probe_collect.py --config" in message
    with pytest.raises(ProbeMismatchError, match="noise_level: 0.9 -> 0.0"):  # Probe.load checks it when told
        Probe.load(WINDOW_PROBE, sampler=other)
    assert Probe.load(WINDOW_PROBE, sampler=trainer_signature()).capture_step == 4


def test_without_noise_the_sde_steps_do_not_matter():
    """A deterministic probe collected with a windowed run config loads under inference's all-step sampler."""
    noiseless = {**trainer_signature(), "noise_level": 0.0}
    assert sampler_differences(noiseless, {**noiseless, "sde_steps": list(range(10))}) == []
    assert sampler_differences(trainer_signature(), {**trainer_signature(), "sde_steps": [0]}) == [
        "sde_steps: [0, 1, 2] -> [0]"
    ]


def test_a_probe_from_before_the_record_is_taken_as_all_step_sde():
    legacy = Probe.load(FULL_SDE_PROBE)
    assert legacy.meta.sampler == {} and legacy.recorded_sampler()["sde_steps"] == list(range(10))
    with pytest.raises(ProbeMismatchError, match=r"sde_steps: \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] -> \[0, 1, 2\]"):
        legacy.check_sampler(trainer_signature())
    # a setting recorded later is what collection did then: each rollout its own initial noise
    all_sde = {**trainer_signature(), "sde_steps": list(range(10))}
    legacy.check_sampler(all_sde)
    with pytest.raises(ProbeMismatchError, match=r"\(same_initial_noise: False -> True; probe -> run\)"):
        legacy.check_sampler({**all_sde, "same_initial_noise": True})
    window = Probe.load(WINDOW_PROBE)  # recorded before same_initial_noise was
    assert "same_initial_noise" not in window.meta.sampler
    with pytest.raises(ProbeMismatchError, match=r"same_initial_noise: False -> True"):
        window.check_sampler({**trainer_signature(), "same_initial_noise": True})


def test_the_trainer_refuses_a_probe_of_another_sampler():
    from diffusers import FluxPipeline

    from rl.sampler import FluxSampler

    pipeline = FluxPipeline.from_pretrained(ROOT / "assets" / "tiny-flux-shapes", torch_dtype=torch.float32)
    sampler = FluxSampler(pipeline, 10, 0.9, 3.5, 64, 64, sde_steps=[0, 1, 2])
    base = ["--config", str(TINY), "--prune_policy", "variance", "--predictor", "probe"]
    fits = parse_config([*base, "--probe_path", str(WINDOW_PROBE), "--capture_step", "4"])
    assert ProbePredictor.from_config(fits, sampler).probe.meta.capture_step == 4
    stale = parse_config([*base, "--probe_path", str(FULL_SDE_PROBE), "--capture_step", "2"])
    with pytest.raises(ProbeMismatchError, match="trained under another sampler"):
        ProbePredictor.from_config(stale, sampler)


def test_collection_with_a_run_config_uses_the_trainers_sampler(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "launch"))
    sys.modules.pop("probe_collect", None)
    import probe_collect

    args = probe_collect.parse_args(["--config", str(TINY), "--num_prompts", "3", "--noise_level", "0.5"])
    assert (args.num_prompts, args.noise_level) == (3, 0.5)  # flags win over the run config
    weighted = probe_collect.parse_args(["--config", str(TINY), "--prompt_category_weights", "position=3"])
    assert weighted.prompt_category_weights == "position=3"  # the trainer's draws, weighted as the run's
    assert args.sde_steps == [0, 1, 2] and args.precision == "bf16" and args.dtype == "bfloat16"
    assert (args.resolution, args.text_length, args.group_size) == (64, 16, 8)
    manifest = {"num_steps": args.num_steps, "noise_level": 0.9, "sde_steps": args.sde_steps,
                "guidance_scale": args.guidance_scale, "resolution": args.resolution, "precision": args.precision}  # fmt: skip
    assert collection_sampler(manifest) == trainer_signature()


def test_collection_takes_the_runs_reward_weights_and_refuses_steps_past_the_sampler(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "launch"))
    sys.modules.pop("probe_collect", None)
    import probe_collect

    weighted = tmp_path / "weighted.yaml"
    text = TINY.read_text().replace("\nreward: shapes\n", "\nreward: shapes,jpeg_compressibility\n")
    weighted.write_text(text + "reward_weights: [1.0, 0.05]\n")
    args = probe_collect.parse_args(["--config", str(weighted)])
    assert args.reward_weights == [1.0, 0.05]  # the trainer's total, not an unweighted sum
    with pytest.raises(ValueError, match=r"sde_steps \[10, 11\] must lie in \[0, num_steps - 1 = 9\]"):
        probe_collect.parse_args(["--sde_steps", "10", "11"])  # no noise at all, silently, before


def test_collections_of_another_reward_or_initial_noise_are_not_trained_together(tmp_path):
    from probe.data import write_manifest
    from probe.train import collection_meta

    base = {"fingerprint": "f", "blocks": [1], "text_length": 16, "num_steps": 10, "noise_level": 0.9,
            "sde_steps": [0, 1, 2], "guidance_scale": 3.5, "resolution": 64, "precision": "bf16",
            "pipeline": "p", "reward": "shapes", "reward_kwargs": {}}  # fmt: skip
    write_manifest(tmp_path / "a", base)
    for name, change in (("b", {"reward": "jpeg_compressibility"}), ("c", {"same_initial_noise": True})):
        write_manifest(tmp_path / name, {**base, **change})
        with pytest.raises(ValueError, match=f"collections differ in {next(iter(change))}"):
            collection_meta([str(tmp_path / "a"), str(tmp_path / name)], 4)
    # a probe of shared initial noise is refused where each rollout has its own (inference, the default trainer)
    shared = collection_sampler({**base, "same_initial_noise": True})
    probe = Probe.load(WINDOW_PROBE)
    probe.meta.sampler = shared
    with pytest.raises(ProbeMismatchError, match="same_initial_noise: True -> False"):
        probe.check_sampler(sampler_signature(FakeSampler(), "bf16"))
