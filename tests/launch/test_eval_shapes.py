"""The base-model evaluation's summary: per-category rows, the prompt-weighted mean and GenEval's overall."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from rewards.shapes import all_prompts
from rl.user_errors import run_cli


def test_summary_weighs_prompts_in_all_and_categories_in_category_mean(launch_script):
    test = all_prompts("test")
    colors = [s for s in test if s.tag == "colors"][:1]
    position = [s for s in test if s.tag == "position"][:3]
    # One colours prompt scoring [1, 0] and three position prompts scoring [0, 0] each.
    scores = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    table = launch_script("eval_shapes").summary_table(colors + position, scores)
    assert set(table) == {"colors", "position", "all", "category_mean"}
    assert table["colors"]["mean_score"] == 0.5 and table["colors"]["within_prompt_std"] == 0.5
    assert table["all"]["mean_score"] == pytest.approx(1 / 8)  # 1 of 8 images
    assert table["all"]["within_prompt_std"] == pytest.approx(0.5 / 4)
    assert table["category_mean"]["mean_score"] == pytest.approx((0.5 + 0.0) / 2)
    assert table["category_mean"]["best_of_seeds"] == pytest.approx((1.0 + 0.0) / 2)
    assert table["category_mean"]["prompts"] == 4


def test_grid_shows_only_the_categories_evaluated(launch_script, tmp_path):
    """``--prompts 2`` evaluates single-object prompts only: the grid once died looking for the other five."""
    test = all_prompts("test")
    specs = [s for s in test if s.tag == "single_object"] + [s for s in test if s.tag == "colors"][:1]
    scores, images = np.zeros((len(specs), 2)), torch.rand(len(specs), 2, 3, 8, 8)
    launch_script("eval_shapes").save_grid(specs, scores, images, tmp_path / "grid.png")
    assert Image.open(tmp_path / "grid.png").size == (240 + 2 * 128, 2 * (128 + 14))  # two categories, two seeds


def test_a_few_prompts_evaluate_and_print_their_table(launch_script, tiny_flux_pipeline, tmp_path, capsys):
    tiny_flux_pipeline.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "ev"
    argv = ["--pipeline", str(tmp_path / "pipe"), "--prompts", "3", "--seeds", "1", "--steps", "1"]
    assert run_cli(lambda: launch_script("eval_shapes").main([*argv, "--out", str(out)])) == 0
    printed = capsys.readouterr().out
    assert "| single_object | 2 |" in printed and "| two_object | 1 |" in printed and "| counting |" not in printed
    assert json.loads(out.with_suffix(".json").read_text())["summary"]["all"]["prompts"] == 3
    assert Image.open(tmp_path / "ev_grid.png").size[1] == 2 * (128 + 14)


def test_a_missing_lora_folder_is_one_error_line_before_loading(launch_script, monkeypatch, tmp_path, capsys):
    script = launch_script("eval_shapes")
    monkeypatch.setattr(script.FluxPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded the pipeline"))
    lora = tmp_path / "run" / "lora"
    assert run_cli(lambda: script.main(["--pipeline", str(tmp_path), "--lora", str(lora)])) == 2
    assert capsys.readouterr().err == f"error: --lora {lora}: no such folder (a hub id reads owner/name)\n"
    assert run_cli(lambda: script.main(["--pipeline", "./nowhere/pipe"])) == 2
    assert capsys.readouterr().err == "error: --pipeline ./nowhere/pipe: no such folder (a hub id reads owner/name)\n"
