"""bench/predictor_quality.py: the selection arithmetic by hand, and the whole bench on a fixture collection."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.predictor_quality import main, selection_gain


def test_selection_gain_by_hand():
    # one group of 4: real rewards 0, 1, 2, 3; a perfect predictor keeps {0, 3} by variance, {2, 3} by top-k
    reward, group = np.array([0.0, 1.0, 2.0, 3.0]), np.zeros(4, dtype=int)
    gain = selection_gain(reward, reward, group, keep=2, draws=2000)
    pairs = [abs(a - b) / 2 for i, a in enumerate(reward) for b in reward[i + 1 :]]  # std of each of the 6 halves
    assert gain["kept_std_random"] == pytest.approx(np.mean(pairs), rel=0.05)
    assert gain["kept_std_vs_random_variance"] == pytest.approx(1.5 / np.mean(pairs), rel=0.05)
    assert gain["kept_std_vs_random_topk"] == pytest.approx(0.5 / np.mean(pairs), rel=0.05)
    assert gain["variance_kept_std_vs_all"] == pytest.approx(1.5 / np.std(reward))
    assert np.isnan(selection_gain(reward, np.zeros(4), group, keep=2)["kept_std_vs_random_topk"])  # all flat


def test_bench_scores_every_predictor_on_a_collection(tiny_flux_pipeline, tmp_path, run_launch_script):
    tiny_flux_pipeline.save_pretrained(tmp_path / "base")
    # the random fixture draws no shapes (a flat shapes reward): a graded reward
    common = ["--pipeline", str(tmp_path / "base"), "--num_prompts", "2", "--group_size", "4", "--num_steps", "3",
              "--capture_steps", "1", "2", "--batch_size", "8", "--device", "cpu", "--sde_steps", "0",
              "--reward", "jpeg_compressibility"]  # fmt: skip
    run_launch_script("probe_collect", *common, "--out", str(tmp_path / "train"))
    run_launch_script(
        "probe_collect", *common, "--prompts", "shapes:test", "--seed", "1", "--out", str(tmp_path / "test")
    )
    run_launch_script("probe_train", "--train_data", str(tmp_path / "train"), "--test_data", str(tmp_path / "test"),
                      "--capture_step", "2", "--steps", "2", "--eval_every", "1", "--val_fraction", "0.5",
                      "--width", "8", "--out", str(tmp_path / "p.pt"))  # fmt: skip
    out, results = tmp_path / "quality.json", tmp_path / "RESULTS.md"
    main(
        [
            "--data",
            str(tmp_path / "test"),
            "--probe",
            str(tmp_path / "p.pt"),
            "--out",
            str(out),
            "--results",
            str(results),
        ]
    )
    rows = {row["predictor"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"preview@1", "preview@2", "lookahead@1+2", "lookahead@2+2", "probe@2", "oracle"}
    oracle = rows["oracle"]
    assert oracle["pcc"] == pytest.approx(1.0) and oracle["kept_std_vs_random_variance"] >= 1.0
    assert rows["lookahead@1+2"]["extra_transformer_calls"] == 2 and rows["probe@2"]["reward_calls"] == 0
    # from the state after step 2 of 3 the lookahead is the sampler's own last (ODE) step: the final image up to
    # the collection's fp16 storage of that state (it once read the state one step later, with the earlier
    # step's sigmas: here a capture that does not exist)
    assert rows["lookahead@2+2"]["pcc"] > 0.95
    assert "| oracle | 1.000 |" in results.read_text()
