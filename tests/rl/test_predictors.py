"""Predictors (rl/predictors/): the registry, the pure pieces, and each predictor inside the pruned trainer.

Fixture world (tests/rl/test_trainer.py): T = 4 steps, 2 prompts x 4 rollouts per step.
"""

import math

import numpy as np
import pytest
import torch
from test_pruning_trainer import make_trainer, pruned_step
from test_trainer import pipeline_dir

from rewards.compose import RewardResult
from rl.config_parse import parse_config
from rl.cost import ComputeCounts, OperationCosts, flux_equivalent
from rl.predictors import PREDICTORS, Predictor, build_predictor, register, reward_scores
from rl.predictors.lookahead import euler_to_clean, lookahead_indices
from rl.predictors.preview import X0Recorder
from rl.pruned_rollout import result_subset
from rl.pruning import funnel_group_sizes
from rl.sampler import FluxSampler

__all__ = ["pipeline_dir"]  # fixture used by name

VARIANCE = ("--prune_policy", "variance", "--prune_keep_fraction", "0.5", "--prune_explore", "0", "--probe_path", "")


def test_registry_names_the_shipped_predictors_and_refuses_doubles():
    assert {"probe", "preview", "lookahead", "reward"} <= set(PREDICTORS)
    with pytest.raises(ValueError, match="registered twice"):
        register("preview")(type("Again", (Predictor,), {}))
    with pytest.raises(ValueError, match="predictor='oracle' is not one of"):
        parse_config(["--predictor", "oracle"])


def test_a_new_predictor_is_one_registered_class():
    @register("constant_for_test")
    class Constant(Predictor):
        def predict(self, inputs):
            raise AssertionError("not called here")

    try:
        config = parse_config([*VARIANCE, "--predictor", "constant_for_test", "--capture_step", "2"])
        assert isinstance(build_predictor(config, sampler=None), Constant)
    finally:
        del PREDICTORS["constant_for_test"]


def test_lookahead_lands_on_the_schedule_and_euler_is_exact_for_constant_velocity():
    assert lookahead_indices(3, 10, 2) == [3, 6, 10] or lookahead_indices(3, 10, 2) == [3, 7, 10]
    assert lookahead_indices(3, 10, 1) == [3, 10] and lookahead_indices(8, 10, 5) == [8, 9, 10]
    with pytest.raises(ValueError):
        lookahead_indices(10, 10, 1)

    class Straight:  # v = x0-independent constant: x_t = x_1 - (1 - t) v reaches x - sigma v at sigma 0
        sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
        batch_size = 2
        calls = FluxSampler.calls  # its batching, as the real sampler counts it

        def velocity(self, x, i, embeds, prompt_index):
            return torch.full_like(x, 2.0)

    x = torch.randn(3, 4, 5)
    clean = euler_to_clean(Straight(), x, None, torch.zeros(3, dtype=torch.long), [1, 3, 4])
    assert torch.allclose(clean, x - 0.75 * 2.0)  # sum of (sigma_j - sigma_i) = -0.75


def test_x0_recorder_keeps_one_call_in_row_order():
    recorder = X0Recorder(step=1)
    latents, velocity = torch.randn(4, 2, 3), torch.randn(4, 2, 3)
    recorder.after_forward(0, torch.arange(4), latents + 1, velocity + 1, 0.9)  # another call: ignored
    recorder.after_forward(1, torch.tensor([3, 1]), latents[[3, 1]], velocity[[3, 1]], 0.5)  # chunks out of order
    recorder.after_forward(1, torch.tensor([0, 2]), latents[[0, 2]], velocity[[0, 2]], 0.5)
    recorded_latents, recorded_velocity = recorder.call()
    assert torch.equal(recorded_latents, latents) and torch.equal(recorded_velocity, velocity)
    assert recorder.sigma == 0.5 and torch.allclose(recorder.x0(), latents - 0.5 * velocity)
    with pytest.raises(RuntimeError, match="never ran call 3"):
        X0Recorder(step=2).x0()


def test_reward_scores_rank_unscorable_rollouts_last_and_results_subset():
    result = RewardResult(
        torch.tensor([0.5, math.nan, 0.2, 0.9]), {"a/score": torch.arange(4.0)}, torch.tensor([1, 0, 1, 1]).bool()
    )
    assert reward_scores(result).tolist() == pytest.approx([0.5, 0.2, 0.2, 0.9])
    part = result_subset(result, torch.tensor([3, 0]))
    assert part.total.tolist() == pytest.approx([0.9, 0.5]) and part.components["a/score"].tolist() == [3.0, 0.0]


def test_flux_equivalent_prices_each_operation():
    counts = ComputeCounts(transformer_calls=100, train_passes=10, decodes=20, reward_calls=20)
    assert flux_equivalent(counts) == pytest.approx(100 + 30 + 1.0 + 0.2)
    assert flux_equivalent(counts, OperationCosts(decode=3.0)) == pytest.approx(100 + 30 + 60 + 0.2)


@pytest.mark.parametrize("predictor", ["preview", "preview+2", "lookahead", "reward"])
def test_expand_and_prune_trains_group_size_per_prompt_and_counts_its_cost(pipeline_dir, tmp_path, predictor):
    """Expand 2: 2 prompts x 8 started, capture after 1 of 4 steps, the 4 of max predicted variance finish."""
    predictor, _, preview_steps = predictor.partition("+")
    extra = ("--predictor", predictor, "--capture_step", "1", "--prune_expand", "2", "--lookahead_steps", "2",
             "--preview_steps", preview_steps or "1")  # fmt: skip
    trainer = make_trainer(pipeline_dir, tmp_path, *VARIANCE, *extra, "--learning_rate", "1e-3")
    metrics = pruned_step(trainer)
    last, state = trainer.pruner.last, trainer.state
    assert len(last.predicted) == 16 and last.selection.keep.sum() == 8  # 2 G started, G trained per prompt
    assert torch.equal(torch.bincount(last.group_ids[last.selection.keep]), torch.tensor([4, 4]))
    if predictor == "reward":  # every rollout finished and scored once: the survivors' rewards are reused
        assert state.transformer_calls == 16 * 4 and state.decodes == 16 and state.reward_calls == 16
    elif predictor == "preview" and preview_steps:  # call 1's velocity to sigma 0.5, one more call to 0
        assert state.transformer_calls == 16 * 1 + 16 * 1 + 8 * 3 and state.decodes == 16 + 8
    elif predictor == "preview":  # the first call's x0 decoded and scored, then the survivors' finals
        assert state.transformer_calls == 16 * 1 + 8 * 3 and state.decodes == 16 + 8
    else:  # two Euler steps from step 1 (indices 1 -> 2/3 -> 4) per started rollout
        assert state.transformer_calls == 16 * 1 + 16 * 2 + 8 * 3 and state.reward_calls == 16 + 8
        assert metrics["predict/transformer_calls"] == 32
    assert state.train_passes == 8 * 3  # survivors x the trained steps (window of 3... of the fixture)
    assert metrics["prune/predicted_std_gain"] >= 1.0  # the max-variance half of a group of 8
    assert "reward/group_std" in metrics and 0.0 <= metrics["prune/flat_group_frac"] <= 1.0
    trainer.cleanup()


def test_pods_selection_is_the_max_variance_subset_of_real_rewards(pipeline_dir, tmp_path):
    trainer = make_trainer(pipeline_dir, tmp_path, *VARIANCE, "--predictor", "reward", "--prune_expand", "2")
    batch = trainer.next_prompts()
    scored, _ = trainer.pruner.sample_and_score(trainer, batch)
    last = trainer.pruner.last
    for group in torch.unique(last.group_ids):
        rows = torch.nonzero(last.group_ids == group).flatten()
        values = last.predicted[rows].numpy()
        chosen = last.selection.keep[rows].numpy()
        best = max(np.var(values[list(c)]) for c in __import__("itertools").combinations(range(8), 4))
        assert np.var(values[chosen]) == pytest.approx(best)
    # the survivors' scored rewards are the predictions that selected them
    assert torch.allclose(scored.rewards.float(), last.predicted[last.selection.survivors])
    trainer.cleanup()


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="prune_expand=2 starts more rollouts"):
        parse_config(["--prune_expand", "2"])
    with pytest.raises(ValueError, match="probe_refresh_every=5 refreshes the probe"):
        parse_config([*VARIANCE, "--predictor", "preview", "--capture_step", "2", "--probe_refresh_every", "5"])
    with pytest.raises(ValueError, match="choose another predictor"):
        parse_config([*VARIANCE, "--capture_step", "2"])  # predictor probe without a probe


def test_a_funnel_prunes_at_each_stage_and_counts_every_call(pipeline_dir, tmp_path):
    """Pro-GRPO's shape on the fixture: 4 G = 16 per prompt, half after step 1, half again after step 2."""
    funnel = ("--predictor", "preview", "--prune_expand", "4", "--prune_funnel", "1:0.5,2:0.5")
    trainer = make_trainer(pipeline_dir, tmp_path, *VARIANCE, *funnel)
    metrics = pruned_step(trainer)
    first, second = trainer.pruner.stage_steps
    assert len(first.predicted) == 32 and len(second.predicted) == 16
    last, state = trainer.pruner.last, trainer.state
    assert last.selection.keep.sum() == 8 and torch.equal(
        torch.bincount(last.group_ids[last.selection.keep]), torch.tensor([4, 4])
    )
    # denoising: 32 x 1 + 16 x 1 + 8 x 2 calls; previews of 32 and 16, then 8 finals
    assert state.transformer_calls == 32 + 16 + 16 and state.decodes == 32 + 16 + 8 and state.reward_calls == 56
    assert metrics["prune/survivor_frac"] == 0.25 and metrics["predict/decodes"] == 48
    trainer.cleanup()


def test_funnel_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="steps must increase"):
        parse_config([*VARIANCE, "--predictor", "preview", "--prune_funnel", "4:0.5,2:0.5"])
    with pytest.raises(ValueError, match="not 'step:fraction'"):
        parse_config([*VARIANCE, "--predictor", "preview", "--prune_funnel", "2-0.5"])
    with pytest.raises(ValueError, match="use preview or lookahead"):
        parse_config([*VARIANCE, "--predictor", "reward", "--prune_funnel", "2:0.5,4:0.5"])
    with pytest.raises(ValueError, match=r"leaves \[4, 2\] rollouts per group from 8 started"):
        parse_config([*VARIANCE, "--predictor", "preview", "--prune_funnel", "2:0.5,4:0.5", "--prune_explore", "3"])


def test_a_funnel_owns_its_counts(caplog):
    """capture_step and prune_keep_fraction are the single-stage settings: a funnel warns that it ignores them,
    and its exploration slice is checked against its own stages, not against prune_keep_fraction's count."""
    funnel = [*VARIANCE, "--predictor", "preview", "--prune_expand", "4", "--prune_funnel", "2:0.75,4:0.5"]
    config = parse_config([*funnel, "--group_size", "4", "--prune_keep_fraction", "0.1", "--prune_explore", "3"])
    assert funnel_group_sizes(config.started_group_size, config.pruning_stages) == [12, 6]
    assert "prune_keep_fraction=0.1'] ignored" in caplog.text


def test_the_exploration_slice_logs_the_real_reward_spread_of_an_unselected_subset(pipeline_dir, tmp_path):
    """What selection buys is read beside an unselected baseline: prune/explore_reward_std is the mean over groups
    of the population std of the random explorers' real rewards (the oracle's predictions are those rewards)."""
    extra = ("--predictor", "reward", "--prune_expand", "2", "--prune_explore", "2")
    trainer = make_trainer(pipeline_dir, tmp_path, *VARIANCE[:-4], *extra, "--probe_path", "")
    metrics = pruned_step(trainer)
    last = trainer.pruner.last
    explore = last.selection.explore
    stds = [last.predicted[explore & (last.group_ids == g)].double().std(unbiased=False) for g in (0, 1)]
    assert int(explore.sum()) == 4 and metrics["prune/explore_reward_std"] == pytest.approx(float(sum(stds) / 2))
    trainer.cleanup()
