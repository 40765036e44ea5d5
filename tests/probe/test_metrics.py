import math

import numpy as np
import pytest

from probe.metrics import (
    auc_roc,
    expected_best_of_picks,
    expected_best_of_random_subset,
    pearson,
    probe_metrics,
    spearman,
    top_half_membership,
)


def test_global_metrics_by_hand():
    # means 2 and 7/3; deviations [-1, 0, 1] and [-4/3, -1/3, 5/3]: cov 3, variances 2 and 42/9.
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 42 / 9))
    assert spearman([1, 2, 3], [1, 2, 4]) == pytest.approx(1.0)
    # positives 0.35 and 0.8 against negatives 0.1 and 0.4: 3 of 4 pairs ordered right.
    assert auc_roc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    assert auc_roc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie counts one half
    assert math.isnan(auc_roc([1, 2], [1, 1]))


def test_group_helpers_by_hand():
    # max of a random pair from {1, 2, 3, 4}: 2, 3, 4, 3, 4, 4 over the 6 pairs.
    assert expected_best_of_random_subset(np.array([1.0, 2, 3, 4]), 2) == pytest.approx(20 / 6)
    # sorted [1, .5, .5, 0], keep 2: the 1 is in; the two 0.5s share the remaining place.
    assert top_half_membership(np.array([1.0, 0.5, 0.5, 0.0]), 2).tolist() == [1.0, 0.5, 0.5, 0.0]


def test_within_group_metrics_by_hand():
    reward = [1, 2, 3, 4] + [0, 1, 1, 0.5] + [1, 0.5, 0.5, 0] + [0.3, 0.3]
    prediction = [0.1, 0.2, 0.4, 0.3] + [0.9, 0.1, 0.2, 0.8] + [0.1, 0.9, 0.2, 0.3] + [0.0, 1.0]
    group = [0] * 4 + [1] * 4 + [2] * 4 + [3] * 2
    m = probe_metrics(np.array(prediction), np.array(reward), np.array(group))
    # A: pred ranks [1,2,4,3] vs [1,2,3,4]: sum d^2 = 2, rho = 1 - 6*2/(4*15) = 0.8.
    # B: ranks [4,1,2,3] vs [1,3.5,3.5,2]: cov -4.5, var 5 and 4.5 -> -4.5/sqrt(22.5).
    # C: ranks [1,4,2,3] vs [4,2.5,2.5,1]: cov -3 -> -3/sqrt(22.5). D is constant: left out.
    assert m["within_group_srcc"] == pytest.approx((0.8 - 4.5 / math.sqrt(22.5) - 3 / math.sqrt(22.5)) / 3)
    # Recall: A picks rewards {3,4} = the top half (1); B picks {0, 0.5}, misses both 1s (0);
    # C picks idx 1 (half a place at the tie) and idx 3 (0): 0.5 / 2 = 0.25.
    assert m["top_half_recall"] == pytest.approx((1 + 0 + 0.25) / 3)
    # Regret: A 4-4, B 1-0.5, C 1-0.5, D 0.  Random: A 4-20/6, B 1-E, C 1-E', D 0.
    assert m["regret"] == pytest.approx((0 + 0.5 + 0.5 + 0) / 4)
    b_random = 1 - expected_best_of_random_subset(np.array([0, 1, 1, 0.5]), 2)  # 1 - (1*5 + .5*1)/6
    assert b_random == pytest.approx(1 - 5.5 / 6)
    c_random = 1 - (1 * 3 + 0.5 * 2 + 0.5 * 1) / 6
    assert m["regret_random"] == pytest.approx((4 - 20 / 6 + b_random + c_random + 0) / 4)
    assert m["groups"] == 4 and m["constant_groups"] == 1 and m["n"] == 14
    assert m["median"] == pytest.approx(0.75)  # 7th and 8th of 14 sorted rewards: 0.5 and 1
    assert m["auc"] == pytest.approx(auc_roc(prediction, np.array(reward) > 0.75))


def test_a_constant_prediction_scores_as_random_and_a_nan_one_scores_nothing():
    """Ties in the prediction break at random: a constant probe gets a random pick's recall and regret whatever
    the rows' order (stable sorting gave 0.5 or 1.0 by order); a diverged (NaN) probe gets NaN, not a
    believable 0 regret that could pick its checkpoint."""
    reward = np.array([4.0, 3, 2, 1])
    for order in (reward, reward[::-1]):
        m = probe_metrics(np.zeros(4), order, np.zeros(4))
        assert m["top_half_recall"] == pytest.approx(0.5)
        assert m["regret"] == pytest.approx(m["regret_random"]) == pytest.approx(4 - 20 / 6)
    # a tie at the cutoff only: 0.9 is picked, one of the two 0.5s joins it at random
    assert expected_best_of_picks(np.array([0.9, 0.5, 0.5, 0.1]), np.array([1.0, 3, 2, 4]), 2) == pytest.approx(2.5)
    m = probe_metrics(np.array([0.1, math.nan, 0.3, 0.2]), reward, np.zeros(4))
    assert all(math.isnan(m[key]) for key in ("within_group_srcc", "top_half_recall", "regret"))
