"""summary.json: the held-out gain, and a finished run recognised only at or after its trained end."""

from rl.run_summary import finished_summary, held_out_summary, write_summary


def test_delta_is_final_minus_base_of_every_mean_both_have():
    summary = held_out_summary(
        160, 20480, 24.99999, "shapes:test", 64, 4,
        base={"total/mean": 0.25, "total/std": 0.1, "shapes/mean": 0.5},
        final={"total/mean": 0.75, "total/std": 0.3, "tag/new/mean": 1.0},
    )  # fmt: skip
    assert summary["delta"] == {"total/mean": 0.5}  # stds and means only one side has are not deltas
    assert summary["minutes"] == 25.0 and summary["steps"] == 160


def test_a_run_is_finished_only_from_its_summary_step_on(tmp_path):
    assert finished_summary(tmp_path, 0) is None  # no summary: not finished
    summary = held_out_summary(12, 96, 1.0, "shapes:test", 4, 1, {"total/mean": 0.1}, {"total/mean": 0.2})
    write_summary(tmp_path, summary)
    assert finished_summary(tmp_path, 12) == summary and finished_summary(tmp_path, 8) == summary
    assert finished_summary(tmp_path, 13) is None  # resumed past it: a longer run, not finished
