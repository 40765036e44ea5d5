"""Pruning policies, exploration, group skipping and advantage modes on fixed tensors (rl/pruning.py)."""

import itertools
import math

import numpy as np
import pytest
import torch

from rl.config_parse import parse_config
from rl.prune_policies import PRUNE_POLICIES, PrunePolicy, keep_count, register
from rl.prune_policies.variance import max_variance_subset
from rl.pruning import (
    Selection,
    calibrate,
    impute_rewards,
    pruned_advantages,
    select_survivors,
    trained_step_weights,
)

# two groups of 4, deliberately interleaved: group 7 = rows 0, 2, 4, 6; group 3 = rows 1, 3, 5, 7
GROUPS = torch.tensor([7, 3, 7, 3, 7, 3, 7, 3])
# group 7 predictions (rows 0, 2, 4, 6): 0.1, 0.9, 0.5, 0.3 -> best first: 2, 4, 6, 0
# group 3 predictions (rows 1, 3, 5, 7): 0.4, 0.2, 0.8, 0.6 -> best first: 5, 7, 1, 3
PREDICTED = torch.tensor([0.1, 0.4, 0.9, 0.2, 0.5, 0.8, 0.3, 0.6])


def kept(selection):
    return selection.survivors.tolist()


def test_keep_count_rounds_half_up_and_keeps_two():
    assert keep_count(8, 0.5) == 4 and keep_count(8, 0.3) == 2  # 2.4 -> 2
    assert keep_count(8, 0.3125) == 3  # 2.5 rounds up
    assert keep_count(8, 0.1) == 2  # 0.8 -> 1, but a group needs two survivors for contrast
    assert keep_count(3, 1.0) == 3


def test_none_keeps_everything():
    selection = select_survivors(PREDICTED, GROUPS, "none", 0.5, explore=2, min_spread=10.0)
    assert selection.keep.all() and not selection.explore.any() and not selection.skipped.any()


def test_topk_keeps_the_best_predicted_half_of_each_group():
    assert kept(select_survivors(PREDICTED, GROUPS, "topk", 0.5)) == [2, 4, 5, 7]


def test_maxvar_keeps_the_extremes():
    # group 7 best/worst: 2 (0.9) and 0 (0.1); group 3: 5 (0.8) and 3 (0.2)
    assert kept(select_survivors(PREDICTED, GROUPS, "maxvar", 0.5)) == [0, 2, 3, 5]
    # three survivors: best, worst, 2nd best -> group 7: 2, 0, 4; group 3: 5, 3, 7
    assert kept(select_survivors(PREDICTED, GROUPS, "maxvar", 0.75)) == [0, 2, 3, 4, 5, 7]


def test_threshold_keeps_predictions_above_the_cut_and_at_least_two():
    # cut 0.45: group 7 has 0.9, 0.5 (rows 2, 4); group 3 has 0.8, 0.6 (rows 5, 7)
    assert kept(select_survivors(PREDICTED, GROUPS, "threshold", threshold=0.45)) == [2, 4, 5, 7]
    # cut 0.85: group 7 only row 2 passes -> topped up with its next best (4); group 3 none -> its best two (5, 7)
    assert kept(select_survivors(PREDICTED, GROUPS, "threshold", threshold=0.85)) == [2, 4, 5, 7]
    # cut 0.0: everything passes
    assert len(kept(select_survivors(PREDICTED, GROUPS, "threshold", threshold=0.0))) == 8


def test_random_is_seeded_and_ignores_predictions():
    first = select_survivors(PREDICTED, GROUPS, "random", 0.5, seed=[1, 2])
    again = select_survivors(-PREDICTED, GROUPS, "random", 0.5, seed=[1, 2])
    assert torch.equal(first.keep, again.keep)
    for group in (3, 7):
        assert int(first.keep[GROUPS == group].sum()) == 2
    draws = {tuple(kept(select_survivors(PREDICTED, GROUPS, "random", 0.5, seed=s))) for s in range(20)}
    assert len(draws) > 5


def test_exploration_slice_replaces_policy_picks_and_keeps_the_count():
    for seed in range(10):
        selection = select_survivors(PREDICTED, GROUPS, "topk", 0.5, explore=1, seed=seed)
        assert int(selection.explore.sum()) == 2 and (selection.keep | ~selection.explore).all()
        for group, ranking in ((7, [2, 4, 6, 0]), (3, [5, 7, 1, 3])):
            members = GROUPS == group
            assert int(selection.keep[members].sum()) == 2
            (explored,) = torch.nonzero(selection.explore & members).flatten().tolist()
            # the policy fills the other slot with the best predicted rollout that was not explored
            best_other = next(r for r in ranking if r != explored)
            assert selection.keep[best_other]
    explored = {tuple(select_survivors(PREDICTED, GROUPS, "topk", 0.5, 1, seed=s).explore.tolist()) for s in range(20)}
    assert len(explored) > 3


def test_groups_with_low_predicted_spread_are_skipped():
    predicted = PREDICTED.clone()
    predicted[GROUPS == 3] = torch.tensor([0.50, 0.51, 0.49, 0.50])  # population std ~0.0071
    selection = select_survivors(predicted, GROUPS, "topk", 0.5, explore=1, min_spread=0.01)
    assert torch.equal(selection.skipped, GROUPS == 3) and not selection.keep[GROUPS == 3].any()
    assert int(selection.keep[GROUPS == 7].sum()) == 2 and selection.skipped_groups(GROUPS) == 1
    # a cut above every group's spread would skip all: the widest group (7, std ~0.30) is kept
    everything = select_survivors(predicted, GROUPS, "topk", 0.5, min_spread=1.0)
    assert torch.equal(everything.skipped, GROUPS == 3) and kept(everything) == [2, 4]


def test_bad_arguments_fail_by_name():
    with pytest.raises(ValueError, match="prune_policy"):
        select_survivors(PREDICTED, GROUPS, "best")
    with pytest.raises(ValueError, match="keep_fraction"):
        select_survivors(PREDICTED, GROUPS, "topk", 0.0)
    with pytest.raises(ValueError, match="prune_advantage"):
        pruned_advantages(PREDICTED, PREDICTED, GROUPS > 0, GROUPS, "mean")


def test_calibration_slope_uses_within_group_deviations():
    # group 0: p = (0, 2), r = (1, 2) -> deviations p (-1, 1), r (-0.5, 0.5)
    # group 1: p = (10, 12), r = (5, 7) -> p (-1, 1), r (-1, 1)
    # slope = sum(p r) / sum(p^2) = (0.5 + 0.5 + 1 + 1) / 4 = 0.75 (the level gap 0 vs 10 does not count)
    slope = calibrate(torch.tensor([0.0, 2, 10, 12]), torch.tensor([1.0, 2, 5, 7]), torch.tensor([0, 0, 1, 1]))
    assert slope == pytest.approx(0.75)
    assert calibrate(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([0, 0])) == 0.0
    assert calibrate(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([0, 0])) == 0.0  # backwards


def test_imputations_stay_within_the_real_reward_range():
    # survivors r = (1, 0) at p = (0.8, 0.6); slope 10 would impute 0.5 + 10 (0.0 - 0.7) = -6.5 -> clipped to 0
    rewards, keep = torch.tensor([1.0, 0.0, math.nan]), torch.tensor([True, True, False])
    imputed = impute_rewards(rewards, torch.tensor([0.8, 0.6, 0.0]), keep, torch.zeros(3, dtype=torch.long), 10.0)
    assert imputed.tolist() == [1.0, 0.0, 0.0]


def test_imputed_rewards_and_advantages_by_hand():
    # one group of 4: survivors rows 0, 1 with p = (0.8, 0.6), r = (1.0, 0.0); pruned rows 2, 3 with p = (0.2, 0.4)
    predicted = torch.tensor([0.8, 0.6, 0.2, 0.4])
    rewards = torch.tensor([1.0, 0.0, math.nan, math.nan])
    keep = torch.tensor([True, True, False, False])
    groups = torch.zeros(4, dtype=torch.long)
    # slope 0.5: level = mean r - 0.5 mean p = 0.5 - 0.35 = 0.15 -> imputed 0.15 + 0.1 = 0.25, 0.15 + 0.2 = 0.35
    imputed = impute_rewards(rewards, predicted, keep, groups, slope=0.5)
    torch.testing.assert_close(imputed, torch.tensor([1.0, 0.0, 0.25, 0.35], dtype=torch.float64))
    # full group (1, 0, 0.25, 0.35): mean 0.4, population std sqrt((0.36 + 0.16 + 0.0225 + 0.0025) / 4) = sqrt(0.13625)
    advantages = pruned_advantages(rewards, predicted, keep, groups, "imputed", slope=0.5)
    std = math.sqrt(0.13625) + 1e-4
    expected = torch.tensor([0.6 / std, -0.4 / std, -0.15 / std, -0.05 / std])
    torch.testing.assert_close(advantages, expected, rtol=1e-5, atol=1e-6)
    # survivors mode: (1, 0) -> mean 0.5, std 0.5 -> +-0.5 / (0.5 + 1e-4); pruned rows 0
    survivors = pruned_advantages(rewards, predicted, keep, groups, "survivors")
    torch.testing.assert_close(survivors, torch.tensor([0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0]))


def test_imputed_mode_calibrates_on_the_batch_by_default():
    # group 0: survivors rows 0, 1 (p 0.6, 0.4; r 1, 0), pruned row 2 (p 0.5)
    # group 1: survivors rows 4, 5 (p 0.7, 0.5; r 2, 1), pruned row 3 (p 0.3)
    predicted = torch.tensor([0.6, 0.4, 0.5, 0.3, 0.7, 0.5])
    rewards = torch.tensor([1.0, 0.0, math.nan, math.nan, 2.0, 1.0])
    keep = torch.tensor([True, True, False, False, True, True])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    # both pairs: p deviations +-0.1, r deviations +-0.5 -> slope 5
    assert calibrate(predicted[keep], rewards[keep], groups[keep]) == pytest.approx(5.0)
    # row 2: 0.5 + 5 (0.5 - 0.5) = 0.5; row 3: 1.5 + 5 (0.3 - 0.6) = 0
    imputed = impute_rewards(rewards, predicted, keep, groups, 5.0)
    torch.testing.assert_close(imputed[[2, 3]], torch.tensor([0.5, 0.0], dtype=torch.float64))
    default = pruned_advantages(rewards, predicted, keep, groups, "imputed")
    explicit = pruned_advantages(rewards, predicted, keep, groups, "imputed", slope=5.0)
    torch.testing.assert_close(default, explicit, rtol=0, atol=1e-6)  # the fitted slope is 5 up to rounding


def test_imputation_needs_a_survivor_per_group():
    with pytest.raises(ValueError, match="no survivor"):
        impute_rewards(torch.zeros(2), torch.zeros(2), torch.tensor([False, False]), torch.tensor([0, 0]), 1.0)


def test_trained_step_weights_mask_unrecorded_steps_and_invalid_rollouts():
    # rows: a finished survivor (T = 4), an invalid survivor, two pruned rollouts stopped at k = 2
    valid = torch.tensor([True, False, True, True])
    steps = torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 2], [1, 2, 0]])  # a row's steps need not be sorted
    recorded = torch.tensor([4, 4, 2, 2])
    expected = [[1, 1, 1], [0, 0, 0], [1, 1, 0], [1, 0, 1]]
    assert trained_step_weights(valid, steps, recorded).tolist() == expected
    # without recorded steps (the unpruned trainer): the rollout's validity in every column
    assert trained_step_weights(valid, steps).tolist() == [[1, 1, 1], [0, 0, 0], [1, 1, 1], [1, 1, 1]]


@pytest.mark.parametrize("size, count", [(4, 2), (5, 3), (8, 4), (9, 2), (10, 5), (6, 6), (6, 1)])
def test_max_variance_subset_equals_brute_force(size, count):
    rng = np.random.default_rng(size * 31 + count)
    for trial in range(40):
        scores = rng.normal(size=size) if trial % 2 else rng.exponential(size=size)  # skewed half the time
        if trial % 5 == 0:
            scores = np.round(scores, 1)  # ties
        scores = scores * 10.0 ** rng.choice([-8, 0, 3])  # a spread of any scale (an absolute epsilon failed 1e-8)
        chosen = max_variance_subset(scores, count)
        best = max(np.var(scores[list(c)]) for c in itertools.combinations(range(size), count))
        assert len(set(chosen.tolist())) == count and np.var(scores[chosen]) == pytest.approx(best, rel=1e-6)


def test_max_variance_subset_takes_an_uneven_split_when_skewed():
    # one outlier and many alike: the optimum is the outlier plus the 3 lowest, not 2 + 2
    scores = np.array([0.0, 0.01, 0.02, 0.5, 0.51, 0.52, 5.0])
    assert max_variance_subset(scores, 4).tolist() == [0, 1, 2, 6]
    with pytest.raises(ValueError, match="cannot choose 8 of 7"):
        max_variance_subset(scores, 8)


def test_variance_policy_keeps_the_max_variance_half_of_each_group():
    # group 7: 0.1, 0.9, 0.5, 0.3 -> {0.1, 0.9} (rows 0, 2); group 3: 0.4, 0.2, 0.8, 0.6 -> {0.2, 0.8} (rows 3, 5)
    selection = select_survivors(PREDICTED, GROUPS, "variance", keep_fraction=0.5)
    assert torch.nonzero(selection.keep).flatten().tolist() == [0, 2, 3, 5]


@pytest.mark.parametrize("policy", ["variance", "maxvar", "topk", "threshold"])
def test_a_nan_prediction_is_no_prediction_and_every_group_keeps_its_count(policy):
    """A preview whose reward failed predicts NaN: the policy chooses among the finite predictions, and NaN rows
    fill only what those cannot (the variance rule dropped every split holding a NaN: a group kept nobody)."""
    predicted = PREDICTED.clone()
    predicted[[0, 2, 4]] = math.nan  # group 7: only row 6 (0.3) is known
    predicted[1] = math.nan  # group 3: rows 3, 5, 7 known (0.2, 0.8, 0.6)
    selection = select_survivors(predicted, GROUPS, policy, keep_fraction=0.5)
    rows = torch.nonzero(selection.keep).flatten().tolist()
    assert 6 in rows and 1 not in rows and len([r for r in rows if r % 2 == 0]) == 2  # 6 plus one unknown
    if policy in ("variance", "maxvar"):
        assert rows == [0, 3, 5, 6]  # group 3: the known extremes 0.2 and 0.8


def test_a_new_policy_is_one_registered_class_that_the_config_and_the_selection_use():
    @register("worst_for_test")
    class Worst(PrunePolicy):  # keeps the worst predicted: the opposite of topk
        def choose(self, rest, scores, need, rng):
            return rest[np.argsort(scores[rest], kind="stable")[:need]]

    try:
        # group 7 worst two: rows 0 (0.1), 6 (0.3); group 3: rows 3 (0.2), 1 (0.4)
        assert kept(select_survivors(PREDICTED, GROUPS, "worst_for_test", 0.5)) == [0, 1, 3, 6]
        config = parse_config(["--prune_policy", "worst_for_test", "--predictor", "preview", "--capture_step", "2"])
        assert config.pruning.prune_policy == "worst_for_test"
        funnel = ["--predictor", "preview", "--prune_expand", "4", "--prune_funnel", "2:0.5,4:0.5"]
        assert parse_config(["--prune_policy", "worst_for_test", *funnel]).pruning_stages == [(2, 0.5), (4, 0.5)]
        with pytest.raises(ValueError, match="fixed-count policy .*worst_for_test"):  # the funnel lists it
            parse_config(["--prune_policy", "threshold", *funnel])
    finally:
        del PRUNE_POLICIES["worst_for_test"]
    with pytest.raises(ValueError, match="worst_for_test"):
        select_survivors(PREDICTED, GROUPS, "worst_for_test")


def test_a_funnels_exploration_slice_is_the_rows_in_every_stages_random_slice():
    from rl.predictors import PredictionCost
    from rl.pruned_rollout import PrunedStep, funnel_step

    def stage(size, keep, explore):
        flags = [torch.zeros(size, dtype=torch.bool) for _ in range(3)]
        flags[0][keep], flags[1][explore] = True, True
        return PrunedStep(torch.zeros(size), torch.zeros(size), Selection(*flags), None, 0.5, PredictionCost())

    # 8 started -> rows 0-3 survive (0, 1 explored) -> of those, rows 0 and 2 survive (0 and 2 explored)
    combined = funnel_step([stage(8, [0, 1, 2, 3], [0, 1]), stage(4, [0, 2], [0, 2])])
    assert combined.selection.survivors.tolist() == [0, 2]
    # row 2 was first picked by the stage-1 policy: its reward is no unselected baseline
    assert torch.nonzero(combined.selection.explore).flatten().tolist() == [0]
