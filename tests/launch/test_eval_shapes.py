"""The base-model evaluation's summary: per-category rows, the prompt-weighted mean and GenEval's overall."""

import numpy as np
import pytest

from rewards.shapes import all_prompts


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
