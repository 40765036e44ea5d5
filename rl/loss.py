"""The PPO-clipped GRPO policy loss in named steps (cleanrl ``ppo.py`` order), as a pure function.

Flow-GRPO's log-probs are MEANS over latent elements (rl/sde.py), so a ratio is a per-element geometric mean
and moves very little per update: the clip range is ~1e-4 (Flow-GRPO: 1e-4), not PPO's 0.2.

:func:`awm_loss` is the advantage-weighted matching objective (AWM): no importance ratio, the advantage weights
the rollout's own flow-matching log-likelihood (rl/sde.py ``matching_log_prob``).

Every tensor is per sample: one (rollout, denoising step) pair. ``weights`` lets a caller mask samples (0) out
of the mean without changing the batch shape (e.g. padding micro-batches so every process runs the same
number of backward passes).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class LossOutput:
    """The loss and its detached diagnostics.

    Attributes:
        loss: scalar, ``policy_loss + kl_beta * kl_ref (+ kl_ema_beta * kl_ema)`` (differentiable).
        policy_loss: scalar, detached clipped surrogate loss.
        kl_ref: scalar, detached mean KL to the reference (0 without a reference).
        approx_kl: scalar, detached ``mean((ratio - 1) - log_ratio)`` (Schulman's k3 estimator, as in cleanrl).
        clipfrac: scalar, detached fraction of samples with ``|ratio - 1| > clip_range``.
        ratio_mean, ratio_min, ratio_max: scalars, detached statistics of the ratio.
        count: weighted number of samples the means are over.
        kl_ema: scalar, detached mean KL to an EMA of the policy (AWM's second KL); None where not computed.
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl_ref: torch.Tensor
    approx_kl: torch.Tensor
    clipfrac: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    count: torch.Tensor
    kl_ema: torch.Tensor | None = None


def per_sample_scale(micro_weight: float, window_weight: float, micro_steps: int, processes: int) -> float:
    """The factor that makes a micro-batch's mean loss its share of the per-sample mean over an update.

    A loss here is a mean over its micro-batch's live samples; accelerate divides it by the ``micro_steps`` of an
    accumulation window and the processes' gradients are averaged. Scaled by ``micro_weight x micro_steps x
    processes / window_weight`` (the window's live weight over every process), each live sample of the update
    weighs the same 1 / window_weight, however dropped rollouts, padding or unrecorded steps fall into the
    micro-batches. Exactly 1 when every micro-batch holds the same live weight.
    """
    if window_weight <= 0:
        return 0.0
    return micro_weight * micro_steps * processes / window_weight


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(w x) / sum(w)``, 0 when every weight is 0 (the graph is kept, the gradient is 0)."""
    return (weights * values).sum() / weights.sum().clamp_min(1e-12)


def _with_kl(
    policy_loss: torch.Tensor, kl: torch.Tensor | None, kl_beta: float, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(policy_loss + kl_beta * mean KL, mean KL)``; without a KL tensor the loss is unchanged and the KL 0."""
    if kl is None:
        return policy_loss, torch.zeros((), device=policy_loss.device)
    kl_ref = _weighted_mean(kl.float(), weights)
    return policy_loss + kl_beta * kl_ref, kl_ref


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    kl: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    weights: torch.Tensor | None = None,
) -> LossOutput:
    """PPO-clipped surrogate loss with an optional KL penalty to a reference policy.

    Args:
        log_prob: ``[N]`` log-probs of the recorded transitions under the current policy (differentiable).
        old_log_prob: ``[N]`` log-probs recorded when sampling (the behaviour policy).
        advantages: ``[N]`` advantage of each sample's rollout.
        clip_range: epsilon of the clipped ratio ``[1 - eps, 1 + eps]``.
        kl: ``[N]`` per-sample KL to the reference (``rl.sde.kl_to_reference``), differentiable; None: no term.
        kl_beta: weight of the KL term.
        weights: ``[N]`` sample weights (default all 1); weight 0 masks a sample out.

    Returns:
        :class:`LossOutput`.
    """
    log_prob = log_prob.float()
    old_log_prob = old_log_prob.detach().float()
    advantages = advantages.detach().float()
    weights = torch.ones_like(log_prob) if weights is None else weights.detach().float()

    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    with torch.no_grad():
        approx_kl = _weighted_mean((ratio - 1) - log_ratio, weights)
        clipfrac = _weighted_mean(((ratio - 1).abs() > clip_range).float(), weights)
        live = weights > 0
        ratio_min = ratio[live].min() if live.any() else torch.ones(())
        ratio_max = ratio[live].max() if live.any() else torch.ones(())
        ratio_mean = _weighted_mean(ratio, weights)

    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    policy_loss = _weighted_mean(torch.maximum(unclipped, clipped), weights)
    loss, kl_ref = _with_kl(policy_loss, kl, kl_beta, weights)

    return LossOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        kl_ref=kl_ref.detach(),
        approx_kl=approx_kl,
        clipfrac=clipfrac,
        ratio_mean=ratio_mean,
        ratio_min=ratio_min,
        ratio_max=ratio_max,
        count=weights.sum(),
    )


def awm_loss(
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    kl: torch.Tensor | None = None,
    kl_beta: float = 0.0,
    weights: torch.Tensor | None = None,
    kl_ema: torch.Tensor | None = None,
    kl_ema_beta: float = 0.0,
) -> LossOutput:
    """Advantage-weighted matching: ``mean(-A * log q) (+ kl_beta * KL + kl_ema_beta * KL_ema)``, AWM on-policy.

    ``log q`` is minus the (concavely transformed) flow-matching error on the rollout's clean latents, so the
    gradient is that of the pretraining loss weighted by ``-A``: rollouts better than their group are fit, worse
    ones pushed away. There is no behaviour-policy ratio (each sample is its own reference), so the ratio
    diagnostics read 1, ``approx_kl`` and ``clipfrac`` 0.

    Args:
        log_prob: ``[N]`` ``rl.sde.matching_log_prob`` of each sample under the current weights (differentiable).
        advantages: ``[N]`` advantage of each sample's rollout.
        kl: ``[N]`` per-sample KL to the reference (differentiable) or None.
        kl_beta: weight of the KL term.
        weights: ``[N]`` sample weights (default all 1); weight 0 masks a sample out.
        kl_ema: ``[N]`` per-sample KL to an EMA of the policy (differentiable) or None: AWM's reference code adds
            it as an adaptive trust region.
        kl_ema_beta: weight of that term.

    Returns:
        :class:`LossOutput` (``kl_ema`` set when ``kl_ema`` is given).
    """
    log_prob = log_prob.float()
    advantages = advantages.detach().float()
    weights = torch.ones_like(log_prob) if weights is None else weights.detach().float()
    policy_loss = _weighted_mean(-advantages * log_prob, weights)
    loss, kl_ref = _with_kl(policy_loss, kl, kl_beta, weights)
    loss, kl_to_ema = _with_kl(loss, kl_ema, kl_ema_beta, weights)
    one, zero = torch.ones((), device=log_prob.device), torch.zeros((), device=log_prob.device)
    return LossOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        kl_ref=kl_ref.detach(),
        approx_kl=zero,
        clipfrac=zero,
        ratio_mean=one,
        ratio_min=one,
        ratio_max=one,
        count=weights.sum(),
        kl_ema=None if kl_ema is None else kl_to_ema.detach(),
    )
