"""Objectives as registered units (rl/objectives/): declarations, what each logs, and adding one."""

import pytest
import torch
from test_pruning_trainer import make_trainer
from test_trainer import one_step, pipeline_dir

from rl.config import parse_config
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
