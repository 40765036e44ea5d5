"""The GPU full-loop script's CPU smoke mode: the real entry script, pruning, a checkpoint and an exact resume."""

import json

from bench.gpu_full_loop import main, report_lines


def test_smoke_runs_the_loop_checkpoints_and_resumes_exactly(tmp_path):
    out = tmp_path / "loop.json"
    result = main(["--smoke", "--steps", "3", "--work", str(tmp_path / "work"), "--out", str(out), "--results", ""])
    assert json.loads(out.read_text()) == result
    ddp = result["modes"]["ddp"]
    assert ddp["steps"] == 3
    assert ddp["survivor_frac"] == 0.5  # half of each group kept after the preview
    assert ddp["resume_max_abs_diff"] == 0.0  # resumed from step 1, it ends where the whole run ended
    assert ddp["phase_s"]["sample"] > 0 and ddp["phase_s"]["train"] > 0 and ddp["phase_s"]["predict"] > 0
    assert ddp["memory_mib"]["lora_mib"] > 0 and ddp["memory_mib"]["peak_mib"] > 0
    table = report_lines(result, "python bench/gpu_full_loop.py --smoke")
    assert table[-1].startswith("| ddp | ") and "0.00e+00 |" in table[-1]
