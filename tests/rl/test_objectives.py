"""Objectives as registered units (rl/objectives/): declarations, what each logs, and adding one."""

import math

import pytest
import torch
from test_pruning_trainer import make_trainer
from test_trainer import one_step, pipeline_dir

from rl.batches import trained_steps
from rl.config_parse import parse_config
from rl.loss import awm_loss
from rl.objectives import OBJECTIVES, Needs, Objective, register

__all__ = ["pipeline_dir"]  # fixture used by name


def test_shipped_objectives_declare_their_needs():
    assert OBJECTIVES["flow_grpo"].needs == Needs(sde_noise=True, transitions=True, finished_images=False)
    assert OBJECTIVES["awm"].needs == Needs(sde_noise=False, transitions=False, finished_images=True)
    with pytest.raises(ValueError, match="needs SDE noise on the trained steps"):
        parse_config(["--noise_level", "0", "--policy_objective", "flow_grpo"])
    parse_config(["--noise_level", "0", "--policy_objective", "awm"])  # AWM trains on any sampler


@pytest.mark.parametrize("objective", ["flow_grpo", "awm"])
def test_each_objective_logs_only_what_it_computes(pipeline_dir, tmp_path, objective):
    trainer = make_trainer(pipeline_dir, tmp_path, "--policy_objective", objective, "--learning_rate", "1e-3")
    metrics = one_step(trainer)
    logged = {key.removeprefix("policy/") for key in metrics if key.startswith("policy/")}
    declared = set(OBJECTIVES[objective].metrics)
    assert logged <= declared and {"loss", "policy_loss"} <= logged
    if objective == "awm":  # no ratio exists: nothing ratio-like is logged as if it had been measured
        assert not logged & {"ratio_mean", "ratio_first_inner", "approx_kl", "clipfrac"}
        assert metrics["policy/matching_error"] > 0
    else:
        assert abs(metrics["policy/ratio_first_inner"] - 1) <= 1e-6
    trainer.cleanup()


def test_a_new_objective_is_one_registered_class(pipeline_dir, tmp_path):
    @register("plain_matching_for_test")
    class PlainMatching(Objective):
        """AWM's loss with the linear error (p = 1): a third objective in a dozen lines."""

        needs = Needs(sde_noise=False, transitions=False, finished_images=True)
        metrics = ("loss", "policy_loss")

        def loss(self, embeds, rollouts, rows, step, advantages, weights):
            error, _ = self.trainer.sampler.matching_error(rollouts, step, embeds, rows, model=self.trainer.model)
            return awm_loss(-error, advantages[rows], None, 0.0, weights)

    try:
        trainer = make_trainer(pipeline_dir, tmp_path, "--policy_objective", "plain_matching_for_test")
        metrics = one_step(trainer)
        assert torch.isfinite(torch.tensor(metrics["policy/loss"])) and "policy/matching_error" not in metrics
        trainer.cleanup()
    finally:
        del OBJECTIVES["plain_matching_for_test"]


# AWM's reference-code options (docs/design.md section 3), each smoke-run on the fixture: the loss or metric each
# changes, changes as its math says. One micro-batch of all 8 rollouts per step column and one optimizer step
# per GRPO step, so every loss of a step is computed before that step's update.
AWM = ("--policy_objective", "awm", "--train_batch_size", "8", "--learning_rate", "1e-3")


def _rollouts(trainer):
    batch = trainer.next_prompts()
    scored = trainer.score(batch, trainer.rollout(batch))
    return batch, scored, trainer.advantages(scored)


def _column_loss(trainer, batch, scored, advantages, step):
    """The objective's loss of every rollout at denoising step ``step`` with the trainer's current weights."""
    rows = torch.arange(len(scored.rollouts))
    steps = torch.full((len(rows),), step)
    return trainer.objective.loss(batch.embeds, scored.rollouts, rows, steps, advantages, torch.ones(len(rows)))


def test_awm_sigma_weight_scales_each_steps_loss_by_its_sigma(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path, *AWM, "--awm_sigma_weight", "true")
    batch, scored, advantages = _rollouts(trainer)
    t = trainer.config.training
    for step in (0, 1, 2):
        weighted = _column_loss(trainer, batch, scored, advantages, step).policy_loss
        t.awm_sigma_weight = False
        plain = _column_loss(trainer, batch, scored, advantages, step).policy_loss
        t.awm_sigma_weight = True
        sigma = float(trainer.sampler.sigmas[step])  # 1 at step 0: the same loss there
        torch.testing.assert_close(weighted, sigma * plain)
    before = [p.detach().clone() for p in trainer.lora_params]
    for _ in range(2):
        assert torch.isfinite(torch.tensor(one_step(trainer)["policy/loss"]))
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.lora_params))
    trainer.cleanup()


def test_awm_squared_kl_is_twice_the_gaussian_on_the_model(pipeline_dir, tmp_path):
    # a random-init LoRA so the policy's velocity differs from the reference's
    trainer = make_trainer(pipeline_dir, tmp_path, *AWM, "--kl_beta", "0.1", "--init_lora_weights", "false")
    batch, scored, advantages = _rollouts(trainer)
    gaussian = _column_loss(trainer, batch, scored, advantages, 1)
    trainer.config.training.awm_kl_form = "squared"
    squared = _column_loss(trainer, batch, scored, advantages, 1)
    assert gaussian.kl_ref > 0
    torch.testing.assert_close(squared.kl_ref, 2 * gaussian.kl_ref)
    torch.testing.assert_close(squared.loss - squared.policy_loss, 2 * (gaussian.loss - gaussian.policy_loss))
    for _ in range(2):
        assert one_step(trainer)["policy/kl_ref"] > 0
    trainer.cleanup()


def test_awm_ema_kl_follows_the_policy(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path, *AWM, "--awm_ema_kl_beta", "1", "--train_batch_size", "3")
    initial = [p.detach().clone() for p in trainer.lora_params]
    batch, scored, advantages = _rollouts(trainer)
    # before any update the EMA is the policy itself: no divergence
    assert float(_column_loss(trainer, batch, scored, advantages, 0).kl_ema) == 0.0
    trainer.metrics.reduce(trainer.accelerator)  # drop that probe's matching_error
    calls = trainer.state.transformer_calls
    metrics = one_step(trainer)  # 3 micro-batches: the later two see updated weights, the EMA does not move
    assert metrics["policy/kl_ema"] > 0 and "policy/kl_ref" not in metrics
    # each (rollout, trained step) pass also ran the EMA's forward: 8 rollouts x 3 steps, plus sampling's 8 x 4
    assert trainer.state.transformer_calls - calls == 8 * 4 + 8 * 3
    # after step 1 the EMA folded the weights in with decay min(0.3, 0.001 x 1)
    expected = [a.lerp(p.detach(), 1 - 0.001) for a, p in zip(initial, trainer.lora_params)]
    for shadow, value in zip(trainer.objective.policy_ema.shadow, expected):
        torch.testing.assert_close(shadow, value)
    state = trainer.objective.state_dict()
    assert metrics["policy/loss"] >= metrics["policy/policy_loss"]  # + 1 x kl_ema >= 0
    one_step(trainer)
    trainer.objective.load_state_dict(state)  # resume restores the EMA
    for shadow, value in zip(trainer.objective.policy_ema.shadow, expected):
        torch.testing.assert_close(shadow, value)
    trainer.cleanup()


def test_awm_policy_ema_survives_a_checkpoint(pipeline_dir, tmp_path):
    ema = ("--awm_ema_kl_beta", "1")
    trainer = make_trainer(pipeline_dir, tmp_path, *AWM, *ema)
    one_step(trainer)
    trainer.state.step += 1  # as train() does after the step
    trainer.save_checkpoint()
    saved = [s.clone() for s in trainer.objective.policy_ema.shadow]
    trainer.cleanup()
    resumed = make_trainer(pipeline_dir, tmp_path, *AWM, *ema, "--resume_from", "latest")
    assert resumed.state.step == 1
    assert all(torch.equal(a, b) for a, b in zip(saved, resumed.objective.policy_ema.shadow))
    # not what a fresh EMA of the resumed weights would hold: 0.1% of the initial weights are still in it
    assert not all(torch.equal(a, p) for a, p in zip(saved, resumed.lora_params))
    resumed.cleanup()


def test_adv_scale_max_scales_the_policy_loss(pipeline_dir, tmp_path):
    plain = make_trainer(pipeline_dir, tmp_path / "plain", *AWM)
    expected = one_step(plain)["policy/policy_loss"]
    plain.cleanup()
    # AWM's reference: advantages clipped to 5, then into [-1, 1]; the same rollouts (same seed), 1/5 of the loss
    scaled = make_trainer(pipeline_dir, tmp_path / "scaled", *AWM, "--adv_scale_max", "1")
    assert math.isclose(one_step(scaled)["policy/policy_loss"], expected / 5, rel_tol=1e-4)
    assert math.isfinite(one_step(scaled)["policy/loss"])
    scaled.cleanup()


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (("--train_steps", "window", "--train_window_start", "0", "--train_window_size", "2"), [[1]]),
        (("--train_steps", "all_but_last"), [[1, 2]]),
        (("--train_steps", "random", "--train_fraction", "0.5"), None),
    ],
)
def test_train_first_step_false_never_trains_sigma_one(pipeline_dir, tmp_path, mode, expected):
    trainer = make_trainer(pipeline_dir, tmp_path, *AWM, *mode, "--train_first_step", "false")
    steps = trained_steps(trainer.config.sampling, trainer.config.training.seed, 0, 8)
    assert (steps >= 1).all() and (steps <= 2).all()  # 4 steps: 0 (sigma 1) left out, 3 (the last) never trained
    if expected is not None:
        assert steps[:1].tolist() == expected
    for _ in range(2):
        one_step(trainer)
    assert trainer.state.train_passes == 2 * 8 * steps.shape[1]
    trainer.cleanup()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--train_first_step", "false", "--train_steps", "window", "--train_window_size", "1"), "leaves no step"),
        (("--train_first_step", "false", "--num_steps", "2"), "leaves no step"),
        (("--awm_sigma_weight", "true"), "awm_sigma_weight only act under policy_objective 'awm'"),
        (("--awm_ema_kl_beta", "1", "--awm_kl_form", "squared"), "awm_kl_form, awm_ema_kl_beta only act under"),
        (("--policy_objective", "awm", "--awm_kl_form", "half"), "awm_kl_form='half' is not one of"),
        (("--policy_objective", "awm", "--awm_ema_kl_decay", "1"), r"awm_ema_kl_decay must lie in \[0, 1\)"),
        (("--adv_scale_max", "-1"), "adv_scale_max must be >= 0"),
    ],
)
def test_awm_reference_options_are_validated(args, message):
    with pytest.raises(ValueError, match=message):
        parse_config(list(args))
