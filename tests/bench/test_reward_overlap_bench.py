"""bench/reward_overlap.py in its smoke mode: both slow rewards, with and without overlap, on the shipped tiny model."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.reward_overlap import RESULTS_SECTION, main, summarise


def test_bounds_by_hand():
    # sampling 4 s, reward 2 s, 4 chunks: perfect overlap 4, with 4 chunks 4 + 2 / 4, none 4 + 2
    off = {"sample_s": 4.0, "reward_s": 2.0, "rollout_s": 6.0, "step_s": 7.0}
    s = summarise(off, {"rollout_s": 4.5, "step_s": 5.5}, chunks=4)
    assert (s["bound_max_s"], s["bound_chunks_s"], s["bound_sum_s"]) == (4.0, 4.5, 6.0)
    assert s["hidden_frac"] == pytest.approx(0.75) and s["speedup"] == pytest.approx(7 / 5.5)


def test_smoke_run_writes_json_and_a_results_section(tmp_path):
    out, results = tmp_path / "overlap.json", tmp_path / "RESULTS.md"
    report = main(["--smoke", "true", "--out", str(out), "--results", str(results)])
    assert json.loads(out.read_text()) == report
    assert [(run["reward"], run["overlap"]) for run in report["runs"]] == [
        ("slow", False), ("slow", True), ("remote", False), ("remote", True)
    ]  # fmt: skip
    assert report["shape"]["chunks"] == 2 and set(report["summary"]) == {"slow", "remote"}
    for run in report["runs"]:
        assert run["steps"] == 1 and run["sample_s"] > 0 and run["reward_s"] > 0
    text = results.read_text()
    assert f"## {RESULTS_SECTION}" in text and "| slow |" in text and "| remote |" in text
