import math

import pytest
import torch

from rl.metrics_log import MetricsAccumulator, MetricsLogger, read_metrics


class FakeAccelerator:
    num_processes = 1


def test_accumulator_reduces_sums_and_counts():
    acc = MetricsAccumulator()
    acc.add("policy/clipfrac", 0.5, count=2)
    acc.add("policy/clipfrac", 0.0, count=6)  # (0.5 * 2 + 0) / 8 = 0.125, not the mean of means 0.25
    acc.add_values("reward/total", torch.tensor([1.0, 2.0, 3.0, 6.0]))
    acc.add_max("policy/ratio_max", 1.2)
    acc.add_max("policy/ratio_max", 1.1)
    acc.add_min("policy/ratio_min", 0.9)
    out = acc.reduce(FakeAccelerator())
    assert out["policy/clipfrac"] == 0.125
    assert out["reward/total/mean"] == 3.0
    assert math.isclose(out["reward/total/std"], math.sqrt((4 + 1 + 0 + 9) / 4))  # population std 1.8708
    assert out["policy/ratio_max"] == 1.2 and out["policy/ratio_min"] == 0.9


def test_logger_writes_jsonl_and_survives_a_broken_wandb(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = MetricsLogger(tmp_path, wandb_mode="disabled")
    log.log({"reward/total/mean": 0.5}, step=1)
    log.close()
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record["step"] == 1 and record["reward/total/mean"] == 0.5 and "wall_s" in record

    class Broken:
        def log(self, *args, **kwargs):
            raise RuntimeError("network down")

    log = MetricsLogger(tmp_path / "b", wandb_mode="disabled")
    log._wandb = Broken()
    log.log({"x": 1.0}, step=2)  # must not raise
    assert log._wandb is None
    log.close()
    assert read_metrics(tmp_path / "b" / "metrics.jsonl")[0]["x"] == 1.0


def test_non_main_process_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "rank1", is_main_process=False)
    log.log({"x": 1.0}, step=0)
    log.close()
    assert not (tmp_path / "rank1").exists()


def test_a_partial_last_line_is_dropped_and_earlier_damage_named(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert "dropped a partial last line" in caplog.text
    path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_metrics(path)
