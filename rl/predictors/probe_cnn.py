"""``probe``: the CNN on attention maps and x0 features at capture step k (probe/); no decode, no reward call.

The probe file names the sampler it was trained on; loading it under another one is an error naming each
difference (:meth:`probe.Probe.check_sampler`). ``probe_path: init`` starts a random probe for this sampler
that only the online refresh (``probe_refresh_every``) trains.
"""

from __future__ import annotations

import torch

from probe import FeatureConfig, Probe, ProbeMeta
from probe.capture import default_blocks
from probe.model import ProbeModelConfig
from probe.probe import sampler_signature, transformer_fingerprint
from rl.predictors import Prediction, PredictionInputs, Predictor, register


def init_probe_for(sampler, config, seed: int = 0) -> Probe:
    """A randomly initialised probe (default blocks, combined features) for ``sampler``'s model at ``capture_step``.

    Identity normalisation; it predicts noise until refreshed online. Used by ``probe_path: init``, tests and
    benchmarks that only need the probe's cost.
    """
    transformer = sampler.transformer
    blocks = default_blocks(transformer)
    features = FeatureConfig()
    meta = ProbeMeta(
        base_model=config.model.pretrained,
        transformer_fingerprint=transformer_fingerprint(transformer),
        capture_step=config.pruning.capture_step,
        num_steps=sampler.num_steps,
        blocks=blocks,
        grid=(sampler.latent_height // 2, sampler.latent_width // 2),
        text_length=config.model.max_sequence_length,
        noise_level=sampler.noise_level,
        reward=config.reward.reward,
        sampler=sampler_signature(sampler, config.training.mixed_precision, config.sampling.same_initial_noise),
    )
    torch.manual_seed(seed)
    channels = features.num_channels(len(blocks), sampler.channels)
    return Probe(ProbeModelConfig(in_channels=channels), features, meta)


@register("probe")
class ProbePredictor(Predictor):
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    @classmethod
    def from_config(cls, config, sampler) -> ProbePredictor:
        p = config.pruning
        if p.probe_path == "init":
            return cls(init_probe_for(sampler, config, config.training.seed))
        signature = sampler_signature(sampler, config.training.mixed_precision, config.sampling.same_initial_noise)
        probe = Probe.load(p.probe_path, sampler.transformer, p.capture_step, sampler.num_steps, sampler=signature)
        return cls(probe)

    def observer(self, sampler):
        return self.probe.recorder(sampler)

    def predict(self, inputs: PredictionInputs) -> Prediction:
        early = inputs.early
        capture = inputs.observer.result(early)
        features = self.probe.features(capture, inputs.embeds.token_mask[early.prompt_index])
        scores = self.probe.predict(features, capture.sigma, early.prompt_index).cpu()
        return Prediction(scores, self.cost_per_rollout.times(len(early)), capture.sigma, features=features)
