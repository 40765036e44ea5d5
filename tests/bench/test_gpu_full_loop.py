"""The GPU full-loop script's CPU smoke mode: the real entry script, probe pruning, a checkpoint and an exact resume,
under DDP, DeepSpeed ZeRO-2 and ZeRO-3 on one process (the modes the GPU run measures, checked before it has a GPU)."""

import json

from bench.gpu_full_loop import main, report_lines


def test_smoke_runs_the_loop_checkpoints_and_resumes_exactly(tmp_path):
    out = tmp_path / "loop.json"
    work, modes = str(tmp_path / "work"), "ddp,zero2,zero3"
    result = main(["--smoke", "--steps", "3", "--modes", modes, "--work", work, "--out", str(out), "--results", ""])
    assert json.loads(out.read_text()) == result and result["predictor"] == "probe"
    for mode in ("ddp", "zero2", "zero3"):
        run = result["modes"][mode]
        assert run["steps"] == 3
        assert run["survivor_frac"] == 0.5  # half of each group kept by the probe
        assert run["resume_max_abs_diff"] == 0.0  # resumed from step 1, it ends where the whole run ended
        assert run["phase_s"]["sample"] > 0 and run["phase_s"]["train"] > 0 and run["phase_s"]["predict"] > 0
        assert run["memory_mib"]["lora_mib"] > 0 and run["memory_mib"]["peak_mib"] > 0
    table = report_lines(result, "python bench/gpu_full_loop.py --smoke")
    assert [line.split(" | ")[0] for line in table[-3:]] == ["| ddp", "| zero2", "| zero3"]
    assert all("0.00e+00 |" in line for line in table[-3:])
