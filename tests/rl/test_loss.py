import math

import pytest
import torch

from rl.loss import awm_loss, grpo_loss, per_sample_scale

# Three samples with ratios 1.0, 1.2 and 0.7 (old log-prob 0, new log-prob log(ratio)), clip range 0.1.
RATIOS = torch.tensor([1.0, 1.2, 0.7])
ADVANTAGES = torch.tensor([1.0, 1.0, -2.0])


def _log_prob():
    return RATIOS.log().clone().requires_grad_(True)


def test_clipped_surrogate_by_hand():
    log_prob = _log_prob()
    out = grpo_loss(log_prob, torch.zeros(3), ADVANTAGES, clip_range=0.1)
    # sample 0: ratio 1,   adv  1: max(-1,   -1)         = -1
    # sample 1: ratio 1.2, adv  1: max(-1.2, -1 * 1.1)   = -1.1  (clipped)
    # sample 2: ratio 0.7, adv -2: max(1.4,   2 * 0.9)   =  1.8  (clipped)
    # policy loss = (-1 - 1.1 + 1.8) / 3 = -0.1
    torch.testing.assert_close(out.loss, torch.tensor(-0.1), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.policy_loss, torch.tensor(-0.1), atol=1e-6, rtol=0)
    # clipfrac: |ratio - 1| > 0.1 for samples 1 and 2 -> 2/3
    assert math.isclose(out.clipfrac.item(), 2 / 3, abs_tol=1e-6)
    # approx_kl (k3) = mean((r - 1) - log r) = (0 + 0.0176784 + 0.0566749) / 3 = 0.0247845
    assert math.isclose(out.approx_kl.item(), 0.0247845, abs_tol=1e-6)
    assert math.isclose(out.ratio_min.item(), 0.7, abs_tol=1e-6)
    assert math.isclose(out.ratio_max.item(), 1.2, abs_tol=1e-6)
    assert math.isclose(out.ratio_mean.item(), 2.9 / 3, abs_tol=1e-6)
    assert out.kl_ref.item() == 0.0 and out.count.item() == 3


def test_gradient_flows_only_through_unclipped_samples():
    log_prob = _log_prob()
    grpo_loss(log_prob, torch.zeros(3), ADVANTAGES, clip_range=0.1).loss.backward()
    # d/dlogp of -adv * ratio / 3 at sample 0 = -1 * 1 / 3; samples 1 and 2 sit on the clipped branch: 0
    torch.testing.assert_close(log_prob.grad, torch.tensor([-1 / 3, 0.0, 0.0]))


def test_kl_term_by_hand():
    kl = torch.tensor([0.5, 0.0, 1.0], requires_grad=True)
    out = grpo_loss(_log_prob(), torch.zeros(3), ADVANTAGES, clip_range=0.1, kl=kl, kl_beta=0.1)
    # kl_ref = mean(0.5, 0, 1) = 0.5; loss = -0.1 + 0.1 * 0.5 = -0.05
    assert math.isclose(out.kl_ref.item(), 0.5, abs_tol=1e-6)
    assert math.isclose(out.loss.item(), -0.05, abs_tol=1e-6)
    out.loss.backward()
    torch.testing.assert_close(kl.grad, torch.full((3,), 0.1 / 3))


def test_weights_mask_samples():
    out = grpo_loss(_log_prob(), torch.zeros(3), ADVANTAGES, clip_range=0.1, weights=torch.tensor([1.0, 1.0, 0.0]))
    # only samples 0 and 1: (-1 - 1.1) / 2 = -1.05; clipfrac 1/2; ratios 1 and 1.2
    assert math.isclose(out.loss.item(), -1.05, abs_tol=1e-6)
    assert math.isclose(out.clipfrac.item(), 0.5, abs_tol=1e-6)
    assert math.isclose(out.ratio_min.item(), 1.0, abs_tol=1e-6) and math.isclose(
        out.ratio_max.item(), 1.2, abs_tol=1e-6
    )
    empty = grpo_loss(_log_prob(), torch.zeros(3), ADVANTAGES, clip_range=0.1, weights=torch.zeros(3))
    assert empty.loss.item() == 0.0 and empty.count.item() == 0
    empty.loss.backward()  # a zero-weight filler batch still has a graph, with zero gradient


def test_ratio_is_one_at_identical_log_probs():
    log_prob = torch.tensor([3.2, -1.5, 0.25])
    out = grpo_loss(log_prob, log_prob.clone(), torch.tensor([0.3, -0.7, 1.0]), clip_range=1e-4)
    # ratio 1 everywhere: loss = -mean(adv) = -(0.3 - 0.7 + 1.0) / 3 = -0.2, nothing clipped, approx_kl 0
    assert out.ratio_min.item() == out.ratio_max.item() == 1.0
    assert math.isclose(out.loss.item(), -0.2, abs_tol=1e-7)
    assert out.clipfrac.item() == 0.0 and out.approx_kl.item() == 0.0


def test_awm_loss_weights_the_matching_log_prob_by_the_advantage():
    # log q = -(matching error) = [-0.5, -0.2, -1.0]; advantages [1, 1, -2]:
    # loss = mean(-A log q) = (0.5 + 0.2 - 2.0) / 3 = -1.3 / 3; d loss / d log q = -A / 3
    log_q = torch.tensor([-0.5, -0.2, -1.0], requires_grad=True)
    out = awm_loss(log_q, ADVANTAGES)
    assert math.isclose(out.loss.item(), -1.3 / 3, abs_tol=1e-6)
    assert math.isclose(out.policy_loss.item(), -1.3 / 3, abs_tol=1e-6)
    out.loss.backward()
    # minimising raises log q (lowers the error) where A > 0 and lowers it where A < 0
    torch.testing.assert_close(log_q.grad, torch.tensor([-1 / 3, -1 / 3, 2 / 3]))
    # no behaviour-policy ratio: its diagnostics read 1, nothing is clipped
    assert out.ratio_min.item() == out.ratio_max.item() == out.ratio_mean.item() == 1.0
    assert out.clipfrac.item() == 0.0 and out.approx_kl.item() == 0.0 and out.count.item() == 3


def test_awm_loss_kl_term_and_weights():
    log_q = torch.tensor([-0.5, -0.2, -1.0])
    kl = torch.tensor([0.5, 0.0, 1.0])
    # samples 0 and 1 only: policy loss (0.5 + 0.2) / 2 = 0.35; kl_ref 0.25; loss 0.35 + 0.1 * 0.25 = 0.375
    out = awm_loss(log_q, ADVANTAGES, kl=kl, kl_beta=0.1, weights=torch.tensor([1.0, 1.0, 0.0]))
    assert math.isclose(out.policy_loss.item(), 0.35, abs_tol=1e-6)
    assert math.isclose(out.kl_ref.item(), 0.25, abs_tol=1e-6)
    assert math.isclose(out.loss.item(), 0.375, abs_tol=1e-6)
    empty = awm_loss(log_q.clone().requires_grad_(), ADVANTAGES, weights=torch.zeros(3))
    assert empty.loss.item() == 0.0 and empty.count.item() == 0


def test_awm_loss_ema_kl_term_by_hand():
    log_q = torch.tensor([-0.5, -0.2, -1.0])
    kl = torch.tensor([0.5, 0.0, 1.0])
    kl_ema = torch.tensor([0.2, 0.4, 0.0], requires_grad=True)
    # policy loss -1.3 / 3 (above); kl_ref mean 0.5, kl_ema mean 0.2:
    # loss = -1.3 / 3 + 0.1 * 0.5 + 1.0 * 0.2 = -0.183333
    out = awm_loss(log_q, ADVANTAGES, kl=kl, kl_beta=0.1, kl_ema=kl_ema, kl_ema_beta=1.0)
    assert math.isclose(out.kl_ema.item(), 0.2, abs_tol=1e-6)
    assert math.isclose(out.kl_ref.item(), 0.5, abs_tol=1e-6)
    assert math.isclose(out.loss.item(), -1.3 / 3 + 0.05 + 0.2, abs_tol=1e-6)
    out.loss.backward()
    torch.testing.assert_close(kl_ema.grad, torch.full((3,), 1 / 3))
    assert awm_loss(log_q, ADVANTAGES).kl_ema is None  # not computed: nothing to log


def test_per_sample_scale_by_hand():
    assert per_sample_scale(4.0, 8.0, micro_steps=2, processes=1) == 1.0  # equal micro-batches: exactly unchanged
    assert per_sample_scale(1.0, 5.0, micro_steps=2, processes=1) == 0.4  # 1 live of 5 in a window of 2
    assert per_sample_scale(3.0, 12.0, micro_steps=2, processes=2) == 1.0
    assert per_sample_scale(0.0, 0.0, micro_steps=2, processes=1) == 0.0  # nothing live: no update


def test_every_live_sample_of_an_update_weighs_the_same_however_the_micro_batches_fill():
    """8 rollouts, 3 dropped (NaN reward), micro-batches of 4 accumulated 2 at a time: the 5 valid rollouts share
    one update equally (each micro-batch's own mean gave 1/4 and 1/6: 1.5x apart)."""
    import types

    from rl.batches import ScoredRollouts
    from rl.config import RunConfig
    from rl.distributed import build_accelerator
    from rl.metrics_log import MetricsAccumulator
    from rl.phase_timer import PhaseTimer
    from rl.sampler import Rollouts
    from rl.train_state import TrainState
    from rl.trainer import GRPOTrainer

    config = RunConfig()
    config.sampling.num_steps = 2  # one trained step
    t = config.training
    t.train_batch_size, t.gradient_accumulation_steps, t.max_grad_norm, t.learning_rate = 4, 2, 1e9, 1.0
    t.lr_warmup_steps, t.lr_schedule, t.adv_scale_max, t.num_inner_epochs = 0, "constant", 0.0, 1
    theta = torch.nn.Parameter(torch.zeros(8))  # log-prob of rollout i: theta[i]
    accelerator = build_accelerator("no", t.gradient_accumulation_steps)
    model, optimizer = accelerator.prepare(torch.nn.Linear(1, 1), torch.optim.SGD([theta], lr=1.0))

    def policy_loss(embeds, rollouts, rows, step, advantages, weights):
        return grpo_loss(theta[rows], theta[rows].detach(), advantages[rows], 1e-4, None, 0.0, weights)

    objective = types.SimpleNamespace(reference_forwards=0, record=lambda *a, **k: None, after_optimise=lambda: None)
    trainer = types.SimpleNamespace(
        config=config, accelerator=accelerator, state=TrainState(), metrics=MetricsAccumulator(), timer=PhaseTimer(),
        sampler=types.SimpleNamespace(num_steps=2), optimizer=optimizer, model=model, lora_params=[theta], ema=None,
        objective=objective, policy_loss=policy_loss,
    )  # fmt: skip
    for name in ("phase", "global_count", "count_skipped_updates", "live_weights"):
        setattr(trainer, name, types.MethodType(getattr(GRPOTrainer, name), trainer))
    valid = torch.tensor([True] * 5 + [False] * 3)
    rollouts = Rollouts(torch.zeros(8, dtype=torch.long), torch.arange(8), torch.zeros(8, 3, 1, 1), torch.zeros(8, 2))
    rewards = torch.where(valid, torch.ones(8), torch.full((8,), math.nan))
    scored = ScoredRollouts(rollouts, torch.zeros(8, dtype=torch.long), rewards, {}, valid)
    GRPOTrainer.optimise(trainer, types.SimpleNamespace(embeds=None), scored, valid.float())
    assert trainer.state.optimizer_steps == 1
    assert theta.detach().tolist() == pytest.approx([0.2] * 5 + [0.0] * 3)
