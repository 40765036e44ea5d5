"""Pruned GRPO in the trainer on the tiny random FLUX fixture: exactness of 'none', survivors, refresh, state."""

import json
import math

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from test_trainer import lora_state, one_step, pipeline_dir, tiny_args
from test_trainer import make_trainer as make_one_trainer

from probe.model import group_mean
from rl.config_parse import parse_config
from rl.pruned_rollout import ProbeBuffer
from rl.trainer import GRPOTrainer

__all__ = ["pipeline_dir"]  # fixture used by name

# fixture world: T = 4 steps, 2 prompts x 4 rollouts; capture at step 1 of 4
PRUNED = ("--capture_step", "1", "--probe_path", "init", "--prune_keep_fraction", "0.5")


def make_trainer(pipeline_dir, tmp_path, *extra) -> GRPOTrainer:
    """A trainer with accelerate's process-wide state reset first (these tests build several per test)."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return make_one_trainer(pipeline_dir, tmp_path, *extra)


def pruned_step(trainer: GRPOTrainer) -> dict[str, float]:
    """One GRPO step through the pruned phase; returns its reduced metrics."""
    batch = trainer.next_prompts()
    scored, advantages = trainer.pruner.sample_and_score(trainer, batch)
    trainer.pruner.commit(trainer)
    trainer.optimise(batch, scored, advantages)
    return trainer.metrics.reduce(trainer.accelerator)


def test_policy_none_trains_exactly_like_the_unpruned_trainer(pipeline_dir, tmp_path):
    plain = make_trainer(pipeline_dir, tmp_path / "plain", "--learning_rate", "1e-3")
    assert plain.pruner is None
    one_step(plain)
    expected = lora_state(plain)
    plain.cleanup()
    # the same run split at the capture step, with attention capture and a probe predicting, keeping everyone
    split = make_trainer(pipeline_dir, tmp_path / "split", "--learning_rate", "1e-3", *PRUNED, "--prune_policy", "none")
    assert split.pruner is not None and split.pruner.probe is not None
    metrics = pruned_step(split)
    assert metrics["prune/survivor_frac"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(expected, lora_state(split)))
    assert split.state.images_denoised == pytest.approx(8.0)  # 8 rollouts x (1 + 3) / 4 steps
    split.cleanup()


@pytest.mark.parametrize(
    "advantage, objective", [("survivors", "flow_grpo"), ("imputed", "flow_grpo"), ("survivors", "awm")]
)
def test_topk_finishes_and_scores_survivors_only(pipeline_dir, tmp_path, advantage, objective):
    trainer = make_trainer(
        pipeline_dir, tmp_path, *PRUNED, "--prune_policy", "topk", "--prune_explore", "1",
        "--prune_advantage", advantage, "--learning_rate", "1e-3", "--policy_objective", objective,
    )  # fmt: skip
    before = lora_state(trainer)
    metrics = pruned_step(trainer)
    last = trainer.pruner.last
    assert last.selection.keep.sum() == 4 and last.selection.explore.sum() == 2  # 2 of 4 per group, 1 explored
    assert trainer.state.images_seen == 4  # the reward model saw survivors only
    assert trainer.state.images_denoised == pytest.approx(8 * 1 / 4 + 4 * 3 / 4)  # k/T + r(1 - k/T) of 8 images
    assert metrics["prune/survivor_frac"] == 0.5 and metrics["prune/skipped_groups"] == 0
    assert math.isfinite(metrics["policy/loss"]) and any(
        not torch.equal(a, b) for a, b in zip(before, lora_state(trainer))
    )
    assert len(trainer.pruner.buffer) == 4 and "probe/pcc_online" in metrics
    # the survivors enter the refresh buffer with their whole group's feature mean, what the probe ranked them by
    whole = group_mean(last.features.float(), last.group_ids)[last.selection.survivors]
    assert torch.equal(trainer.pruner.buffer.dataset().group_means, whole.half().float())
    if advantage == "imputed":
        assert "prune/calibration_slope" in metrics
    if objective == "awm":  # trained on the survivors' finished images
        assert metrics["policy/matching_error"] > 0
    json.dumps(metrics)  # every value a plain number (the JSONL logger writes them)
    trainer.cleanup()


def test_train_early_trains_pruned_rollouts_before_k_only(pipeline_dir, tmp_path):
    # capture at step 1 of 4: a pruned rollout recorded step 0 only; trained steps are 0, 1, 2 (all but last)
    topk = (*PRUNED, "--prune_policy", "topk", "--prune_advantage", "imputed", "--learning_rate", "1e-3")
    off = make_trainer(pipeline_dir, tmp_path / "off", *topk)
    metrics = pruned_step(off)
    assert "prune/early_trained_frac" not in metrics
    without = lora_state(off)
    off.cleanup()

    trainer = make_trainer(pipeline_dir, tmp_path / "on", *topk, "--prune_train_early", "true")
    pruner, calls = trainer.pruner, []
    with_early_steps, policy_loss = pruner.with_early_steps, trainer.policy_loss

    def nan_padding(*args):  # a padded (unrecorded) state or log-prob read by the loss would make the LoRA NaN
        scored, advantages = with_early_steps(*args)
        scored.rollouts.states[4:, 2:] = math.nan
        scored.rollouts.log_probs[4:, 1:] = math.nan
        return scored, advantages

    def spy(embeds, rollouts, rows, step, advantages, weights):
        calls.append((rows.tolist(), step.tolist(), weights.tolist()))
        return policy_loss(embeds, rollouts, rows, step, advantages, weights)

    pruner.with_early_steps, trainer.policy_loss = nan_padding, spy
    metrics = pruned_step(trainer)
    # 4 survivors x 3 steps + 4 pruned rollouts x step 0 = 16 trained samples, 4 of them early
    assert metrics["prune/early_trained_frac"] == pytest.approx(0.25)
    samples = [(row, step, weight) for rows, steps, weights in calls for row, step, weight in zip(rows, steps, weights)]
    assert sorted((row, step) for row, step, weight in samples if weight > 0) == sorted(
        [(row, step) for row in range(4) for step in range(3)] + [(row, 0) for row in range(4, 8)]
    )
    assert all(step == 0 for row, step, _ in samples if row >= 4)  # unrecorded steps re-score step 0, weight 0
    with_early = lora_state(trainer)
    assert all(torch.isfinite(p).all() for p in with_early)
    assert any(not torch.equal(a, b) for a, b in zip(without, with_early))
    trainer.cleanup()


def test_random_control_needs_no_probe_and_refresh_changes_the_probe(pipeline_dir, tmp_path):
    control = make_trainer(pipeline_dir, tmp_path / "control", "--capture_step", "2", "--prune_policy", "random")
    assert control.pruner.probe is None
    pruned_step(control)
    assert int(control.pruner.last.selection.keep.sum()) == 4 and control.state.images_seen == 4
    control.cleanup()

    trainer = make_trainer(
        pipeline_dir, tmp_path / "refresh", *PRUNED, "--prune_policy", "maxvar", "--probe_refresh_every", "1",
        "--probe_refresh_steps", "3",
    )  # fmt: skip
    weights = [p.detach().clone() for p in trainer.pruner.probe.network.parameters()]
    pruned_step(trainer)
    assert any(not torch.equal(a, b) for a, b in zip(weights, trainer.pruner.probe.network.parameters()))
    state = trainer.state_dict()["pruning"]
    fresh = make_trainer(pipeline_dir, tmp_path / "resumed", *PRUNED, "--prune_policy", "maxvar")
    fresh.load_state_dict(trainer.state_dict())
    assert len(fresh.pruner.buffer) == 4
    for a, b in zip(trainer.pruner.probe.network.parameters(), fresh.pruner.probe.network.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(state["buffer"]["data"]["reward"], fresh.pruner.buffer.data.reward)
    trainer.cleanup()
    fresh.cleanup()


def test_buffer_keeps_the_newest_rollouts():
    from probe import ProbeDataset

    buffer = ProbeBuffer(capacity=3)
    for start in (0, 2):
        rewards = torch.tensor([start, start + 1.0])
        buffer.add(ProbeDataset.from_tensors(torch.ones(2, 1, 2, 2), 0.5, rewards, torch.tensor([start, start])))
    assert buffer.dataset().reward.tolist() == [1.0, 2.0, 3.0] and buffer.dataset().features.dtype == torch.float32
    restored = ProbeBuffer(1)
    restored.load_state_dict(buffer.state_dict())
    assert restored.capacity == 3 and restored.dataset().reward.tolist() == [1.0, 2.0, 3.0]
    # whole-group means survive a checkpoint; one written before them gets its rows' own, and new survivors keep
    # theirs (a buffer without means would have dropped every later batch's)
    means = torch.full((2, 1, 2, 2), 7.0)
    buffer.add(
        ProbeDataset.from_tensors(torch.ones(2, 1, 2, 2), 0.5, torch.ones(2), torch.tensor([5, 5]), group_means=means)
    )
    restored.load_state_dict(buffer.state_dict())
    assert restored.dataset().group_means[-2:].eq(7.0).all()
    old = buffer.state_dict()
    del old["data"]["group_means"]
    restored.load_state_dict(old)
    assert restored.dataset().group_means.eq(1.0).all()  # every row's features are ones
    restored.add(
        ProbeDataset.from_tensors(torch.ones(2, 1, 2, 2), 0.5, torch.ones(2), torch.tensor([6, 6]), group_means=means)
    )
    assert restored.dataset().group_means[-2:].eq(7.0).all()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--prune_policy", "topk"), "probe_path"),
        (("--prune_policy", "topk", "--probe_path", "init", "--capture_step", "4"), "capture_step"),
        (("--prune_min_spread", "0.1"), "prune_policy='none'"),
        (("--prune_policy", "random", "--prune_explore", "3"), "prune_explore"),
        (("--prune_policy", "random", "--prune_advantage", "imputed"), "probe_path"),
        (("--prune_train_early", "true"), "prune_train_early"),
        (("--prune_policy", "topk", "--probe_path", "init", "--prune_train_early", "true"), "prune_advantage: imputed"),
        (("--prune_policy", "best"), "prune_policy"),
        (("--prune_keep_fraction", "1.5"), "prune_keep_fraction"),
    ],
)
def test_pruning_config_checks_name_the_key(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        parse_config(tiny_args(tmp_path, tmp_path, *extra))
