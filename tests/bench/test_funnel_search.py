"""The funnel search on hand-made rewards and previews: the budget, the gain formula and the pick/held-out split."""

import json

import numpy as np
import pytest

from bench.funnel_search import funnels, gain_recovered, main


def test_funnels_stay_within_the_budget_and_cost_what_the_formula_says():
    found = list(funnels([2, 3], n=4, max_stages=2, num_steps=4, max_calls=8.0))
    # one stage at step k keeping K: 4 k + K (4 - k); two stages: 4 * 2 + K1 * 1 + K2 * 1
    expected = {((2,), (1,)): 10.0, ((3,), (1,)): 13.0, ((2, 3), (2, 1)): 11.0}
    assert all(calls <= 8.0 for _, _, calls in found)
    assert found == []  # nothing fits in 8 calls: the first stage alone costs 8 and a survivor must finish
    found = {(tuple(c), tuple(k)): calls for c, k, calls in funnels([2, 3], 4, 2, 4, max_calls=11.0)}
    assert found == {key: value for key, value in expected.items() if value <= 11.0}


def test_gain_recovered_is_one_for_a_perfect_preview_and_zero_for_the_worst():
    real = np.array([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 0.4, 0.0]])
    assert gain_recovered(real, [real], [1]) == pytest.approx(1.0)
    assert gain_recovered(real, [-real], [1]) == pytest.approx((0.05 - real.mean()) / (0.8 - real.mean()))
    assert gain_recovered(real, [-real], [4]) == pytest.approx(1.0)  # keeping all: the real reward picks


def test_the_search_picks_on_even_prompts_and_quotes_the_odd_ones(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.random((8, 4))
    noisy = real + rng.normal(0, 0.3, real.shape)
    raw = {"base/real": real, "base/preview@2": noisy, "base/preview@3": real}  # step 3 ranks perfectly
    np.savez(tmp_path / "raw.npz", **raw)
    args = ["--raw", str(tmp_path / "raw.npz"), "--n", "4", "--num_steps", "4", "--budget", "0.9",
            "--max_stages", "2", "--out", str(tmp_path / "s.json"), "--results", ""]  # fmt: skip
    results = main(args)["base"]
    rows = results["funnels"]
    assert results["prompts"] == 8 and results["preview_steps"] == [2, 3]
    assert [r["gain_pick"] for r in rows] == sorted((r["gain_pick"] for r in rows), reverse=True)
    best = rows[0]
    assert best["gain_pick"] == pytest.approx(1.0)
    stages = [raw[f"base/{stage}"] for stage in best["funnel"].split(">")]
    assert best["gain_held_out"] == gain_recovered(real[1::2], [s[1::2] for s in stages], best["keeps"])
    assert best["gain_pick"] == gain_recovered(real[0::2], [s[0::2] for s in stages], best["keeps"])
    assert min(r["gain_pick"] for r in rows) < 1  # the noisy preview alone, keeping one, misses sometimes
    written = json.loads((tmp_path / "s.json").read_text())["models"]["base"]
    assert written["funnels"][0] == best and written["count"] == len(rows)
