import pytest
import torch

from rl.advantages import group_advantages, group_stats, scale_advantages

# Three groups: {1, 2, 3}, {5, 5} (no spread) and {7} (a group of one).
REWARDS = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 7.0])
GROUPS = torch.tensor([0, 0, 0, 4, 4, 9])


def test_group_stats_are_population_statistics():
    stats = group_stats(REWARDS, GROUPS)
    # group 0: mean 2, population std sqrt(((1-2)^2 + 0 + (3-2)^2) / 3) = sqrt(2/3) = 0.816497
    torch.testing.assert_close(stats.mean.float(), torch.tensor([2.0, 2, 2, 5, 5, 7]))
    torch.testing.assert_close(stats.std[:3].float(), torch.full((3,), 0.816497), atol=1e-6, rtol=0)
    assert stats.std[3:].tolist() == [0.0, 0.0, 0.0]
    assert stats.size.tolist() == [3, 3, 3, 2, 2, 1]


def test_group_std_advantages_by_hand():
    advantages = group_advantages(REWARDS, GROUPS, std_mode="group", adv_clip_max=5.0, eps=1e-4)
    # group 0: (r - 2) / (sqrt(2/3) + 1e-4) = (-1, 0, 1) * 1.2245949; equal-reward group and singleton: exactly 0
    expected = torch.tensor([-1.2245949, 0.0, 1.2245949, 0.0, 0.0, 0.0])
    torch.testing.assert_close(advantages, expected, atol=1e-6, rtol=0)
    assert advantages.dtype == torch.float32


def test_batch_std_advantages_by_hand():
    advantages = group_advantages(REWARDS, GROUPS, std_mode="batch", eps=1e-4)
    # batch: mean 23/6, population variance 4.1388889, std 2.0344259; group 0 -> (-1, 0, 1) / 2.0345259 = 0.491515
    torch.testing.assert_close(advantages[:3], torch.tensor([-0.491515, 0.0, 0.491515]), atol=1e-6, rtol=0)
    assert advantages[3:].tolist() == [0.0, 0.0, 0.0]
    # an externally reduced batch std (e.g. over every process) is used as given: 1 / (1 + 1e-4) = 0.99990001
    given = group_advantages(REWARDS, GROUPS, std_mode="batch", eps=1e-4, batch_std=1.0)
    torch.testing.assert_close(given[2], torch.tensor(0.99990001), atol=1e-7, rtol=0)


def test_clipping():
    rewards, groups = torch.tensor([0.0, 10.0]), torch.tensor([0, 0])
    # mean 5, std 5: (+-5) / (5 + 1e-4) = +-0.99998, clipped to +-0.5
    assert group_advantages(rewards, groups, adv_clip_max=0.5).tolist() == [-0.5, 0.5]
    torch.testing.assert_close(group_advantages(rewards, groups), torch.tensor([-0.99998, 0.99998]))


def test_no_nan_for_degenerate_groups():
    # float noise: a group of identical rewards whose mean is not exactly representable stays exactly 0
    rewards = torch.tensor([0.1, 0.1, 0.1, 0.3])
    advantages = group_advantages(rewards, torch.tensor([1, 1, 1, 2]))
    assert advantages.tolist() == [0.0, 0.0, 0.0, 0.0]
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="std_mode"):
        group_advantages(REWARDS, GROUPS, std_mode="global")
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match=r"\[B\]"):
        group_advantages(REWARDS, GROUPS[:3])


def test_scaled_advantages_by_hand():
    # AWM's reference: clip to 5, then x 1 / 5 -> [-1, 1]
    advantages = torch.tensor([-5.0, -1.0, 0.0, 2.5, 5.0])
    torch.testing.assert_close(scale_advantages(advantages, 5.0, 1.0), torch.tensor([-1.0, -0.2, 0.0, 0.5, 1.0]))
    assert scale_advantages(advantages, 5.0, 0.0) is advantages  # 0: unscaled, today's default


def test_scaled_advantages_lie_in_the_bound_and_keep_their_order():
    generator = torch.Generator().manual_seed(0)
    for clip, bound in ((5.0, 1.0), (2.0, 0.5), (1.0, 3.0)):
        rewards = torch.randn(96, generator=generator) * torch.rand(96, generator=generator) * 4
        groups = torch.arange(96) // 8
        advantages = group_advantages(rewards, groups, adv_clip_max=clip, eps=1e-6)
        scaled = scale_advantages(advantages, clip, bound)
        assert scaled.abs().max() <= bound + 1e-6
        assert torch.equal(scaled.sign(), advantages.sign())
        assert torch.equal(torch.argsort(scaled, stable=True), torch.argsort(advantages, stable=True))
