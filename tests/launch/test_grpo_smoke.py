"""Smoke run of the real entry script on the tiny random FLUX fixture: it trains the LoRA and only the LoRA."""

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors.torch import load_file

from rewards.base import load_reward
from rl.checkpoint import CheckpointWriteError
from rl.metrics_log import read_metrics

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "grpo_flux.py"


@pytest.mark.parametrize("objective", ["flow_grpo", "awm"])
def test_grpo_flux_smoke(tiny_flux_pipeline, tmp_path, launch_script, objective):
    tiny_flux_pipeline.save_pretrained(tmp_path / "base")
    out = tmp_path / "run"
    out.mkdir()  # a finished earlier run's log: a fresh run refuses it unless told to clear it (test_trainer.py)
    (out / "metrics.jsonl").write_text('{"step": 7, "stale": 1}\n')
    trainer = launch_script("grpo_flux").main(
        [
            "--config", str(SCRIPT.parents[1] / "configs" / "tiny_shapes.yaml"),
            "--pretrained", str(tmp_path / "base"), "--height", "32", "--width", "32", "--num_steps", "4",
            "--lora_rank", "4", "--lora_alpha", "8", "--prompts_per_step", "2", "--group_size", "4",
            "--sample_batch_size", "8", "--train_batch_size", "4", "--max_steps", "2", "--eval_every", "1",
            "--eval_num_prompts", "4", "--final_eval_num_prompts", "4", "--learning_rate", "1e-3",
            "--reward", "shapes,jpeg_compressibility", "--reward_weights", "1", "1",
            "--output_dir", str(out), "--wandb_mode", "disabled", "--progress_bar", "false",
            "--mixed_precision", "no", "--policy_objective", objective, "--overwrite_output_dir", "true",
        ]
    )  # fmt: skip

    records = read_metrics(out / "metrics.jsonl")
    assert not any("stale" in r for r in records)
    steps = [r for r in records if "reward/total/mean" in r]
    assert [r["train/step"] for r in steps] == [1, 2]
    for record in steps:
        assert math.isfinite(record["reward/shapes/score/mean"])
        assert math.isfinite(record["reward/jpeg_compressibility/score/mean"])
        if objective == "flow_grpo":  # AWM has no ratio and logs none
            assert abs(record["policy/ratio_first_inner"] - 1) <= 1e-6
            assert record["policy/ratio_first_inner_max_dev"] <= 1e-6
        else:
            assert "policy/ratio_first_inner" not in record and record["policy/matching_error"] > 0
        assert record["time/sample_s"] > 0 and record["perf/images_per_s"] > 0
    assert [r["step"] for r in records if "eval/total/mean" in r] == [1]  # every step, not after the last
    assert [r["step"] for r in records if "base_eval/total/mean" in r] == [0]
    assert [r["step"] for r in records if "final_eval/shapes/score/mean" in r] == [2]
    assert (out / "config.yaml").is_file()
    summary = json.loads((out / "summary.json").read_text())  # before/after on the same prompts and seeds
    assert summary["steps"] == 2 and summary["eval_num_prompts"] == 4
    assert summary == trainer.summary
    base, final = summary["base"]["total/mean"], summary["final"]["total/mean"]
    assert math.isclose(summary["delta"]["total/mean"], final - base)

    # the LoRA moved away from its initial no-op (B = 0), the base transformer did not move at all
    saved = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    lora_b = [v for k, v in saved.items() if "lora_B" in k]
    assert lora_b and any(v.abs().max() > 0 for v in lora_b)
    base = FluxPipeline.from_pretrained(tmp_path / "base").transformer.state_dict()
    trained = {k.replace(".base_layer", ""): v for k, v in trainer.pipeline.transformer.state_dict().items()}
    assert all(torch.equal(base[k], trained[k].cpu()) for k in base)
    FluxPipeline.from_pretrained(tmp_path / "base").load_lora_weights(out / "lora")  # loads in plain diffusers


def test_a_user_error_is_one_line_and_exit_2(tmp_path, launch_script, capsys, monkeypatch):
    monkeypatch.delenv("GRPO_DEBUG", raising=False)
    script = launch_script("grpo_flux")
    assert script.cli(["--learning_rat", "1e-3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "learning_rate" in err[0]  # the closest key
    assert script.cli(["--probe_path", str(tmp_path / "none.pt"), "--prune_policy", "variance",
                       "--capture_step", "4", "--output_dir", str(tmp_path / "run")]) == 2  # fmt: skip
    err = capsys.readouterr().err  # after the pipeline's loading bars: one error line, no traceback
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ") and "none.pt" in err
    monkeypatch.setenv("GRPO_DEBUG", "1")
    with pytest.raises(ValueError, match="learning_rat"):
        script.cli(["--learning_rat", "1e-3"])
    # Ctrl-C outside the training loop (here while the config is read): one line, the shell's status for SIGINT

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(script, "run_config", interrupted)
    assert script.cli([]) == 130
    assert capsys.readouterr().err == (
        "interrupted outside the training loop (setup or an evaluation): the run folder keeps its newest checkpoint, "
        "if any; continue with --resume_from latest\n"
    )
    # SIGTERM (preemption) there: the same message and cleanup instead of a silent exit, the status for SIGTERM

    def terminated(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not raised")

    monkeypatch.setattr(script, "run_config", terminated)
    assert script.cli([]) == 143
    assert capsys.readouterr().err.startswith("SIGTERM outside the training loop (setup or an evaluation): ")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
    # a full disk outside a checkpoint write (the metrics log, the final LoRA): one line with the fix
    monkeypatch.delenv("GRPO_DEBUG")
    for code in (errno.ENOSPC, errno.EIO):

        def disk(*args, code=code, **kwargs):
            raise OSError(code, os.strerror(code), "run/metrics.jsonl")

        monkeypatch.setattr(script, "run_config", disk)
        if code == errno.EIO:  # not the user's to fix: the traceback stays
            with pytest.raises(OSError, match="Input/output error"):
                script.cli([])
            continue
        assert script.cli([]) == 2
        assert capsys.readouterr().err.startswith(
            "error: the disk is full ([Errno 28] No space left on device: 'run/metrics.jsonl'): free space on the "
        )


def test_a_config_error_through_the_command_line_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("max_steps: 2\ngroup_size: 4\nmax_steps: 3\n")  # fails at config load: no model is loaded
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("GRPO_DEBUG", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(config), "--output_dir", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in done.stderr and len(lines) == 1
    assert done.stderr.strip().splitlines() == lines  # and nothing above it (no library import notices)
    assert "run.yaml, line 3: key 'max_steps' is given twice (first on line 1)" in lines[0]


def test_a_reward_plugin_that_cannot_be_imported_is_a_user_error(launch_script, capsys, monkeypatch):
    monkeypatch.delenv("GRPO_DEBUG", raising=False)
    script = launch_script("grpo_flux")

    def plugin_off_the_path(argv):
        load_reward("no_such_module_xyz:Reward")

    monkeypatch.setattr(script, "main", plugin_off_the_path)
    assert script.cli([]) == 2  # a traceback and exit 1 before (found by bench/fault_sweep.py)
    err = capsys.readouterr().err
    assert err.startswith("error: cannot import module 'no_such_module_xyz'") and err.count("\n") == 1


def test_a_failed_checkpoint_write_is_a_user_error(launch_script, capsys, monkeypatch):
    monkeypatch.delenv("GRPO_DEBUG", raising=False)
    script = launch_script("grpo_flux")

    def full_disk(argv):
        raise CheckpointWriteError("could not write checkpoint out/checkpoints/step-00000004: the disk is full")

    monkeypatch.setattr(script, "main", full_disk)
    assert script.cli([]) == 2
    assert (
        capsys.readouterr().err == "error: could not write checkpoint out/checkpoints/step-00000004: the disk is full\n"
    )


def test_a_failing_reward_stops_with_one_line_naming_it_after_a_checkpoint(tiny_flux_pipeline, tmp_path, launch_script,
                                                                            capsys, monkeypatch):  # fmt: skip
    # found by bench/fault_sweep.py: a plain JSONL prompt file has no shapes metadata, so the shapes reward raises
    monkeypatch.delenv("GRPO_DEBUG", raising=False)
    tiny_flux_pipeline.save_pretrained(tmp_path / "base")
    (tmp_path / "plain.jsonl").write_text('{"prompt": "a red circle"}\n')
    out = tmp_path / "run"
    code = launch_script("grpo_flux").cli(
        [
            "--pretrained", str(tmp_path / "base"), "--height", "32", "--width", "32", "--num_steps", "4",
            "--lora_rank", "4", "--lora_alpha", "8", "--prompts_per_step", "2", "--group_size", "2",
            "--sample_batch_size", "4", "--train_batch_size", "4", "--max_steps", "2", "--eval_before_training",
            "false", "--prompts", str(tmp_path / "plain.jsonl"), "--output_dir", str(out), "--wandb_mode",
            "disabled", "--progress_bar", "false", "--mixed_precision", "no",
        ]
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: reward 'shapes' raised ValueError") and "reward_failure_policy" in last
    assert last.endswith("(GRPO_DEBUG=1 shows the reward's traceback)")
    assert (out / "checkpoints" / "step-00000000").is_dir()  # the failed step's run is kept, resumable
    # and none of the failed step's work is in it: the resumed run samples that step again, and must not count its
    # transformer calls, images and decodes twice (budgets in images or FLUX compute would end early)
    state = torch.load(out / "checkpoints" / "step-00000000" / "trainer_state.pt", weights_only=True)["state"]
    assert state["transformer_calls"] == state["images_denoised"] == state["decodes"] == state["images_seen"] == 0


HANGING_REWARD = '''
import threading


class Hangs:
    """A deadlocked judge: its first call never returns."""

    def __call__(self, images, prompts, metadata):
        threading.Event().wait()
'''


@pytest.mark.parametrize("where", ["step", "evaluation"])
def test_a_hung_reward_stops_the_run_within_reward_timeout_s_after_a_checkpoint(tiny_flux_pipeline, tmp_path, where):
    tiny_flux_pipeline.save_pretrained(tmp_path / "base")
    (tmp_path / "hanging_reward.py").write_text(HANGING_REWARD)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tmp_path), str(SCRIPT.parents[1])]))
    env.pop("GRPO_DEBUG", None)
    if where == "evaluation":  # the base evaluation's reward hangs; with GRPO_DEBUG the traceback, not a hang
        env["GRPO_DEBUG"] = "1"
    done = subprocess.run(
        [
            sys.executable, str(SCRIPT), "--pretrained", str(tmp_path / "base"), "--height", "32", "--width", "32",
            "--num_steps", "4", "--lora_rank", "4", "--lora_alpha", "8", "--prompts_per_step", "2", "--group_size",
            "2", "--sample_batch_size", "4", "--train_batch_size", "4", "--max_steps", "2", "--eval_before_training",
            str(where == "evaluation").lower(), "--eval_num_prompts", "2", "--final_eval_num_prompts", "2",
            "--reward", "hanging_reward:Hangs", "--reward_timeout_s", "3", "--output_dir", str(out),
            "--wandb_mode", "disabled", "--progress_bar", "false", "--mixed_precision", "no",
        ],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    # without the limit the run waited forever; with it the process exits although the reward's thread never returns
    assert done.returncode == 2, done.stderr[-2000:]
    message = "reward 'hanging_reward:Hangs' gave no answer within reward_timeout_s=3 s"
    if where == "step":
        assert "Traceback" not in done.stderr and done.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    else:
        assert "Traceback" in done.stderr and f"RewardTimeoutError: {message}" in done.stderr
    assert (out / "checkpoints" / "step-00000000").is_dir()  # what was done is kept: the same command resumes
