"""The GRPO trainer on the tiny random FLUX fixture: exact ratios, step selection, rewards, evaluation."""

import dataclasses
import errno
import json
import logging
import math
import os
import signal
import time

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from rl.batches import trained_steps
from rl.checkpoint import load_state_file, write_manifest
from rl.config_parse import parse_config
from rl.metrics_log import MetricsAccumulator, read_metrics
from rl.sde import matching_log_prob
from rl.train_state import TrainState, budget_spent
from rl.trainer import GRPOTrainer, ScoredRollouts
from rl.trainer_update import NonFiniteGradientError


class HalfNanReward:
    """A reward that fails (NaN) on every prompt containing 'circle' and scores image brightness elsewhere."""

    def __call__(self, images, prompts, metadata):
        scores = images.mean(dim=(1, 2, 3))
        return {"score": torch.where(torch.tensor(["circle" in p for p in prompts]), math.nan, scores)}


def tiny_args(pipeline_dir, output_dir, *extra):
    """Overrides that fit the fixture: 32 px, 4 steps, 2 prompts x 4 rollouts, a rank-4 LoRA."""
    return [
        "--pretrained", str(pipeline_dir), "--max_sequence_length", "16", "--lora_rank", "4", "--lora_alpha", "8",
        "--height", "32", "--width", "32", "--num_steps", "4", "--prompts_per_step", "2", "--group_size", "4",
        "--train_batch_size", "3", "--sample_batch_size", "5", "--max_steps", "1", "--eval_num_prompts", "3",
        "--final_eval_num_prompts", "3", "--eval_every", "0", "--output_dir", str(output_dir),
        "--wandb_mode", "disabled", "--progress_bar", "false",
        "--reward", "shapes,jpeg_compressibility", "--reward_weights", "0", "1",
        *extra,
    ]  # fmt: skip


@pytest.fixture
def pipeline_dir(tiny_flux_pipeline, tmp_path):
    tiny_flux_pipeline.save_pretrained(tmp_path / "pipeline")
    return tmp_path / "pipeline"


def make_trainer(pipeline_dir, tmp_path, *extra) -> GRPOTrainer:
    trainer = GRPOTrainer(parse_config(tiny_args(pipeline_dir, tmp_path / "run", *extra)))
    trainer.setup()
    return trainer


def one_step(trainer: GRPOTrainer) -> dict[str, float]:
    """One GRPO step through the trainer's phases; returns its reduced metrics."""
    batch = trainer.next_prompts()
    scored = trainer.score(batch, trainer.rollout(batch))
    trainer.optimise(batch, scored, trainer.advantages(scored))
    return trainer.metrics.reduce(trainer.accelerator)


def lora_state(trainer):
    return [p.detach().clone() for p in trainer.lora_params]


def base_state(trainer):
    return {n: p.detach().clone() for n, p in trainer.pipeline.transformer.named_parameters() if "lora_" not in n}


def test_a_step_whose_every_group_was_dropped_moves_nothing(pipeline_dir, tmp_path):
    """drop_group may leave a step with no valid rollout: after one real update AdamW's momentum alone would
    still move the LoRA, so no update runs at all."""
    trainer = make_trainer(pipeline_dir, tmp_path, "--learning_rate", "1e-3")
    one_step(trainer)
    before, updates = lora_state(trainer), trainer.state.optimizer_steps
    batch = trainer.next_prompts()
    scored = trainer.score(batch, trainer.rollout(batch))
    dropped = dataclasses.replace(
        scored, valid=torch.zeros_like(scored.valid), rewards=torch.full_like(scored.rewards, math.nan)
    )
    trainer.optimise(batch, dropped, torch.zeros(len(scored.valid)))
    assert all(torch.equal(a, b) for a, b in zip(before, lora_state(trainer)))
    assert trainer.state.optimizer_steps == updates > 0
    trainer.cleanup()


def test_an_update_window_of_dropped_rollouts_only_makes_no_update(pipeline_dir, tmp_path):
    """One micro-batch window holding only dropped rollouts is skipped (no AdamW step on momentum alone); the
    other windows of the step update as usual."""
    trainer = make_trainer(pipeline_dir, tmp_path, "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3")
    one_step(trainer)
    updates = trainer.state.optimizer_steps
    assert updates == 3  # 8 rollouts in windows of <= 3
    batch = trainer.next_prompts()
    scored = trainer.score(batch, trainer.rollout(batch))
    order = np.random.default_rng([trainer.config.training.seed, trainer.state.step, 0, 2]).permutation(8)
    valid = torch.ones_like(scored.valid)
    valid[torch.from_numpy(order[:3])] = False  # the first window's rows (tensor_split of 8 into 3, 3, 2)
    trainer.optimise(batch, dataclasses.replace(scored, valid=valid), torch.linspace(-1, 1, 8))
    assert trainer.state.optimizer_steps == updates + 2
    trainer.cleanup()


def test_first_inner_ratio_is_one_and_only_the_lora_moves(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path, "--gradient_accumulation_steps", "1", "--learning_rate", "1e-3")
    lora_before, base_before = lora_state(trainer), base_state(trainer)
    metrics = one_step(trainer)
    # 8 rollouts in micro-batches of <= 3 -> 3 updates; the first micro-batch's 3 steps run before any update
    assert trainer.state.optimizer_steps == 3
    assert metrics["policy/ratio_first_inner_max_dev"] <= 1e-6
    assert abs(metrics["policy/ratio_first_inner"] - 1) <= 1e-6
    assert metrics["policy/ratio_max"] > 1 or metrics["policy/ratio_min"] < 1  # later micro-batches see updates
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, lora_state(trainer)))
    assert all(torch.equal(base_before[n], p) for n, p in base_state(trainer).items())
    for key in ("reward/total/mean", "reward/shapes/score/mean", "reward/jpeg_compressibility/score/mean"):
        assert math.isfinite(metrics[key])
    assert metrics["reward/dropped"] == 0 and "policy/approx_kl" in metrics and "policy/clipfrac" in metrics
    trainer.cleanup()


def test_recorded_log_probs_equal_rescored_ones_before_an_update(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path)
    batch = trainer.next_prompts()
    rollouts = trainer.rollout(batch)
    rows = torch.tensor([6, 0, 3])
    with torch.no_grad():
        for step in range(3):
            scored = trainer.sampler.step_log_prob(rollouts, torch.full((3,), step), batch.embeds, rows, trainer.model)
            ratio = torch.exp(scored.log_prob - rollouts.log_probs[rows, step])
            assert (ratio - 1).abs().max() <= 1e-6
    trainer.cleanup()


def test_sde_window_only_samples_the_window_with_noise_and_the_rest_with_the_ode(pipeline_dir, tmp_path):
    window = ("--num_steps", "10", "--train_steps", "window", "--train_window_start", "1", "--train_window_size", "3")
    plain = make_trainer(pipeline_dir, tmp_path / "a", *window)
    assert plain.sampler.sde_steps == frozenset(range(10))
    plain.cleanup()
    fast = make_trainer(pipeline_dir, tmp_path / "b", *window, "--sde_window_only", "true")
    assert fast.sampler.sde_steps == {1, 2, 3} and fast.evaluator.sampler.noise_level == 0
    record = one_step(fast)
    assert abs(record["policy/ratio_first_inner"] - 1) <= 1e-6
    fast.cleanup()


def test_a_sliding_window_moves_the_trained_steps_and_their_sde_noise_together(pipeline_dir, tmp_path):
    window = ("--num_steps", "10", "--train_steps", "window", "--train_window_start", "1", "--train_window_size", "3")
    trainer = make_trainer(
        pipeline_dir, tmp_path, *window, "--sde_window_only", "true", "--train_window_shift_every", "2"
    )
    trainer.state.step = 4  # the third position: [3, 6)
    record = one_step(trainer)
    assert trainer.sampler.sde_steps == {3, 4, 5} and record["train/window_start"] == 3
    assert abs(record["policy/ratio_first_inner"] - 1) <= 1e-6  # the trained steps are the noisy ones
    trainer.cleanup()
    with pytest.raises(ValueError, match="bound to the sampler it was trained under"):
        parse_config(tiny_args(pipeline_dir, tmp_path, *window, "--sde_window_only", "true",
                               "--train_window_shift_every", "2", "--prune_policy", "topk", "--probe_path", "init"))  # fmt: skip
    with pytest.raises(ValueError, match="set train_steps window"):
        parse_config(tiny_args(pipeline_dir, tmp_path, "--train_window_shift_every", "2"))


def test_evaluation_is_deterministic_and_uses_the_eval_prompts(pipeline_dir, tmp_path):
    trainer = make_trainer(
        pipeline_dir, tmp_path, "--eval_images_per_prompt", "2", "--final_eval_num_prompts", "2",
        "--final_eval_images_per_prompt", "3",
    )  # fmt: skip
    scored = []  # the prompt of every image the evaluations score
    reward_set = trainer.evaluator.reward

    def counting_reward(images, prompts, metadata):
        scored.extend(prompts)
        return reward_set(images, prompts, metadata)

    trainer.evaluator.reward = counting_reward
    first, second = trainer.evaluate(), trainer.evaluate()
    assert first == second
    assert {"total/mean", "shapes/score/mean", "jpeg_compressibility/score/mean"} <= set(first)
    assert any(key.startswith("tag/") for key in first)  # per-category means of the shapes test split
    assert len(scored) == 2 * 3 * 2  # two periodic evaluations of 3 prompts x 2 seeds
    scored.clear()
    trainer.evaluate(final=True)
    assert len(scored) == 2 * 3 and len(set(scored)) == 2  # the final evaluation: 2 prompts x 3 seeds
    trainer.evaluator.reward = reward_set
    trainer.cleanup()


def test_kl_term_and_dropped_groups(pipeline_dir, tmp_path):
    trainer = make_trainer(
        pipeline_dir, tmp_path, "--kl_beta", "0.1", "--init_lora_weights", "false",
        "--reward", "test_trainer:HalfNanReward", "--reward_weights", "1", "--reward_failure_policy", "drop_group",
        "--prompts_per_step", "6", "--seed", "3",
    )  # fmt: skip
    batch = trainer.next_prompts()
    assert any("circle" in p.text for p in batch.prompts) and not all("circle" in p.text for p in batch.prompts)
    scored: ScoredRollouts = trainer.score(batch, trainer.rollout(batch))
    advantages = trainer.advantages(scored)
    assert (~scored.valid).sum() > 0 and (advantages[~scored.valid] == 0).all()
    trainer.optimise(batch, scored, advantages)
    metrics = trainer.metrics.reduce(trainer.accelerator)
    assert metrics["reward/dropped"] == float((~scored.valid).sum())
    assert metrics["policy/kl_ref"] > 0  # the random-init LoRA differs from the adapter-disabled reference
    assert math.isfinite(metrics["policy/loss"])
    trainer.cleanup()


def test_gradient_accumulation_mixed_steps_and_ema(pipeline_dir, tmp_path):
    trainer = make_trainer(
        pipeline_dir, tmp_path, "--gradient_accumulation_steps", "2", "--train_steps", "random",
        "--train_fraction", "0.7", "--init_lora_weights", "gaussian", "--learning_rate", "1e-3",
    )  # fmt: skip
    assert trainer.num_trained_steps == 2  # int(0.7 * 3 trainable steps)
    metrics = one_step(trainer)
    # 8 rollouts, micro-batches of <= 3, 2 per optimizer step: ceil(8 / 6) = 2 updates, each over 2 x 2 backwards
    assert trainer.state.optimizer_steps == 2 and trainer.ema.num_updates == 2
    assert metrics["policy/ratio_first_inner_max_dev"] <= 1e-6  # rows mixing different denoising steps
    # EMA decay warms up as (1 + n) / (10 + n): 0.1 then 2 / 11, so the average trails the live weights
    live = lora_state(trainer)
    assert any(not torch.equal(a, b) for a, b in zip(live, trainer.ema.shadow))
    trainer.save(tmp_path / "lora")
    assert all(torch.equal(a, b) for a, b in zip(live, lora_state(trainer)))  # live weights restored after saving
    saved = load_file(tmp_path / "lora" / "pytorch_lora_weights.safetensors")
    shadow_norm = sum(float(s.double().pow(2).sum()) for s in trainer.ema.shadow)
    assert math.isclose(sum(float(v.double().pow(2).sum()) for v in saved.values()), shadow_norm, rel_tol=1e-6)
    trainer.cleanup()


def test_continuing_a_subset_follows_the_same_trajectories(pipeline_dir, tmp_path):
    """The pruning seam: rollouts run to step k, a subset continues, and it ends where the full run ends."""
    trainer = make_trainer(pipeline_dir, tmp_path)
    batch = trainer.next_prompts()
    full = trainer.rollout(batch)
    early = trainer.rollout(batch, until_step=2)
    assert early.step == 2
    survivors = trainer.continue_rollouts(batch, early.select([5, 1]))
    assert survivors.step == 4
    torch.testing.assert_close(survivors.states, full.states[[5, 1]], atol=1e-6, rtol=0)
    torch.testing.assert_close(survivors.log_probs, full.log_probs[[5, 1]], atol=1e-6, rtol=0)
    trainer.cleanup()


def test_base_evaluation_disables_the_lora(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path, "--init_lora_weights", "false")  # the LoRA changes the model
    base = trainer.evaluate(base=True)
    assert base != trainer.evaluate()
    trainer.cleanup()
    plain = make_trainer(pipeline_dir, tmp_path, "--reward", "shapes,jpeg_compressibility")
    assert plain.evaluate() == base  # a zero-initialised LoRA is the base model; the evaluation reproduces it
    plain.cleanup()


def test_bf16_step_runs_and_keeps_lora_in_fp32(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path, "--mixed_precision", "bf16", "--learning_rate", "1e-3")
    assert trainer.pipeline.transformer.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.lora_params)
    metrics = one_step(trainer)
    assert trainer.state.optimizer_steps == 3 and math.isfinite(metrics["policy/loss"])
    # bf16 matmuls: ratios at the first inner step are 1 only to bf16 precision (the 1e-6 check is fp32's)
    assert metrics["policy/ratio_first_inner_max_dev"] < 0.05
    trainer.cleanup()


def test_learning_rate_follows_the_schedule(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path, "--learning_rate", "1e-3", "--lr_schedule", "linear",
                           "--max_steps", "4", "--lr_warmup_steps", "1")  # fmt: skip
    lrs = []
    for step in range(3):
        trainer.state.step = step
        one_step(trainer)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])
    # warm-up 1/2, then linear over the 3 remaining steps of 4: 1, 2/3
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3 * 2 / 3])
    trainer.cleanup()


def _matching_errors(trainer, scored, batch) -> torch.Tensor:
    """``[B, trained steps]`` AWM flow-matching error of each rollout at its trained steps, current weights."""
    steps = trained_steps(
        trainer.config.sampling, trainer.config.training.seed, trainer.state.step, len(scored.rollouts)
    )
    with torch.no_grad():
        columns = [
            trainer.sampler.matching_error(scored.rollouts, steps[:, c], batch.embeds, model=trainer.model)[0]
            for c in range(steps.shape[1])
        ]
    return torch.stack(columns, dim=1)


def test_awm_objective_fits_rollouts_by_their_advantage(pipeline_dir, tmp_path):
    # all 8 rollouts in one micro-batch: one optimizer step, taken after the logged error was measured
    trainer = make_trainer(
        pipeline_dir, tmp_path, "--policy_objective", "awm", "--train_batch_size", "8", "--learning_rate", "1e-3",
        "--mixed_precision", "no",
    )  # fmt: skip
    lora_before, base_before = lora_state(trainer), base_state(trainer)
    batch = trainer.next_prompts()
    scored = trainer.score(batch, trainer.rollout(batch))
    advantages = trainer.advantages(scored)
    before = _matching_errors(trainer, scored, batch)
    trainer.optimise(batch, scored, advantages)
    metrics = trainer.metrics.reduce(trainer.accelerator)
    after = _matching_errors(trainer, scored, batch)
    assert trainer.state.optimizer_steps == 1
    assert math.isclose(metrics["policy/matching_error"], float(before.mean()), rel_tol=1e-5)
    # the step lowered the advantage-weighted loss (log q = -e^p / p, p = awm_error_power = 0.25): rollouts
    # better than their group became likelier
    before, after = (matching_log_prob(e, 0.25).mean(1) for e in (before, after))
    assert float((advantages * (after - before)).sum()) > 0
    assert not any(k.startswith(("policy/ratio", "policy/clipfrac", "policy/approx_kl")) for k in metrics)  # no ratio
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, lora_state(trainer)))
    assert all(torch.equal(base_before[n], p) for n, p in base_state(trainer).items())
    trainer.cleanup()


def test_awm_objective_kl_term_and_ode_rollouts(pipeline_dir, tmp_path):
    trainer = make_trainer(
        pipeline_dir, tmp_path, "--policy_objective", "awm", "--noise_level", "0", "--kl_beta", "0.1",
        "--init_lora_weights", "false",
    )  # fmt: skip
    batch = trainer.next_prompts()
    scored = trainer.score(batch, trainer.rollout(batch))
    assert (scored.rollouts.log_probs == 0).all()  # deterministic rollouts: no transition density, still trainable
    trainer.optimise(batch, scored, trainer.advantages(scored))
    metrics = trainer.metrics.reduce(trainer.accelerator)
    assert metrics["policy/kl_ref"] > 0  # the random-init LoRA's velocity differs from the reference's
    assert math.isfinite(metrics["policy/loss"]) and metrics["policy/matching_error"] > 0
    trainer.cleanup()


def test_a_fresh_run_refuses_a_folder_holding_another_run(pipeline_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "reward/total/mean": 0.5}\n')
    with pytest.raises(FileExistsError, match=r"holds another run .* --resume_from latest, .* --overwrite_output_dir"):
        make_trainer(pipeline_dir, tmp_path)
    assert (run / "metrics.jsonl").read_text().startswith('{"step": 1')  # untouched
    # resuming with no checkpoint yet restarts, keeping the earlier log and summary beside the new run (a summary
    # left in place would make a later resume of the new run report the old one as finished)
    (run / "summary.json").write_text('{"steps": 9}')
    trainer = make_trainer(pipeline_dir, tmp_path, "--resume_from", "latest")
    trainer.cleanup()
    assert [p.read_text() for p in run.glob("metrics.before-*.jsonl")] == ['{"step": 1, "reward/total/mean": 0.5}\n']
    assert not (run / "summary.json").exists()
    assert [p.read_text() for p in run.glob("summary.before-*.json")] == ['{"steps": 9}']
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    trainer = make_trainer(pipeline_dir, tmp_path, "--overwrite_output_dir", "true")
    assert not list(run.glob("metrics.before-*")) and (run / "config.yaml").exists()
    trainer.cleanup()


def test_a_run_with_no_checkpoint_restarts_only_as_itself_and_a_finished_one_is_reported(pipeline_dir, tmp_path):
    """``resume_from: latest`` in a folder whose run saved no checkpoint (stopped before its first save, or
    checkpoints off): another run's config is refused instead of restarting into the folder; a finished run with
    the same config is reported as it stands instead of trained again."""
    run, no_saves = tmp_path / "run", ("--save_every_minutes", "0", "--resume_from", "latest")
    trainer = make_trainer(pipeline_dir, tmp_path, *no_saves, "--seed", "3")
    final = trainer.train()
    trainer.cleanup()
    assert not (run / "checkpoints").exists() and (run / "summary.json").exists()
    log, summary = (run / "metrics.jsonl").read_text(), (run / "summary.json").read_text()
    with pytest.raises(FileExistsError, match=r"no checkpoint to resume, .* \(seed: 3 -> 4\): restarting it would"):
        make_trainer(pipeline_dir, tmp_path, *no_saves, "--seed", "4")
    trainer = make_trainer(pipeline_dir, tmp_path, *no_saves, "--seed", "3", "--log_every", "2")  # a neutral change
    assert trainer.finished_without_checkpoint and trainer.train() == final
    trainer.cleanup()
    assert (run / "metrics.jsonl").read_text() == log and (run / "summary.json").read_text() == summary
    # a change of budget restarts the run (it has nothing to continue from), the old config set aside
    trainer = make_trainer(pipeline_dir, tmp_path, *no_saves, "--seed", "3", "--max_steps", "2")
    assert not trainer.finished_without_checkpoint and trainer.state.step == 0
    trainer.cleanup()
    assert [yaml.safe_load(p.read_text())["max_steps"] for p in run.glob("config.before-*.yaml")] == [1]
    assert yaml.safe_load((run / "config.yaml").read_text())["max_steps"] == 2
    # a summary cut short by a crash is named, not a bare JSON error (and, on several processes, not a hang)
    (run / "summary.json").write_text("")
    with pytest.raises(ValueError, match=r"summary.json is damaged .*delete it"):
        make_trainer(pipeline_dir, tmp_path, *no_saves, "--seed", "3", "--max_steps", "2")
    (run / "summary.json").unlink()
    (run / "config.yaml").write_text("seed: [3\n")
    with pytest.raises(ValueError, match=r"config.yaml, the config the run was started with, is damaged"):
        make_trainer(pipeline_dir, tmp_path, *no_saves, "--seed", "3", "--max_steps", "2")


def test_a_folder_that_cannot_be_written_is_named_before_the_model_loads(pipeline_dir, tmp_path, monkeypatch):
    """Any OS error preparing the folder (here a read-only filesystem at the lock) is one named refusal, which the
    main process shares with the others instead of leaving them waiting at the broadcast."""

    def read_only(output_dir):
        raise OSError(errno.EROFS, "Read-only file system", str(output_dir / ".lock"))

    monkeypatch.setattr("rl.trainer_persistence.lock_output_dir", read_only)
    with pytest.raises(
        PermissionError, match=r"cannot prepare output_dir .*run \(.*Read-only file system.*--output_dir"
    ):
        make_trainer(pipeline_dir, tmp_path)
    monkeypatch.undo()
    (tmp_path / "run" / "config.yaml").mkdir(parents=True)  # written after the resume checks: shared alike
    with pytest.raises(PermissionError, match=r"cannot prepare output_dir .*run \(.*config\.yaml.*--output_dir"):
        make_trainer(pipeline_dir, tmp_path)


def test_resume_refuses_changes_to_what_the_run_is_and_logs_safe_ones(pipeline_dir, tmp_path, caplog):
    trainer = make_trainer(pipeline_dir, tmp_path, "--seed", "3", "--lr_schedule", "cosine")
    one_step(trainer)
    trainer.state.step = 1
    trainer.save_checkpoint()
    trainer.cleanup()
    original = (tmp_path / "run" / "config.yaml").read_text()
    resume = ("--resume_from", "latest", "--seed", "3", "--lr_schedule", "cosine")
    with pytest.raises(ValueError, match=r"group_size: 4 -> 2; learning_rate: 0\.0001 -> 0\.05"):
        make_trainer(pipeline_dir, tmp_path, *resume, "--group_size", "2", "--learning_rate", "0.05")
    with caplog.at_level(logging.WARNING, logger="rl.trainer"):
        trainer = make_trainer(pipeline_dir, tmp_path, *resume, "--max_steps", "3", "--eval_every", "2")
    assert trainer.state.step == 1
    trainer.cleanup()
    # a safe change that still changes the run's course is said
    assert [r.message for r in caplog.records if "learning-rate schedule" in r.message] == [
        "max_steps 1 -> 3 moves the end of the cosine learning-rate schedule: from the resumed step the rate follows "
        "a decay to 0 at step 3, so this run equals no uninterrupted run"
    ]
    history = [json.loads(line) for line in (tmp_path / "run" / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"] == {"eval_every": [0, 2], "max_steps": [1, 3], "resume_from": [None, "latest"]}
    assert (tmp_path / "run" / "config.yaml").read_text() == original  # the original stays
    trainer = make_trainer(pipeline_dir, tmp_path, *resume, "--group_size", "2", "--allow_config_change", "true")
    one_step(trainer)
    trainer.state.step = 2
    trainer.save_checkpoint()
    trainer.cleanup()
    # the next resume is held to what its checkpoint was trained with, not to what the run started with
    with pytest.raises(
        ValueError, match=r"step-00000002 with a config that changes what the run is \(group_size: 2 -> 4"
    ):
        make_trainer(pipeline_dir, tmp_path, *resume)
    # a checkpoint of a run started before a key existed resumes at that key's default (its config loses one)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    del config["preview_steps"]
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(config))
    write_manifest(checkpoint)
    make_trainer(pipeline_dir, tmp_path, *resume, "--group_size", "2").cleanup()
    with pytest.raises(ValueError, match=r"preview_steps: None -> 2"):
        make_trainer(pipeline_dir, tmp_path, *resume, "--group_size", "2", "--preview_steps", "2")


def test_a_branch_from_another_runs_checkpoint_is_checked_and_starts_its_own_folder(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path, "--seed", "3")
    one_step(trainer)
    trainer.state.step = 1
    trainer.save_checkpoint()
    trainer.cleanup()
    step1 = str(tmp_path / "run" / "checkpoints" / "step-00000001")
    branch = ("--resume_from", step1, "--output_dir", str(tmp_path / "branch"))
    with pytest.raises(ValueError, match=r"seed: 3 -> 4"):  # held to the checkpoint's config, not the new folder's
        make_trainer(pipeline_dir, tmp_path, *branch, "--seed", "4")
    trainer = make_trainer(pipeline_dir, tmp_path, *branch, "--seed", "3")
    assert trainer.state.step == 1
    one_step(trainer)
    trainer.state.step = 2
    trainer.save_checkpoint()
    trainer.cleanup()
    written = yaml.safe_load((tmp_path / "branch" / "config.yaml").read_text())
    assert written["output_dir"] == str(tmp_path / "branch") and written["resume_from"] == step1
    # the command that started the branch, relaunched (a preemptible job), continues the branch, not its start
    trainer = make_trainer(pipeline_dir, tmp_path, *branch, "--seed", "3")
    assert trainer.state.step == 2
    trainer.cleanup()
    # a branch into a folder holding another run is refused like a fresh run
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text('{"train/step": 1}\n')
    with pytest.raises(FileExistsError, match="holds another run.*and this is a branch of another run"):
        make_trainer(pipeline_dir, tmp_path, "--resume_from", step1, "--output_dir", str(tmp_path / "other"))


def test_a_key_added_since_the_run_started_is_no_change_at_its_default():
    from rl.resume_policy import resume_changes

    old = {"group_size": 4, "seed": 3}  # written before preview_steps existed
    defaults = {"group_size": 16, "seed": 0, "preview_steps": 1}
    assert resume_changes(old, {"group_size": 4, "seed": 3, "preview_steps": 1}, defaults) == ({}, {})
    assert resume_changes(old, {"group_size": 4, "seed": 3, "preview_steps": 2}, defaults) == (
        {},
        {"preview_steps": (None, 2)},
    )
    # a key the old run set keeps counting at any value, and without defaults nothing is presumed
    assert resume_changes(old, {"group_size": 16, "seed": 3}, defaults)[1] == {"group_size": (4, 16)}
    assert resume_changes(old, {"group_size": 4, "seed": 3, "preview_steps": 1})[1] == {"preview_steps": (None, 1)}


def test_only_a_new_end_of_a_decaying_schedule_is_warned_about():
    from rl.resume_policy import schedule_moved

    assert schedule_moved({"max_steps": (160, 200)}, "constant") is None
    assert schedule_moved({"max_minutes": (24, 48)}, "cosine") is None
    assert "decay to 0 at step 200" in schedule_moved({"max_steps": (160, 200)}, "linear")


def test_result_changes_ignore_only_the_keys_that_change_no_result(tmp_path):
    from rl.config import RunConfig
    from rl.resume_policy import RESULT_NEUTRAL_KEYS, RESUME_SAFE_KEYS, result_changes

    assert RESULT_NEUTRAL_KEYS <= RESUME_SAFE_KEYS and "max_steps" not in RESULT_NEUTRAL_KEYS
    flat = RunConfig().flat()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(flat))
    cosmetic = {**flat, "progress_bar": not flat["progress_bar"], "reward_workers": 7, "log_every": 9}
    assert result_changes(tmp_path, cosmetic) == {}
    budget = {**flat, "max_steps": flat["max_steps"] + 1}  # safe to resume with, but another result
    assert result_changes(tmp_path, budget) == {"max_steps": (flat["max_steps"], flat["max_steps"] + 1)}
    assert result_changes(tmp_path / "none", budget) == {}  # no run there


def test_budget_spent_stops_at_each_limit_and_prices_compute_in_flux_forwards():
    """Steps, denoised images and FLUX.1-dev compute each end a run; a 0 limit never does."""
    config = parse_config(["--max_steps", "10", "--max_flux_compute", "100", "--max_images_denoised", "0"])
    # 40 forwards + 20 training passes x 3 + 10 decodes x 0.05 + 10 reward calls x 0.01 = 100.6 forwards
    spent = TrainState(step=3, transformer_calls=40, train_passes=20, decodes=10, reward_calls=10)
    assert budget_spent(config, spent)
    assert not budget_spent(config, TrainState(step=3, transformer_calls=40, train_passes=19, decodes=10))
    assert budget_spent(config, TrainState(step=10))
    unlimited = parse_config(["--max_steps", "10"])
    assert not budget_spent(unlimited, TrainState(step=9, transformer_calls=1e9, images_denoised=1e9))
    assert budget_spent(parse_config(["--max_images_denoised", "8"]), TrainState(images_denoised=8.0))


def test_a_checkpoint_is_due_by_steps_or_after_save_every_minutes(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path, "--save_every_minutes", "0.5", "--save_every", "3")
    trainer.last_save = time.time()
    trainer.state.step = 2
    assert not trainer.checkpoint_due()
    trainer.last_save -= 31  # half a minute since the last save
    assert trainer.checkpoint_due()
    trainer.last_save, trainer.state.step = time.time(), 3
    assert trainer.checkpoint_due()  # every save_every steps
    trainer.config.checkpoint.save_every_minutes, trainer.config.checkpoint.save_every = 0, 0
    trainer.last_save -= 10**6
    assert not trainer.checkpoint_due()  # both off: never
    trainer.cleanup()


def test_a_non_finite_gradient_skips_the_update_and_three_steps_of_them_stop_the_run(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path)
    loss, poisoned = trainer.objective.loss, [True]

    def nan_loss(*args):  # what bf16 cuDNN attention did on an H200: NaN gradients from finite inputs
        out = loss(*args)
        return dataclasses.replace(out, loss=out.loss * math.nan) if poisoned[0] else out

    trainer.objective.loss = nan_loss
    before = lora_state(trainer)
    metrics = one_step(trainer)
    assert metrics["train/skipped_updates"] > 0 and trainer.state.optimizer_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, lora_state(trainer)))  # before the guard: all NaN
    moments = [v for state in trainer.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    assert all(torch.isfinite(m).all() for m in moments)
    poisoned[0] = False
    trainer.state.step, trainer.metrics = 1, MetricsAccumulator()  # as log_step starts each step afresh
    assert one_step(trainer)["train/skipped_updates"] == 0 and trainer.state.nonfinite_steps == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, lora_state(trainer)))  # training goes on
    trainer.cleanup()


def test_three_steps_without_an_update_stop_the_run_with_those_steps_counted_and_checkpointed(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path, "--max_steps", "6", "--eval_before_training", "false")
    loss = trainer.objective.loss
    trainer.objective.loss = lambda *args: dataclasses.replace(loss(*args), loss=loss(*args).loss * math.nan)
    before = lora_state(trainer)
    with pytest.raises(
        NonFiniteGradientError, match=r"NaN or infinite in every update of the last 3 steps \(to step 3\)"
    ):
        trainer.train()
    trainer.cleanup()
    run = tmp_path / "run"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003"]
    state = load_state_file(run / "checkpoints" / "step-00000003" / "trainer_state.pt")["state"]
    # the checkpoint is of the 3 steps the counters hold: a resume does not count the third one twice
    assert (state["step"], state["optimizer_steps"], state["nonfinite_steps"]) == (3, 0, 3)
    assert state["images_seen"] == 3 * 2 * 4
    saved = load_file(run / "checkpoints" / "step-00000003" / "model.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())  # intact: no bad update applied
    assert all(torch.equal(a, b) for a, b in zip(before, lora_state(trainer)))


def test_a_size_far_from_the_models_is_warned_at_setup(pipeline_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rl.trainer"):
        make_trainer(pipeline_dir, tmp_path / "far", "--height", "128", "--width", "128").cleanup()
    assert "height x width = 128 x 128 px is more than 2x off this pipeline's native 32 x 32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rl.trainer"):
        make_trainer(pipeline_dir, tmp_path / "native").cleanup()  # the fixture's 32 px
    assert "native" not in caplog.text


def logged(run, key: str) -> list[dict]:
    return [r for r in read_metrics(run / "metrics.jsonl") if key in r]


def test_a_crash_at_the_trained_end_is_finished_by_a_relaunch_with_every_record_once(pipeline_dir, tmp_path):
    """The last steps of a log_every cadence are logged; summary.json (what marks a run finished) is written after
    the LoRA export, so a crash in the export leaves a run the relaunch finishes, logging the final eval once."""
    args = ("--max_steps", "4", "--log_every", "3", "--save_lora", "true", "--eval_before_training", "false")
    trainer = make_trainer(pipeline_dir, tmp_path, *args)

    def crash(directory):
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer.save = crash
    with pytest.raises(OSError, match="No space left"):
        trainer.train()
    trainer.cleanup()
    run = tmp_path / "run"
    assert [r["train/step"] for r in logged(run, "train/step")] == [3, 4]  # step 4 was lost with log_every 3
    assert not (run / "summary.json").exists() and len(logged(run, "final_eval/total/mean")) == 1
    trainer = make_trainer(pipeline_dir, tmp_path, *args, "--resume_from", "latest")
    final = trainer.train()
    trainer.cleanup()
    assert (run / "summary.json").exists() and (run / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert [r["final_eval/total/mean"] for r in logged(run, "final_eval/total/mean")] == [final["total/mean"]]
    assert [r["train/step"] for r in logged(run, "train/step")] == [3, 4]


def test_a_resume_that_changes_the_final_evaluation_evaluates_the_base_again(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path, "--final_eval_num_prompts", "2")
    trainer.train()
    trainer.cleanup()
    run = tmp_path / "run"
    resume = ("--resume_from", "latest", "--max_steps", "2")
    trainer = make_trainer(pipeline_dir, tmp_path, *resume, "--final_eval_num_prompts", "3")
    trainer.train()
    trainer.cleanup()
    bases = [r["base_eval/total/mean"] for r in logged(run, "base_eval/total/mean")]
    summary = json.loads((run / "summary.json").read_text())
    # the summary's base is the evaluation on the final one's 3 prompts, not the first run's 2
    assert len(bases) == 2 and summary["base"]["total/mean"] == bases[-1] != bases[0]
    trainer = make_trainer(pipeline_dir, tmp_path, "--resume_from", "latest", "--max_steps", "3")
    trainer.train()
    trainer.cleanup()
    assert len(logged(run, "base_eval/total/mean")) == 2  # unchanged settings: the base is not evaluated again


def test_the_time_budget_counts_each_launchs_setup_across_a_resume(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path)
    trainer.started -= 100  # as if loading the model had taken 100 s
    trainer.save_checkpoint()
    trainer.cleanup()
    trainer = make_trainer(pipeline_dir, tmp_path, "--resume_from", "latest")
    assert 100 <= time.time() - trainer.started < 160
    trainer.cleanup()


def test_a_signal_during_a_checkpoint_stops_after_it_without_another_step(pipeline_dir, tmp_path):
    trainer = make_trainer(
        pipeline_dir, tmp_path, "--max_steps", "6", "--save_every", "2", "--eval_before_training", "false"
    )
    save = trainer.save_checkpoint

    def preempted_while_saving():
        os.kill(os.getpid(), signal.SIGTERM)
        return save()

    trainer.save_checkpoint = preempted_while_saving
    with pytest.raises(SystemExit, match="stopped by SIGTERM after step 2"):
        trainer.train()
    trainer.cleanup()
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-00000002"]
