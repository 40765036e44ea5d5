import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rl.sampler import FluxSampler, Rollouts, encode_prompts, native_size_warning, step_noise
from rl.sde import forward_noise

PROMPTS = ["a red circle", "two blue squares", "a green triangle left of a yellow circle"]


def _sampler(pipeline, noise_level):
    return FluxSampler(pipeline, num_steps=4, noise_level=noise_level, guidance_scale=3.5, height=32, width=32)


def test_noise_free_sampler_reproduces_flux_pipeline(tiny_flux_pipeline):
    pipe = tiny_flux_pipeline
    sampler = _sampler(pipe, 0.0)
    embeds = encode_prompts(pipe, PROMPTS, max_sequence_length=16)
    rollouts = sampler.start(torch.arange(3), torch.tensor([11, 12, 13]))
    done = sampler.advance(rollouts, embeds, until_step=4)
    reference = pipe(
        prompt_embeds=embeds.prompt_embeds,
        pooled_prompt_embeds=embeds.pooled_embeds,
        latents=rollouts.latents.clone(),
        height=32,
        width=32,
        num_inference_steps=4,
        guidance_scale=3.5,
        output_type="latent",
    ).images
    assert (done.latents - reference).abs().max().item() <= 1e-5
    images = sampler.decode(done.latents)
    expected = pipe.vae.decode(
        pipe._unpack_latents(reference, 32, 32, pipe.vae_scale_factor) / pipe.vae.config.scaling_factor
        + pipe.vae.config.shift_factor
    ).sample
    assert images.shape == (3, 3, 32, 32)
    assert (images - (expected / 2 + 0.5).clamp(0, 1)).abs().max().item() <= 1e-5


def test_schedule_matches_flux_pipeline(tiny_flux_pipeline):
    sampler = _sampler(tiny_flux_pipeline, 0.9)
    assert sampler.sigmas.shape == (5,) and sampler.sigmas[0] == 1.0 and sampler.sigmas[-1] == 0.0
    assert torch.all(sampler.sigmas[1:] < sampler.sigmas[:-1])
    assert torch.allclose(sampler.timesteps, sampler.sigmas[:-1] * 1000)
    assert sampler.sigma_below_one == float(sampler.sigmas[1])


def test_split_run_equals_full_run_and_subsets_continue_identically(tiny_flux_pipeline):
    sampler = _sampler(tiny_flux_pipeline, 0.9)
    sampler.batch_size = 2
    embeds = encode_prompts(tiny_flux_pipeline, PROMPTS, max_sequence_length=16)
    start = sampler.start(torch.tensor([0, 0, 1, 2]), torch.tensor([5, 6, 7, 8]))
    full = sampler.advance(start, embeds, until_step=4)
    early = sampler.advance(start, embeds, until_step=2)
    assert early.step == 2 and early.log_probs.shape == (4, 2)
    survivors = sampler.advance(early.select([3, 1]), embeds, until_step=4)
    torch.testing.assert_close(survivors.states, full.states[[3, 1]], rtol=0, atol=1e-6)
    torch.testing.assert_close(survivors.log_probs, full.log_probs[[3, 1]], rtol=0, atol=1e-6)
    assert torch.isfinite(full.log_probs).all()


def test_recomputed_log_prob_equals_rollout_log_prob(tiny_flux_pipeline):
    sampler = _sampler(tiny_flux_pipeline, 0.9)
    embeds = encode_prompts(tiny_flux_pipeline, PROMPTS, max_sequence_length=16)
    done = sampler.advance(sampler.start(torch.arange(3), torch.tensor([1, 2, 3])), embeds, until_step=4)
    for step in range(3):
        with torch.no_grad():
            scored = sampler.step_log_prob(done, step, embeds)
        ratio = torch.exp(scored.log_prob - done.log_probs[:, step])
        assert (ratio - 1).abs().max().item() <= 1e-6
    mixed = sampler.step_log_prob(done, torch.tensor([0, 2, 1]), embeds)
    expected = done.log_probs[torch.arange(3), torch.tensor([0, 2, 1])]
    torch.testing.assert_close(mixed.log_prob.detach(), expected, rtol=0, atol=1e-5)


def test_equal_seeds_share_initial_noise(tiny_flux_pipeline):
    sampler = _sampler(tiny_flux_pipeline, 0.9)
    start = sampler.start(torch.tensor([0, 0, 0]), torch.tensor([4, 4, 9]))
    assert torch.equal(start.latents[0], start.latents[1])
    assert not torch.equal(start.latents[0], start.latents[2])
    assert np.isclose(start.latents.std().item(), 1.0, atol=0.1)


def test_sde_window_adds_noise_only_on_its_steps(tiny_flux_pipeline):
    embeds = encode_prompts(tiny_flux_pipeline, PROMPTS, max_sequence_length=16)
    start = _sampler(tiny_flux_pipeline, 0.9).start(torch.arange(3), torch.tensor([1, 2, 3]))
    window = FluxSampler(tiny_flux_pipeline, 4, 0.9, 3.5, 32, 32, sde_steps=[1])
    ode = _sampler(tiny_flux_pipeline, 0.0)
    done = window.advance(start, embeds, until_step=4)
    # Step 0 is the ODE's step; step 1 leaves it (noise) with a density; steps 2-3 are the ODE's again.
    first = ode.advance(start, embeds, until_step=1)
    torch.testing.assert_close(done.states[:, :2], first.states, rtol=0, atol=0)
    assert not torch.allclose(done.states[:, 2], ode.advance(first, embeds, until_step=2).latents)
    after_window = Rollouts(start.prompt_index, start.seeds, done.states[:, :3], done.log_probs[:, :2])
    torch.testing.assert_close(done.states, ode.advance(after_window, embeds, 4).states, rtol=0, atol=0)
    assert (done.log_probs[:, [0, 2, 3]] == 0).all() and (done.log_probs[:, 1] != 0).all()
    with torch.no_grad():
        rescored = window.step_log_prob(done, 1, embeds).log_prob
    torch.testing.assert_close(rescored, done.log_probs[:, 1], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"steps \[2\] were sampled without SDE noise"):
        window.step_log_prob(done, 2, embeds)


def test_matching_error_scores_clean_latents_noised_to_the_step_sigma(tiny_flux_pipeline):
    sampler = _sampler(tiny_flux_pipeline, 0.0)  # AWM trains on any sampler, the ODE included
    embeds = encode_prompts(tiny_flux_pipeline, PROMPTS, max_sequence_length=16)
    done = sampler.advance(sampler.start(torch.arange(3), torch.tensor([1, 2, 3])), embeds, until_step=4)
    steps = torch.tensor([0, 2, 1])
    with torch.no_grad():
        error, velocity = sampler.matching_error(done, steps, embeds)
        again, _ = sampler.matching_error(done, steps, embeds)
        # by hand: noise seeded by (rollout seed, T + step), x_s = (1 - s) x0 + s eps, the model at that step
        noise = step_noise(done.seeds, 4 + steps, tuple(done.latents.shape[1:]), torch.device("cpu"))
        noisy = forward_noise(done.latents, noise, sampler.sigmas[steps])
        expected_v = sampler.velocity(noisy, steps, embeds, done.prompt_index)
    torch.testing.assert_close(velocity, expected_v, rtol=0, atol=0)
    torch.testing.assert_close(error, ((expected_v - (noise - done.latents)) ** 2).mean(dim=(1, 2)))
    assert torch.equal(error, again)  # same seeds, same input: a reference forward or a second epoch agrees
    rows, _ = sampler.matching_error(done, 1, embeds, rows=torch.tensor([2, 0]))
    with torch.no_grad():
        full, _ = sampler.matching_error(done, 1, embeds)
    torch.testing.assert_close(rows, full[[2, 0]], rtol=0, atol=1e-6)
    early = sampler.advance(sampler.start(torch.arange(3), torch.tensor([1, 2, 3])), embeds, until_step=2)
    with pytest.raises(ValueError, match="finished rollouts; these stopped at step 2 of 4"):
        sampler.matching_error(early, 0, embeds)


def test_a_size_far_from_the_native_one_warns_naming_both():
    # the shipped tiny model's native side, as the launcher reads it (pipeline.vae.config.sample_size)
    config = Path(__file__).resolve().parents[2] / "assets" / "tiny-flux-shapes" / "vae" / "config.json"
    native = json.loads(config.read_text())["sample_size"]
    assert native == 64
    warning = native_size_warning(512, 512, native)  # FLUX.1-dev's training size on the tiny model: 8x off
    assert warning is not None and "512 x 512" in warning and "native 64 x 64" in warning
    assert native_size_warning(64, 128, native) is None  # within 2x either way: fine
    assert native_size_warning(32, 64, native) is None
    assert "16 x 64" in native_size_warning(16, 64, native)  # one side 4x below is enough
    assert native_size_warning(512, 512, 1024) is None  # FLUX.1-dev at Flow-GRPO's 512 px


def test_a_size_the_latent_grid_cannot_split_is_an_error_naming_it(tiny_flux_pipeline):
    factor = tiny_flux_pipeline.vae_scale_factor * 2  # one latent pixel per VAE factor, packed 2 x 2
    height, width = 4 * factor + 2, 4 * factor
    with pytest.raises(ValueError, match=rf"must be multiples of {factor} for this VAE, got {height}x{width}"):
        FluxSampler(tiny_flux_pipeline, num_steps=4, noise_level=0.0, guidance_scale=3.5, height=height, width=width)
