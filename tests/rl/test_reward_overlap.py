"""Scoring beside sampling (reward_overlap): chunks of whole groups, real concurrency, bit-identical results."""

import threading

import pytest
import torch
from test_trainer import lora_state, make_trainer, pipeline_dir

from rl.batches import score_chunks

__all__ = ["pipeline_dir"]  # fixture used by name

# 2 prompts x 4 rollouts in sampler batches of 4: two chunks of one group each
CHUNKED = ("--sample_batch_size", "4", "--learning_rate", "1e-3", "--seed", "5")


class GateReward:
    """Image brightness; its first call waits up to ``timeout`` s for the second chunk's denoising to start.

    With overlap that happens at once (chunk 1 is scored while chunk 2 denoises); without it, never: the wait
    times out, because chunk 2 waits for chunk 1's score.
    """

    second_chunk_started = threading.Event()
    waits: list[bool] = []

    def __init__(self, timeout: float = 10.0) -> None:
        self.timeout = timeout

    def __call__(self, images, prompts, metadata):
        if not GateReward.waits:
            GateReward.waits.append(GateReward.second_chunk_started.wait(self.timeout))
        return {"score": images.mean(dim=(1, 2, 3))}


def test_chunks_are_whole_groups_ending_on_sampler_batches():
    def sizes(group_sizes, batch_size):
        index = torch.arange(len(group_sizes)).repeat_interleave(torch.tensor(group_sizes, dtype=torch.long))
        chunks = score_chunks(index, batch_size)
        assert torch.equal(torch.cat(chunks), torch.arange(len(index)))  # every row once, in order
        return [len(chunk) for chunk in chunks]

    assert sizes([8] * 16, 32) == [32] * 4  # configs/tiny_shapes.yaml: 4 groups per chunk
    assert sizes([24] * 2, 4) == [24, 24]  # the FLUX.1-dev configs: a group spans 6 sampler batches
    assert sizes([4] * 2, 5) == [8]  # groups never fill a batch of 5 exactly before the end: one chunk
    assert sizes([4] * 10, 5) == [20, 20]
    assert sizes([2, 3, 1, 2, 4], 4) == [8, 4]  # pruned survivors: groups of any size, cut where batches end
    assert score_chunks(torch.zeros(0, dtype=torch.long), 4) == []


def run_steps(pipeline_dir, tmp_path, steps, *extra):
    """``steps`` GRPO steps through the unpruned phases; each step's rewards and advantages, and the final LoRA."""
    trainer = make_trainer(pipeline_dir, tmp_path, *CHUNKED, *extra)
    rewards, advantages = [], []
    for step in range(steps):
        trainer.state.step = step
        batch = trainer.next_prompts()
        scored = trainer.finish_and_score(batch, trainer.start(batch))
        rewards.append(scored.rewards)
        advantages.append(trainer.advantages(scored))
        trainer.optimise(batch, scored, advantages[-1])
    lora = lora_state(trainer)
    trainer.cleanup()
    return rewards, advantages, lora


def test_overlap_is_bit_identical_to_scoring_each_chunk_in_turn(pipeline_dir, tmp_path):
    on = run_steps(pipeline_dir, tmp_path / "on", 3, "--reward_overlap", "true")
    off = run_steps(pipeline_dir, tmp_path / "off", 3, "--reward_overlap", "false")
    for got, expected in zip(on, off):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(on[0][0], on[0][1])  # the steps differ: the comparison is not vacuous
    assert any(not torch.equal(a, b) for a, b in zip(on[2], run_steps(pipeline_dir, tmp_path / "one", 1)[2]))


def test_chunking_changes_nothing_against_one_batch_per_step(pipeline_dir, tmp_path):
    """Chunks end on sampler batches, so every transformer and VAE call sees the rows of the unchunked step."""
    chunked = run_steps(pipeline_dir, tmp_path / "chunked", 2)
    trainer = make_trainer(pipeline_dir, tmp_path / "whole", *CHUNKED)
    for step in range(2):
        trainer.state.step = step
        batch = trainer.next_prompts()
        scored = trainer.score(batch, trainer.rollout(batch))  # one batch: sampled, then decoded and scored
        advantages = trainer.advantages(scored)
        assert torch.equal(scored.rewards, chunked[0][step]) and torch.equal(advantages, chunked[1][step])
        trainer.optimise(batch, scored, advantages)
    assert all(torch.equal(a, b) for a, b in zip(lora_state(trainer), chunked[2]))
    trainer.cleanup()


@pytest.mark.parametrize("overlap", [True, False])
def test_a_chunk_is_scored_while_the_next_denoises(pipeline_dir, tmp_path, monkeypatch, overlap):
    GateReward.second_chunk_started.clear()
    GateReward.waits.clear()
    trainer = make_trainer(
        pipeline_dir, tmp_path, *CHUNKED, "--reward", "test_reward_overlap:GateReward", "--reward_weights", "1",
        "--reward_kwargs", f'{{"test_reward_overlap:GateReward": {{"timeout": {10 if overlap else 0.5}}}}}',
        "--reward_overlap", str(overlap).lower(),
    )  # fmt: skip
    advance, calls = trainer.sampler.advance, []

    def advance_and_signal(*args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2:
            GateReward.second_chunk_started.set()
        return advance(*args, **kwargs)

    monkeypatch.setattr(trainer.sampler, "advance", advance_and_signal)
    batch = trainer.next_prompts()
    scored = trainer.finish_and_score(batch, trainer.start(batch))
    assert calls == [4, 4] and GateReward.waits == [overlap]
    metrics = trainer.metrics.reduce(trainer.accelerator)
    assert scored.valid.all() and metrics["reward/total/mean"] == pytest.approx(float(scored.rewards.mean()))
    # decoding and scoring are timed where they ran, beside the main thread's phases; its wait is a phase
    assert trainer.timer.beside["decode"] > 0 and trainer.timer.beside["reward"] > 0
    assert {"sample", "score_wait"} <= set(trainer.timer.phases) and "decode" not in trainer.timer.phases
    trainer.cleanup()


@pytest.mark.parametrize("overlap", [True, False])
def test_a_failed_decode_is_held_for_the_step_agreement(pipeline_dir, tmp_path, monkeypatch, overlap):
    """A decode that raises (the VAE out of memory) must not leave finish_and_score early: the others would be in
    its collectives. It is held like a failed reward, the chunk comes back invalid, and the step's end raises it."""
    trainer = make_trainer(pipeline_dir, tmp_path, *CHUNKED, "--reward_overlap", str(overlap).lower())
    decode, calls = trainer.sampler.decode, []

    def decode_once_then_fail(latents):
        calls.append(len(latents))
        if len(calls) == 2:
            raise MemoryError("the VAE ran out of memory")
        return decode(latents)

    monkeypatch.setattr(trainer.sampler, "decode", decode_once_then_fail)
    batch = trainer.next_prompts()
    scored = trainer.finish_and_score(batch, trainer.start(batch))
    assert calls == [4, 4] and scored.valid.tolist() == [True] * 4 + [False] * 4
    assert isinstance(trainer.step_failure, MemoryError)
    trainer.cleanup()
