"""The funnel search on hand-made rewards and previews: the budget, the gain formula and the pick/held-out split."""

import json

import numpy as np
import pytest

from bench.funnel_search import Stage, as_stage, funnels, gain_of, main
from bench.seed_selection import funnel_picks


def gain_recovered(real: np.ndarray, predictions: list[np.ndarray], keeps: list[int]) -> float:
    return gain_of(real, funnel_picks(real, predictions, keeps))


def test_funnels_stay_within_the_budget_and_cost_what_the_formula_says():
    two, three = Stage("preview@2", 2, 0), Stage("preview@3", 3, 0)
    found = list(funnels([two, three], n=4, max_stages=2, num_steps=4, max_calls=8.0))
    # one stage at step k keeping K: 4 k + K (4 - k); two stages: 4 * 2 + K1 * 1 + K2 * 1
    expected = {("preview@2", 1): 10.0, ("preview@3", 1): 13.0, ("preview@2>preview@3", 2, 1): 11.0}
    assert found == []  # nothing fits in 8 calls: the first stage alone costs 8 and a survivor must finish
    found = {(">".join(s.name for s in c), *k): calls for c, k, calls in funnels([two, three], 4, 2, 4, 11.0)}
    assert found == {key: value for key, value in expected.items() if value <= 11.0}
    # a preview in 2 Euler steps pays one call per seed alive at its stage: 4 * 2 + 4 * 1 + 1 * 2 = 14
    longer = Stage("preview@2+2", 2, 1)
    found = {(">".join(s.name for s in c), *k): calls for c, k, calls in funnels([two, longer], 4, 2, 4, 14.0)}
    assert found == {("preview@2", 1): 10.0, ("preview@2", 2): 12.0, ("preview@2", 3): 14.0, ("preview@2+2", 1): 14.0}


def test_a_lookahead_is_read_as_the_longer_preview_one_step_later():
    assert as_stage("lookahead@3+2", 10) == Stage("preview@4+2", 4, 1)
    assert as_stage("lookahead@2", 10) == Stage("preview@3+2", 3, 1)  # the lookahead's default: 2 Euler steps
    assert as_stage("preview@4", 10) == Stage("preview@4", 4, 0)
    assert as_stage("preview@3+3", 10) == Stage("preview@3+3", 3, 2)
    assert as_stage("preview@9+3", 10) == Stage("preview@9+3", 9, 1)  # from step 8 only 2 Euler steps fit
    assert as_stage("probe@4", 10) is None


def test_gain_recovered_is_one_for_a_perfect_preview_and_zero_for_the_worst():
    real = np.array([[0.1, 0.9, 0.5, 0.3], [0.7, 0.2, 0.4, 0.0]])
    assert gain_recovered(real, [real], [1]) == pytest.approx(1.0)
    assert gain_recovered(real, [-real], [1]) == pytest.approx((0.05 - real.mean()) / (0.8 - real.mean()))
    assert gain_recovered(real, [-real], [4]) == pytest.approx(1.0)  # keeping all: the real reward picks


def test_the_search_picks_on_even_prompts_and_quotes_the_odd_ones(tmp_path):
    rng = np.random.default_rng(0)
    real = rng.random((8, 4))
    noisy = real + rng.normal(0, 0.3, real.shape)
    raw = {"base/real": real, "base/preview@2": noisy, "base/lookahead@2+2": real}  # preview@3+2 ranks perfectly
    np.savez(tmp_path / "raw.npz", **raw)
    args = ["--raw", str(tmp_path / "raw.npz"), "--n", "4", "--num_steps", "4", "--budget", "0.9",
            "--max_stages", "2", "--out", str(tmp_path / "s.json"), "--results", ""]  # fmt: skip
    results = main(args)["base"]
    rows = results["funnels"]
    assert results["prompts"] == 8 and results["previews"] == ["preview@2", "preview@3+2"]
    assert [r["gain_pick"] for r in rows] == sorted((r["gain_pick"] for r in rows), reverse=True)
    best = rows[0]
    assert best["gain_pick"] == pytest.approx(1.0)
    stages = [{"preview@2": noisy, "preview@3+2": real}[stage] for stage in best["funnel"].split(">")]
    assert best["gain_held_out"] == gain_recovered(real[1::2], [s[1::2] for s in stages], best["keeps"])
    assert best["gain_pick"] == gain_recovered(real[0::2], [s[0::2] for s in stages], best["keeps"])
    assert min(r["gain_pick"] for r in rows) < 1  # the noisy preview alone, keeping one, misses sometimes
    written = json.loads((tmp_path / "s.json").read_text())["models"]["base"]
    assert written["funnels"][0] == best and written["count"] == len(rows)


def test_files_of_more_seeds_merge_on_their_first_n_and_models_can_be_chosen(tmp_path):
    rng = np.random.default_rng(1)
    real = rng.random((4, 8))
    np.savez(tmp_path / "a.npz", **{"base/real": real, "base/preview@3": real, "lora/real": real})
    np.savez(tmp_path / "b.npz", **{"base/real": real[:, :4], "base/preview@4": real[:, :4], "lora/real": -real})
    common = ["--n", "4", "--num_steps", "4", "--budget", "1.0", "--max_stages", "1", "--results", ""]
    with pytest.raises(SystemExit, match="holds 4 seeds per prompt, fewer than --n 8"):
        main(["--raw", str(tmp_path / "b.npz"), "--out", str(tmp_path / "s.json"), *common[2:], "--n", "8"])
    with pytest.raises(SystemExit, match="lora/real differs"):
        main(["--raw", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--out", str(tmp_path / "s.json"), *common])
    results = main(["--raw", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), "--models", "base",
                    "--out", str(tmp_path / "s.json"), *common])  # fmt: skip
    assert list(results) == ["base"] and results["base"]["previews"] == ["preview@3", "preview@4"]


def test_a_file_from_the_seed_selection_bench_is_read_with_its_sampler_recorded(tmp_path):
    real = np.random.default_rng(2).random((4, 4))
    meta = {"meta/num_steps": 4, "meta/reward": "shapes"}  # what bench/seed_selection.py --raw adds
    np.savez(tmp_path / "r.npz", **{"base/real": real, "base/preview@2": real, **meta})
    common = ["--raw", str(tmp_path / "r.npz"), "--out", str(tmp_path / "s.json"), "--n", "4", "--budget", "1.0",
              "--max_stages", "1", "--results", ""]  # fmt: skip
    assert list(main([*common, "--num_steps", "4"])) == ["base"]  # an IndexError on meta/ before
    with pytest.raises(SystemExit, match="sampled with 4 denoising steps: pass --num_steps 4"):
        main([*common, "--num_steps", "10"])
