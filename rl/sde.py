"""Flow-GRPO's SDE step for rectified-flow models, as pure fp32 functions (docs/design.md section 3).

Sigmas run from 1 (noise) to 0, ``x_s = (1 - s) x0 + s eps`` and the model predicts ``v ~ eps - x0``.
Turning the deterministic Euler step into an SDE with the same marginals (Liu et al., Flow-GRPO, 2025)
gives a Gaussian transition whose log-density is the policy's log-probability:

    sigma_t = a * sqrt(s / (1 - s))                    (s == 1 uses the first sigma below 1 instead)
    mean    = x * (1 + sigma_t^2 dt / (2 s)) + v * (1 + sigma_t^2 (1 - s) / (2 s)) * dt,   dt = s' - s < 0
    std     = sigma_t * sqrt(-dt)
    x'      = mean + std * eps
    log p   = mean over non-batch dims of  -(x' - mean)^2 / (2 std^2) - log std - log sqrt(2 pi)

With ``a = 0`` the step is plain Euler (``x + v dt``) and has no density: the log-prob is returned as 0.

Advantage-weighted matching (AWM; Xue et al., 2025) scores a finished rollout instead of its noisy transitions:
noise its clean latents ``x0`` forward to a trained step's sigma with fresh noise and measure the flow-matching
error there, the pretraining loss of the same model::

    x_s      = (1 - s) x0 + s eps
    e        = mean over non-batch dims of (v(x_s, s) - (eps - x0))^2
    log q    = -e^p / p

Its gradient, weighted by the advantage, pulls the velocity toward the rollout's own image where the advantage is
positive and away where it is negative, with the clean image as the target instead of the next noisy latent.
With ``p = 1`` (plain error) and advantages summing to 0 within a group, the objective is unbounded: scaling the
velocity by c changes every error by c^2 |v|^2 alike, which the advantages cancel, and leaves a term linear in c,
so training drifts without limit (on the tiny model the matching error grew several-fold and the held-out score
fell back to the base's: docs/experiments.md, "Flow-GRPO training"). A concave ``p < 1/2`` bounds it (the advantage-weighted sum then decays
like c^(2p - 1)); AWM's reference code uses p = 1/4 ("generalized Huber").
"""

from __future__ import annotations

import dataclasses
import math

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclasses.dataclass
class SdeStep:
    """One transition.

    Attributes:
        next_latents: ``[B, ...]`` the sampled (or scored) next latents.
        log_prob: ``[B]`` mean-reduced Gaussian log-density of ``next_latents`` (0 when ``std`` is 0).
        mean: ``[B, ...]`` the transition mean (differentiable in the velocity).
        std: ``[B, 1, ...]`` the transition standard deviation ``sigma_t sqrt(-dt)``, broadcastable to the latents.
        sigma_t: ``[B, 1, ...]`` the noise schedule's ``sigma_t`` (Flow-GRPO's ``std_dev_t``), which scales its KL.
    """

    next_latents: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    sigma_t: torch.Tensor


def _per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or ``[B]`` value as fp32 ``[B, 1, ..., 1]`` broadcastable to ``like``."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.ndim == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.ndim - 1)))


def noise_std(sigma: float | torch.Tensor, noise_level: float, sigma_below_one: float | torch.Tensor) -> torch.Tensor:
    """``sigma_t = a * sqrt(s / (1 - s))``, with ``sigma_below_one`` standing in for ``s`` in ``1 - s`` at s == 1.

    Args:
        sigma: current sigma(s), scalar or ``[B]``.
        noise_level: ``a`` (FLUX default 0.9; 0 gives the deterministic ODE).
        sigma_below_one: the schedule's first sigma below 1 (``sigmas[1]`` when ``sigmas[0] == 1``).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    below = torch.as_tensor(sigma_below_one, dtype=torch.float32, device=sigma.device)
    denominator = 1.0 - torch.where(sigma >= 1.0, below, sigma)
    return noise_level * torch.sqrt(sigma / denominator)


def sde_step(
    latents: torch.Tensor,
    velocity: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    noise_level: float,
    sigma_below_one: float | torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    next_latents: torch.Tensor | None = None,
) -> SdeStep:
    """One SDE step from ``sigma`` to ``sigma_next``: sample the next latents, or score given ones.

    Args:
        latents: ``[B, ...]`` current latents ``x_s``.
        velocity: ``[B, ...]`` model prediction ``v``; any dtype, computed in fp32.
        sigma: ``s``, scalar or ``[B]``.
        sigma_next: ``s'`` < ``s``, scalar or ``[B]``.
        noise_level: ``a``; 0 gives Euler.
        sigma_below_one: see :func:`noise_std`.
        generator: draws the noise when sampling.
        noise: ``[B, ...]`` standard-normal noise to use instead of drawing it (per-rollout seeded noise).
        next_latents: ``[B, ...]`` latents to score instead of sampling (old log-probs, PPO ratios).

    Returns:
        :class:`SdeStep` in fp32.
    """
    x = latents.float()
    v = velocity.float()
    s = _per_sample(sigma, x)
    dt = _per_sample(sigma_next, x) - s
    sigma_t = noise_std(s, noise_level, sigma_below_one)
    mean = x * (1 + sigma_t**2 * dt / (2 * s)) + v * (1 + sigma_t**2 * (1 - s) / (2 * s)) * dt
    std = sigma_t * torch.sqrt(-dt)
    if next_latents is None:
        if noise_level == 0:
            next_latents = mean
        else:
            if noise is None:
                noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
            next_latents = mean + std * noise.float()
    next_latents = next_latents.float()
    if noise_level == 0:
        log_prob = torch.zeros(x.shape[0], device=x.device)
    else:
        log_density = -((next_latents.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
        log_prob = log_density.mean(dim=tuple(range(1, x.ndim)))
    return SdeStep(next_latents=next_latents, log_prob=log_prob, mean=mean, std=std, sigma_t=sigma_t.expand_as(std))


def kl_to_reference(mean: torch.Tensor, reference_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussians of the same std, ``(m - m_ref)^2 / (2 std^2)`` per element, mean-reduced: ``[B]``.

    The policy term passes ``SdeStep.sigma_t`` as ``std``, as Flow-GRPO's code does (``std_dev_t``), so its
    ``beta`` values carry over; the transition's own KL (std ``sigma_t sqrt(-dt)``, the paper's form) is that
    times ``1 / |dt|``, 4-15x larger on a 6-10 step schedule and weighted differently per step.
    """
    per_element = (mean.float() - reference_mean.float()) ** 2 / (2 * std.float() ** 2)
    return per_element.mean(dim=tuple(range(1, mean.ndim)))


def forward_noise(clean: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """``x_s = (1 - s) x0 + s eps``: clean latents ``[B, ...]`` noised to sigma ``s`` (scalar or ``[B]``), fp32."""
    s = _per_sample(sigma, clean)
    return (1 - s) * clean.float() + s * noise.float()


def matching_error(velocity: torch.Tensor, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """``[B]`` mean flow-matching error ``(v - (eps - x0))^2`` of each sample (differentiable).

    Args:
        velocity: ``[B, ...]`` the model's prediction at ``forward_noise(clean, noise, s)``.
        clean: ``[B, ...]`` the rollouts' final (clean) latents ``x0``.
        noise: ``[B, ...]`` the noise ``eps`` that made the model's input.
    """
    target = noise.float() - clean.float()
    return ((velocity.float() - target) ** 2).mean(dim=tuple(range(1, velocity.ndim)))


def matching_log_prob(
    error: torch.Tensor, power: float = 1.0, sigma: float | torch.Tensor | None = None
) -> torch.Tensor:
    """AWM's surrogate log-likelihood ``-e^p / p`` of flow-matching errors ``e`` ``[B]`` (see the module doc).

    The error is floored at 1e-12 so ``p < 1`` keeps a finite gradient at an exact fit.

    Args:
        error: ``[B]`` flow-matching errors (:func:`matching_error`).
        power: ``p`` > 0.
        sigma: the noise level (scalar or ``[B]``) each error was measured at; given, the log-likelihood is
            multiplied by it, so low-noise steps weigh less (AWM's reference code does, ``awm_sigma_weight``).
    """
    log_prob = -(error.float().clamp_min(1e-12) ** power) / power
    if sigma is None:
        return log_prob
    return log_prob * torch.as_tensor(sigma, dtype=torch.float32, device=log_prob.device)


# Per-element form of AWM's KL terms in velocity space, as a multiple of the unit-variance Gaussian KL (v - v')^2 / 2:
# "squared" is the plain squared difference (v - v')^2, AWM's reference code's kl_weight "Uniform".
AWM_KL_FORMS = {"gaussian": 1.0, "squared": 2.0}


def velocity_kl(velocity: torch.Tensor, other: torch.Tensor, form: str = "gaussian") -> torch.Tensor:
    """``[B]`` AWM's KL between two velocity predictions ``[B, ...]``, mean-reduced, in form ``form``.

    ``"gaussian"``: the KL of unit-variance Gaussians around the two predictions, ``mean((v - v')^2) / 2``
    (:func:`kl_to_reference` with std 1). ``"squared"``: ``mean((v - v')^2)``, twice that.

    Raises:
        KeyError: an unknown ``form`` (the config checks it first).
    """
    return AWM_KL_FORMS[form] * kl_to_reference(velocity, other, torch.ones((), device=velocity.device))
