import math

import pytest
import torch

from probe.model import (
    ProbeCNN,
    ProbeModelConfig,
    aux_loss,
    group_mean,
    low_score_weights,
    pairwise_ranking_loss,
    probe_loss,
)


def test_shapes_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    net = ProbeCNN(ProbeModelConfig(in_channels=7, width=8, blocks_per_stage=(1, 2), time_dim=16))
    for block in (b for stage in net.stages for b in stage):
        torch.nn.init.normal_(block.film.weight, std=0.1)  # FiLM starts at zero (identity); as after some training
    features = torch.randn(5, 7, 8, 8)
    scores = net(features, torch.tensor(0.9))
    assert scores.shape == (5,)
    loss, parts = probe_loss(scores, torch.randn(5), torch.tensor([0, 0, 1, 1, 1]), rank_weight=1.0)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    assert parts["pairs"] > 0
    assert net(torch.randn(2, 7, 3, 5), torch.tensor([0.5, 0.7])).shape == (2,)  # any grid, per-row sigma


def test_film_makes_the_timestep_matter():
    torch.manual_seed(0)
    net = ProbeCNN(ProbeModelConfig(in_channels=3, width=8, time_dim=16))
    for block in (b for stage in net.stages for b in stage):
        torch.nn.init.normal_(block.film.weight)
    x = torch.randn(1, 3, 4, 4)
    assert not torch.allclose(net(x, torch.tensor(0.9)), net(x, torch.tensor(0.5)))


def test_losses_by_hand():
    # Rollout 0 (reward 1) should outrank rollout 1 (reward 0) but scores 0 < 1: softplus(1) = log(1 + e).
    loss, pairs = pairwise_ranking_loss(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([3, 3]))
    assert pairs == 1 and loss.item() == pytest.approx(math.log(1 + math.e))
    _, pairs = pairwise_ranking_loss(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), torch.tensor([3, 4]))
    assert pairs == 0  # different prompts never form a pair
    _, pairs = pairwise_ranking_loss(torch.zeros(3), torch.tensor([0.5, 0.5, 0.2]), torch.zeros(3))
    assert pairs == 2  # ties give no pair
    weights = low_score_weights(torch.tensor([-1.0, 0.0, 2.0]), threshold=0.0, weight=3.0)
    assert weights.tolist() == [3.0, 1.0, 1.0]
    # weighted MSE: (3 * 1 + 1 * 0 + 1 * 4) / 5
    loss, parts = probe_loss(torch.tensor([0.0, 0.0, 0.0]), torch.tensor([-1.0, 0.0, 2.0]), torch.zeros(3), weights)
    assert loss.item() == pytest.approx(7 / 5) and parts["mse"] == pytest.approx(7 / 5)


def test_group_mean_by_hand():
    x = torch.tensor([[1.0], [3.0], [10.0], [5.0]])
    means = group_mean(x, torch.tensor([7, 7, 2, 7]))
    assert means.flatten().tolist() == [3.0, 3.0, 10.0, 3.0]  # (1 + 3 + 5) / 3 and 10 alone


def test_auxiliary_heads_share_the_network_and_their_loss_by_hand():
    torch.manual_seed(0)
    net = ProbeCNN(ProbeModelConfig(in_channels=3, width=8, time_dim=16, aux_outputs=2)).eval()
    x = torch.randn(4, 3, 4, 4)
    scores, aux = net.forward_with_aux(x, torch.tensor(0.7))
    assert aux.shape == (4, 2) and torch.equal(scores, net(x, torch.tensor(0.7)))
    # a probe without heads keeps the one-output head that probe files written before them hold
    assert ProbeCNN(ProbeModelConfig(in_channels=3)).head[-1].out_features == 1
    # ((1 - 0)^2 + (0 - 2)^2) / 2; the NaN target (a part a reward did not return) is left out
    loss = aux_loss(torch.tensor([[1.0, 0.0], [5.0, 5.0]]), torch.tensor([[0.0, 2.0], [math.nan, math.nan]]))
    assert loss.item() == pytest.approx(2.5)
    assert aux_loss(torch.ones(1, 1), torch.tensor([[math.nan]])).item() == 0.0
