"""``launch/plot.py`` facing a user: a metric the file does not log is one error line naming the close keys."""

import json
import runpy
import sys
from pathlib import Path

import pytest

from rl.user_errors import run_cli

SCRIPT = Path(__file__).resolve().parents[2] / "launch" / "plot.py"


@pytest.fixture
def metrics_file(tmp_path):
    records = [
        {"step": s, "wall_s": 30.0 * s, "train/images_seen": 64 * s, "reward/total/mean": 0.1 * s} for s in (1, 2)
    ]
    path = tmp_path / "run" / "metrics.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_an_unlogged_metric_is_one_error_line_naming_the_close_keys(metrics_file, tmp_path, launch_script, capsys):
    plot = launch_script("plot")
    argv = [str(metrics_file), "--metric", "reward/totl/mean", "--out", str(tmp_path / "c.png")]
    assert run_cli(lambda: plot.main(argv)) == 2
    error = capsys.readouterr().err
    assert error == (
        f"error: none of ['reward/totl/mean'] is logged in ['{metrics_file}']; did you mean reward/total/mean? "
        "(docs/metrics.md lists every key)\n"
    )
    assert not (tmp_path / "c.png").exists()


def test_each_metric_asked_for_by_name_must_be_logged(metrics_file, tmp_path, launch_script, capsys):
    plot = launch_script("plot")
    argv = [str(metrics_file), "--metric", "reward/total/mean", "--metric", "eval/totl/mean"]
    assert run_cli(lambda: plot.main([*argv, "--out", str(tmp_path / "c.png")])) == 2
    assert capsys.readouterr().err.startswith("error: ['eval/totl/mean'] is not logged in ")
    # by default the evaluation curve may be absent (a run without evaluation)
    assert plot.main([str(metrics_file), "--out", str(tmp_path / "c.png")]).is_file()


def test_the_script_exits_2_on_a_bad_metric(metrics_file, tmp_path, monkeypatch, capsys):
    argv = [str(SCRIPT), str(metrics_file), "--metric", "nope", "--out", str(tmp_path / "c.png")]
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the checkout on it
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: none of ['nope'] is logged in ")


def test_help_states_each_default_once(launch_script, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        launch_script("plot").main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "--metric str metric key (repeatable; default: reward/total/mean and eval/total/mean)" in text
    assert "--label str one label per file (default: the run folder's name)" in text


def test_an_evaluation_between_logged_steps_is_placed_at_the_images_generated_by_then(launch_script):
    """log_every 4 and eval_every 10: the step-10 evaluation lies between the records of steps 8 and 12."""
    records = [{"step": 0, "wall_s": 0.0, "eval/total/mean": 0.3}]
    for step in range(1, 21):
        if step % 4 == 0:
            records.append({"step": step, "wall_s": step, "train/images_seen": 32 * step})
        if step % 10 == 0:
            records.append({"step": step, "wall_s": step, "eval/total/mean": 0.4})
    points = launch_script("plot").curve(records, "eval/total/mean")
    assert points["step"] == [0, 10, 20] and points["images"] == [0, 320, 640]
