import math

import pytest
import torch

from rl.sde import (
    forward_noise,
    kl_to_reference,
    matching_error,
    matching_log_prob,
    noise_std,
    sde_step,
    velocity_kl,
)


def _filled(value, shape=(2, 3, 4)):
    return torch.full(shape, float(value))


def test_mean_std_and_log_prob_by_hand():
    # x = 1, v = 2, s = 0.5, s' = 0.25, a = 0.5:
    # sigma_t = 0.5 * sqrt(0.5 / 0.5) = 0.5; dt = -0.25
    # mean = 1 * (1 + 0.25 * -0.25 / 1) + 2 * (1 + 0.25 * 0.5 / 1) * -0.25 = 0.9375 - 0.5625 = 0.375
    # std = 0.5 * sqrt(0.25) = 0.25
    # scoring x' = mean + std (one std away): log p = -0.5 - log 0.25 - log sqrt(2 pi) = -0.0326441
    out = sde_step(_filled(1), _filled(2), 0.5, 0.25, 0.5, 0.75, next_latents=_filled(0.625))
    torch.testing.assert_close(out.mean, _filled(0.375))
    torch.testing.assert_close(out.std.flatten(), torch.full((2,), 0.25))
    torch.testing.assert_close(out.sigma_t.flatten(), torch.full((2,), 0.5))  # Flow-GRPO's std_dev_t, its KL's scale
    torch.testing.assert_close(out.log_prob, torch.full((2,), -0.5 + math.log(4) - 0.5 * math.log(2 * math.pi)))
    assert out.log_prob.shape == (2,)


def test_sigma_one_uses_first_sigma_below_one():
    # s = 1, s' = 0.75, first sigma below one 0.75, a = 0.5: sigma_t = 0.5 * sqrt(1 / (1 - 0.75)) = 1
    # mean = 1 * (1 + 1 * -0.25 / 2) + 2 * (1 + 0) * -0.25 = 0.875 - 0.5 = 0.375; std = 1 * sqrt(0.25) = 0.5
    assert noise_std(1.0, 0.5, 0.75).item() == pytest.approx(1.0)
    out = sde_step(_filled(1), _filled(2), 1.0, 0.75, 0.5, 0.75, next_latents=_filled(0.375))
    torch.testing.assert_close(out.mean, _filled(0.375))
    torch.testing.assert_close(out.std.flatten(), torch.full((2,), 0.5))
    # at the mean: log p = -log 0.5 - log sqrt(2 pi)
    torch.testing.assert_close(out.log_prob, torch.full((2,), math.log(2) - 0.5 * math.log(2 * math.pi)))


def test_zero_noise_is_plain_euler():
    # x + v dt = 1 + 2 * (0.25 - 0.5) = 0.5
    out = sde_step(_filled(1), _filled(2), 0.5, 0.25, 0.0, 0.75)
    torch.testing.assert_close(out.next_latents, _filled(0.5))
    assert torch.equal(out.log_prob, torch.zeros(2))


def test_per_sample_sigmas_and_sampling_distribution():
    x, v = torch.zeros(2, 20000), torch.zeros(2, 20000)
    out = sde_step(x, v, torch.tensor([0.5, 0.8]), torch.tensor([0.25, 0.6]), 0.7, 0.9,
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    expected_std = noise_std(torch.tensor([0.5, 0.8]), 0.7, 0.9) * torch.sqrt(torch.tensor([0.25, 0.2]))
    torch.testing.assert_close(out.next_latents.std(dim=1), expected_std, rtol=0.02, atol=0)
    # E[log p] of a sample from the density = -1/2 - log std - log sqrt(2 pi)
    expected_log_prob = -0.5 - torch.log(expected_std) - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(out.log_prob, expected_log_prob, rtol=0, atol=0.02)


def test_log_prob_gradient_flows_through_velocity_only():
    v = _filled(2).requires_grad_()
    x_next = _filled(0.625)
    out = sde_step(_filled(1), v, 0.5, 0.25, 0.5, 0.75, next_latents=x_next)
    out.log_prob.sum().backward()
    # d logp / d mean = (x' - mean) / std^2 / n = 4 / 12 per element (12 per sample); d mean / d v = 1.125 * -0.25
    torch.testing.assert_close(v.grad, _filled(4 / 12 * 1.125 * -0.25))


def test_kl_to_reference_by_hand():
    # (0.375 - 0.125)^2 / (2 * 0.25^2) = 0.0625 / 0.125 = 0.5
    kl = kl_to_reference(_filled(0.375), _filled(0.125), torch.full((2, 1, 1), 0.25))
    torch.testing.assert_close(kl, torch.full((2,), 0.5))
    assert torch.equal(kl_to_reference(_filled(0.3), _filled(0.3), torch.full((2, 1, 1), 0.25)), torch.zeros(2))


def test_forward_noise_interpolates_clean_latents_and_noise():
    # (1 - s) x0 + s eps with x0 = 2, eps = -1: s = 0.25 -> 1.25; per-sample s = [0, 1] -> [2, -1]
    torch.testing.assert_close(forward_noise(_filled(2), _filled(-1), 0.25), _filled(1.25))
    out = forward_noise(_filled(2), _filled(-1), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(out[0], torch.full((3, 4), 2.0))
    torch.testing.assert_close(out[1], torch.full((3, 4), -1.0))


def test_matching_error_by_hand():
    # target eps - x0 = -1 - 2 = -3; v = -2.5 -> error 0.25 everywhere; sample 1 exact (v = -3) -> 0
    v = torch.stack([torch.full((3, 4), -2.5), torch.full((3, 4), -3.0)]).requires_grad_()
    error = matching_error(v, _filled(2), _filled(-1))
    torch.testing.assert_close(error, torch.tensor([0.25, 0.0]))
    error.sum().backward()
    # d e / d v = 2 (v - target) / 12 elements: sample 0 -> 2 * 0.5 / 12, sample 1 -> 0
    torch.testing.assert_close(v.grad[0], torch.full((3, 4), 1 / 12))
    torch.testing.assert_close(v.grad[1], torch.zeros(3, 4))


def test_matching_log_prob_by_hand():
    error = torch.tensor([0.25, 4.0], requires_grad=True)
    # p = 1: -e; p = 0.5: -sqrt(e) / 0.5 = [-1, -4]
    torch.testing.assert_close(matching_log_prob(error), torch.tensor([-0.25, -4.0]))
    log_q = matching_log_prob(error, 0.5)
    torch.testing.assert_close(log_q, torch.tensor([-1.0, -4.0]))
    log_q.sum().backward()
    # d/de -e^p / p = -e^(p - 1): -0.25^-0.5 = -2, -4^-0.5 = -0.5: a larger error is pushed on less (concave)
    torch.testing.assert_close(error.grad, torch.tensor([-2.0, -0.5]))
    exact = torch.zeros(1, requires_grad=True)
    matching_log_prob(exact, 0.25).sum().backward()
    assert torch.isfinite(exact.grad).all()  # an exact fit (error 0) keeps a finite gradient


def test_sigma_weighted_matching_log_prob_by_hand():
    # AWM's reference multiplies each step's log-likelihood by its sigma: p = 0.5, errors [0.25, 4] -> [-1, -4];
    # sigmas [0.5, 0.25] -> [-0.5, -1]; the gradient scales alike: -e^(p - 1) sigma = [-2 * 0.5, -0.5 * 0.25]
    error = torch.tensor([0.25, 4.0], requires_grad=True)
    log_q = matching_log_prob(error, 0.5, torch.tensor([0.5, 0.25]))
    torch.testing.assert_close(log_q, torch.tensor([-0.5, -1.0]))
    log_q.sum().backward()
    torch.testing.assert_close(error.grad, torch.tensor([-1.0, -0.125]))


def test_sigma_weighting_with_every_sigma_one_is_the_unweighted_log_prob():
    error = torch.rand(64, generator=torch.Generator().manual_seed(0)) * 3
    for power in (0.25, 0.5, 1.0):
        assert torch.equal(matching_log_prob(error, power, torch.ones(64)), matching_log_prob(error, power))
        assert torch.equal(matching_log_prob(error, power, 1.0), matching_log_prob(error, power))


def test_velocity_kl_forms_by_hand():
    # v - v' = 0.5 everywhere: gaussian (unit variance) 0.5^2 / 2 = 0.125; squared 0.5^2 = 0.25 (AWM's "Uniform")
    torch.testing.assert_close(velocity_kl(_filled(0.75), _filled(0.25)), torch.full((2,), 0.125))
    torch.testing.assert_close(velocity_kl(_filled(0.75), _filled(0.25), "squared"), torch.full((2,), 0.25))
    # the gaussian form is the transition KL of kl_to_reference with std 1
    torch.testing.assert_close(
        velocity_kl(_filled(0.75), _filled(0.25)), kl_to_reference(_filled(0.75), _filled(0.25), torch.ones(()))
    )


def test_squared_kl_gradient_is_twice_the_gaussian():
    generator = torch.Generator().manual_seed(1)
    reference = torch.randn(3, 5, 4, generator=generator)
    start = torch.randn(3, 5, 4, generator=generator)
    grads = {}
    for form in ("gaussian", "squared"):
        velocity = start.clone().requires_grad_()
        velocity_kl(velocity, reference, form).sum().backward()
        grads[form] = velocity.grad
    # d/dv mean((v - v')^2) / 2 = (v - v') / n: the reference code's KL pulls twice as hard at the same beta
    torch.testing.assert_close(grads["gaussian"], (start - reference) / 20)
    torch.testing.assert_close(grads["squared"], 2 * grads["gaussian"])
