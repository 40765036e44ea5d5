"""Logging: image grids, resume of the metrics file, wandb fallbacks that never stop a run, launch/plot.py."""

import json

import pytest
import torch

from rl.metrics_log import MetricsAccumulator, MetricsLogger, image_grid, read_metrics


def test_image_grid_places_images_row_by_row():
    # three 2x2 images of constant value 0.2, 0.4, 1.0 in 2 columns -> a 4x4 grid, bottom-right blank
    images = torch.tensor([0.2, 0.4, 1.0])[:, None, None, None].expand(3, 3, 2, 2)
    grid = image_grid(images, columns=2)
    assert grid.shape == (4, 4, 3) and grid.dtype.name == "uint8"
    assert grid[0, 0, 0] == 51 and grid[1, 3, 2] == 102  # round(0.2 * 255), round(0.4 * 255)
    assert (grid[2:, :2] == 255).all() and (grid[2:, 2:] == 0).all()


def test_accumulator_state_round_trips():
    metrics = MetricsAccumulator()
    metrics.add("a", 2.0, 3)
    metrics.add_values("r", torch.tensor([1.0, 3.0]))
    metrics.add_max("m", 5)
    restored = MetricsAccumulator()
    restored.load_state(metrics.state())
    restored.add("a", 6.0, 1)  # (2 * 3 + 6) / 4 = 3
    assert restored.reduce() == pytest.approx({"a": 3.0, "r/mean": 2.0, "r/std": 1.0, "m": 5.0})


def test_resume_drops_records_after_the_checkpoint_and_carries_the_clock(tmp_path):
    log = MetricsLogger(tmp_path, wandb_mode="disabled")
    for step in range(1, 6):
        log.log({"reward/total/mean": float(step)}, step)
    log.close()
    resumed = MetricsLogger(tmp_path, wandb_mode="disabled")
    resumed.resume(step=3, elapsed_s=120.0)
    resumed.log({"reward/total/mean": 4.5}, 4)
    resumed.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["reward/total/mean"] == 4.5 and records[-1]["wall_s"] >= 120.0


class BrokenRun:
    def log(self, *args, **kwargs):
        raise RuntimeError("network down")

    def finish(self):
        raise RuntimeError("network down")


def test_wandb_failures_never_stop_the_run(tmp_path, monkeypatch):
    import wandb

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setattr(wandb, "init", lambda **kwargs: (_ for _ in ()).throw(RuntimeError("no service")))
    log = MetricsLogger(tmp_path / "a", wandb_mode="offline")
    assert log._wandb is None  # init failed: JSONL only
    log.log({"x": 1.0}, 1)
    log = MetricsLogger(tmp_path / "b", wandb_mode="disabled")
    log._wandb = BrokenRun()
    log.log_images("images/eval", torch.rand(2, 3, 4, 4), ["p", "q"], 7)  # the PNG is written, wandb fails
    assert (tmp_path / "b" / "samples" / "images_eval-000007.png").is_file()
    log._wandb = BrokenRun()
    log.log({"x": 2.0}, 8)  # wandb.log fails: disabled, the JSONL still gets the record
    assert log._wandb is None
    log._wandb = BrokenRun()
    log.close()
    assert read_metrics(tmp_path / "a" / "metrics.jsonl")[0]["x"] == 1.0
    assert read_metrics(tmp_path / "b" / "metrics.jsonl")[0]["x"] == 2.0


def test_online_without_api_key_logs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    log = MetricsLogger(tmp_path, wandb_mode="online", run_name="t")
    log.log({"reward/total/mean": 0.5}, 1)
    log.log_images("images/eval", torch.rand(2, 3, 8, 8), ["a red circle", "two blue squares"], 1)
    log.close()
    assert list((tmp_path / "wandb").glob("offline-run-*"))  # `wandb sync` uploads it later
    assert read_metrics(tmp_path / "metrics.jsonl")[0]["reward/total/mean"] == 0.5


def test_plot_script_draws_several_runs(tmp_path, launch_script):
    plot = launch_script("plot")
    paths = []
    for name, slope in (("pruned", 0.2), ("unpruned", 0.1)):
        records = [{"step": 0, "wall_s": 1.0, "eval/total/mean": 0.1}]
        records += [
            {"step": s, "wall_s": 30.0 * s, "train/images_seen": 64 * s, "reward/total/mean": slope * s}
            for s in range(1, 5)
        ]
        records.append({"step": 4, "wall_s": 125.0, "eval/total/mean": 0.3})
        path = tmp_path / name / "metrics.jsonl"
        path.parent.mkdir()
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        paths.append(path)
    points = plot.curve(read_metrics(paths[1]), "eval/total/mean")
    assert points == {"step": [0, 4], "wall_min": [1 / 60, 125 / 60], "images": [0, 256], "value": [0.1, 0.3]}
    out = plot.main([*map(str, paths), "--out", str(tmp_path / "curves.png")])
    assert out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="none of"):
        plot.plot(paths, ["probe/pcc_online"], tmp_path / "x.png")
