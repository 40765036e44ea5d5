"""Learning-rate schedules: hand-computed factors."""

import math

import pytest

from rl.schedule import lr_factor


def test_constant_linear_and_cosine_factors():
    assert [lr_factor("constant", s, 4) for s in range(4)] == [1.0, 1.0, 1.0, 1.0]
    # linear over 4 steps: 1 - s / 4
    assert [lr_factor("linear", s, 4) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    # cosine: (1 + cos(pi s / 4)) / 2 = 1, (1 + 0.7071) / 2, 0.5, (1 - 0.7071) / 2
    expected = [1.0, 0.8535534, 0.5, 0.1464466]
    assert [lr_factor("cosine", s, 4) for s in range(4)] == pytest.approx(expected, abs=1e-6)
    assert lr_factor("linear", 9, 4) == 0.0 and lr_factor("cosine", 9, 4) == pytest.approx(0.0)


def test_warmup_then_decay_over_the_remaining_steps():
    # 2 warm-up steps: 1/3, 2/3; then linear over the 4 remaining steps of 6
    assert [lr_factor("linear", s, 6, warmup_steps=2) for s in range(6)] == pytest.approx(
        [1 / 3, 2 / 3, 1.0, 0.75, 0.5, 0.25]
    )
    assert lr_factor("cosine", 4, 6, warmup_steps=2) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="'step'"):
        lr_factor("step", 0, 4)
