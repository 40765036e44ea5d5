"""Which denoising steps each rollout trains (rl/batches.py trained_steps): a pure function of the sampling config."""

import numpy as np
import torch

from rl.batches import trained_steps
from rl.config import SamplingConfig


def test_all_but_last_trains_every_step_but_the_last():
    assert trained_steps(SamplingConfig(num_steps=10), 0, 0, 2).tolist() == [list(range(9))] * 2


def test_window_trains_its_steps_and_train_first_step_false_drops_sigma_one():
    window = SamplingConfig(num_steps=10, train_steps="window", train_window_start=0, train_window_size=3)
    assert trained_steps(window, 0, 5, 1).tolist() == [[0, 1, 2]]
    window.train_first_step = False
    assert trained_steps(window, 0, 5, 1).tolist() == [[1, 2]]


def test_a_sliding_window_moves_every_n_steps_and_rolls_back_after_the_last_trainable_position():
    sliding = SamplingConfig(
        num_steps=10, train_steps="window", train_window_start=1, train_window_size=3, train_window_shift_every=2
    )
    # positions 1..6 (the window [6, 9) ends before the untrained last step 9), two GRPO steps each, then 1 again
    starts = [trained_steps(sliding, 0, step, 1)[0, 0].item() for step in range(14)]
    assert starts == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 1, 1]
    assert trained_steps(sliding, 0, 11, 2).tolist() == [[6, 7, 8]] * 2
    sliding.train_window_shift_stride = 2  # positions 1, 3, 5
    assert [sliding.window_at(step).start for step in range(0, 8, 2)] == [1, 3, 5, 1]


def test_random_draws_a_fresh_sorted_subset_per_rollout_seeded_by_seed_step_and_stream():
    sampling = SamplingConfig(num_steps=10, train_steps="random", train_fraction=0.5)
    steps = trained_steps(sampling, 0, 3, 50)
    assert steps.shape == (50, 4)  # int(0.5 * 9 trainable steps) = 4
    assert steps.max() < 9 and (steps[:, 1:] > steps[:, :-1]).all()
    assert len({tuple(row) for row in steps.tolist()}) > 10  # a fresh subset per rollout
    assert torch.equal(steps, trained_steps(sampling, 0, 3, 50))
    for other in ((0, 4, 50, 0), (1, 3, 50, 0), (0, 3, 50, 1)):  # another step, seed or process draws anew
        seed, step, rows, stream = other
        assert not torch.equal(steps, trained_steps(sampling, seed, step, rows, stream))


def test_random_steps_draw_from_a_stream_no_other_draw_shares():
    """NumPy pads a seed list with zeros: [seed, step, 3, 0] was prompt skipping's [seed, step, 3] and [seed,
    step, 3, 2] the micro-batch order of inner epoch 3 (rl/prompt_skip.py, rl/trainer.py)."""
    sampling = SamplingConfig(num_steps=10, train_steps="random", train_fraction=0.5)
    first = 0 if sampling.train_first_step else 1
    trainable = sampling.num_steps - 1 - first
    for stream, other in ((0, [7, 3, 3]), (2, [7, 3, 3, 2])):
        picks = trained_steps(sampling, 7, 3, 1, stream)[0].tolist()
        shared = np.sort(np.random.default_rng(other).permutation(trainable)[:4] + first).tolist()  # the other draw
        assert picks != shared
