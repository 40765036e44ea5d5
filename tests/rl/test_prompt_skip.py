"""GRESO-style prompt skipping (rl/prompt_skip.py): the history, the draws, and the trainer's use of them."""

import numpy as np
import pytest
import torch
from test_pruning_trainer import make_trainer
from test_trainer import pipeline_dir  # noqa: F401 (a fixture)

from rl.config_parse import parse_config
from rl.data import Prompt, PromptSource
from rl.prompt_skip import FlatPromptHistory, flat_groups


def _source(count: int) -> PromptSource:
    return PromptSource("test", [Prompt(f"prompt {i}", {}) for i in range(count)])


def test_a_flat_group_lengthens_its_prompts_streak_and_any_other_ends_it():
    history = FlatPromptHistory(after=2, explore=0.0)
    history.record(["a", "b", "a"], [True, True, True])
    assert history.streaks == {"a": 2, "b": 1} and history.skippable("a") and not history.skippable("b")
    history.record(["a"], [False])
    assert history.streaks == {"b": 1}
    restored = FlatPromptHistory(2, 0.0)
    restored.load_state_dict(history.state_dict())
    assert restored.streaks == history.streaks


def test_without_history_the_draw_is_the_steps_own_batch():
    source = _source(50)
    prompts, skipped = FlatPromptHistory(1, 0.0).draw(source, step=3, n=8, seed=5)
    assert prompts == source.batch(3, 8, 5) and skipped == 0


def test_skippable_prompts_give_their_slots_to_further_draws_unless_explored():
    source = _source(50)
    own = source.batch(3, 8, 5)
    history = FlatPromptHistory(1, explore=0.0)
    history.record([p.text for p in own[:3]], [True] * 3)
    prompts, skipped = history.draw(source, 3, 8, 5)
    assert len(prompts) == 8 and skipped == 3
    assert prompts[:5] == own[3:] and not any(history.skippable(p.text) for p in prompts)
    assert history.draw(source, 3, 8, 5) == (prompts, skipped)  # seeded by (seed, step): resume draws the same
    always = FlatPromptHistory(1, explore=1.0)
    always.streaks = dict(history.streaks)
    assert always.draw(source, 3, 8, 5) == (own, 0)
    # every prompt skippable: each draw is trained with probability explore, so 8 trained take ~8 / 0.3 draws
    sometimes = FlatPromptHistory(1, explore=0.3)
    sometimes.streaks = {p.text: 1 for p in source.items}
    skipped = sum(sometimes.draw(source, step, 8, 5)[1] for step in range(200))
    assert 200 * 8 / (200 * 8 + skipped) == pytest.approx(0.3, abs=0.03)


def test_when_every_prompt_is_skippable_the_step_is_still_full():
    source = _source(3)
    history = FlatPromptHistory(1, explore=0.0)
    history.record([p.text for p in source.items], [True] * 3)
    prompts, skipped = history.draw(source, 0, 2, 0)
    assert prompts == source.batch(0, 2, 0)  # the skipped ones, in draw order, fill what is missing
    assert skipped == 1  # the third prompt, drawn by a refill; refills never bring a prompt twice


def test_refills_bring_prompts_not_drawn_yet_this_step():
    source = _source(6)
    history = FlatPromptHistory(1, explore=0.0)
    history.record(["prompt 0", "prompt 1", "prompt 2"], [True] * 3)
    for step in range(20):  # a step's own batch holds 3 distinct prompts of the 6 (one pass: 2 steps)
        texts = [p.text for p in history.draw(source, step, 3, 0)[0]]
        assert len(set(texts)) == 3  # the refills bring none twice
        assert not any(history.skippable(text) for text in texts)  # 3 others exist: none skippable is needed


def test_flat_groups_read_valid_rewards_and_leave_out_groups_of_fewer_than_two():
    rewards = np.array([0.5, 0.5, 0.5, 0.2, 0.9, 0.0, 0.7, 0.7])
    groups = np.array([0, 0, 0, 1, 1, 2, 2, 3])
    valid = np.array([True, True, True, True, True, True, False, True])
    assert flat_groups(rewards, groups, valid) == {0: True, 1: False}  # group 2: one valid; group 3: one row
    rewards[2] = np.nan  # a pruned rollout trained early (prune_train_early): valid, no reward
    assert flat_groups(rewards, groups, valid) == {0: True, 1: False}


def test_config_checks_name_the_keys():
    with pytest.raises(ValueError, match="prompt_skip_after must be >= 0"):
        parse_config(["--prompt_skip_after", "-1"])
    with pytest.raises(ValueError, match="prompt_skip_explore must lie in \\[0, 1\\], got 1.5"):
        parse_config(["--prompt_skip_after", "1", "--prompt_skip_explore", "1.5"])
    with pytest.raises(ValueError, match="prune_policy='topk' keeps the predicted best"):
        parse_config(["--prompt_skip_after", "1", "--prune_policy", "topk", "--predictor", "preview"])


def test_the_trainer_records_flat_groups_skips_them_and_checkpoints_the_history(pipeline_dir, tmp_path):  # noqa: F811
    skip = ("--prompt_skip_after", "1", "--prompt_skip_explore", "0", "--save_every", "1")
    trainer = make_trainer(pipeline_dir, tmp_path, *skip)
    batch = trainer.next_prompts()
    scored = trainer.score(batch, trainer.rollout(batch))
    scored.rewards[scored.group_ids == 0] = 0.5  # group 0 flat; group 1 keeps its jpeg compressibilities
    scored.rewards[scored.group_ids == 1] = torch.arange(4.0)
    flat_share = trainer.prompt_history.record_step(trainer.accelerator, batch.step_texts, scored)
    assert trainer.prompt_history.streaks == {batch.step_texts[0]: 1}
    assert flat_share == 0.5  # logged as prompts/flat_groups (tests/distributed/test_uneven_groups.py)
    # step 1's own prompts all known flat: both slots go to further draws
    seed = trainer.config.training.seed
    own = trainer.train_prompts.batch(1, 2, seed)
    trainer.prompt_history.record([p.text for p in own], [True, True])
    trainer.state.step, trainer.metrics = 1, type(trainer.metrics)()  # a new step's metrics
    batch = trainer.next_prompts()
    assert not set(batch.step_texts) & {p.text for p in own}
    assert trainer.metrics.reduce(trainer.accelerator)["prompts/skipped"] == 2
    trainer.save_checkpoint()
    streaks = dict(trainer.prompt_history.streaks)
    trainer.cleanup()
    resumed = make_trainer(pipeline_dir, tmp_path, *skip, "--resume_from", "latest")
    assert resumed.prompt_history.streaks == streaks and resumed.state.step == 1
    assert resumed.next_prompts().step_texts == batch.step_texts
    resumed.cleanup()
