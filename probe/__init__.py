"""The early-step cross-attention reward probe (docs/design.md section 4).

Modules, in data-flow order:

- :mod:`probe.capture`: :class:`ProbeRecorder`, a :class:`rl.sampler.StepObserver` that, at the k-th
  transformer call only, wraps the chosen blocks' attention processors (outputs unchanged) to record
  head-averaged image-query -> text-key attention ``[B, n_blocks, S_img, L]`` and keeps the x0 prediction.
- :mod:`probe.features`: :func:`build_features` reduces a capture to ``[B, C, h, w]`` (per-block statistics
  over real tokens, per-token slot maps, x0 channels; layout in the module docstring).
- :mod:`probe.model`: :class:`ProbeCNN` (residual CNN, FiLM timestep conditioning) and :func:`probe_loss`
  (weighted MSE with low-score oversampling + within-group pairwise ranking).
- :mod:`probe.probe`: :class:`Probe`, the network with its normalisation and metadata; ``save`` / ``load``
  with validation against the model, capture step and step count (:class:`ProbeMismatchError`).
- :mod:`probe.metrics`: global PCC / SRCC / AUC-ROC and within-group SRCC / top-half recall / regret.
- :mod:`probe.data`, :mod:`probe.collect`, :mod:`probe.train`: collected shards, the dataset, collection,
  and :func:`fit` (also the online refresh).

API for pruned GRPO (rl/pruned_rollout.py). Import from the submodules (``from probe.probe import Probe``): under pytest's
default import mode the test folder ``tests/probe`` shadows this ``__init__`` (``from probe import Probe`` then
fails unless pytest runs with ``pythonpath = ["."]``)::

    from probe.data import ProbeDataset
    from probe.metrics import probe_metrics
    from probe.model import group_mean
    from probe.probe import Probe, sampler_signature
    from probe.train import FitConfig, fit

    probe = Probe.load(path, pipeline.transformer, capture_step=k, num_steps=sampler.num_steps,
                       sampler=sampler_signature(sampler, "bf16"))  # validated: model, step, sampler
    recorder = probe.recorder(sampler)                      # ProbeRecorder at the probe's step and blocks
    early = sampler.advance(sampler.start(prompt_index, seeds), embeds, until_step=k, observer=recorder)
    capture = recorder.result(early)                        # ProbeCapture for every row of `early`
    features = probe.features(capture, embeds.token_mask[early.prompt_index])  # [B, C, h, w], keep for the buffer
    predicted = probe.predict(features, capture.sigma, group=early.prompt_index)  # [B] in reward units
    # ... prune on `predicted`, continue survivors: sampler.advance(early.select(keep), embeds, T)

    # online refresh on a buffer of (features, real reward, group id); normalisation stays fixed.
    groups = step * num_prompts + early.prompt_index[keep]   # ids unique across every step in the buffer
    online = probe_metrics(predicted[keep], rewards, groups)  # the probe's quality before refreshing
    whole = group_mean(features, early.prompt_index)[keep]  # what a group-relative probe ranked the survivors against
    fresh = ProbeDataset.from_tensors(features[keep], capture.sigma, rewards, groups, group_means=whole)
    buffer = ProbeDataset.concatenate([buffer, fresh])
    log = fit(probe, buffer, FitConfig(steps=50, lr=3e-4, rank_weight=1.0, cosine=False))

``group`` matters only for group-relative probes (``ProbeModelConfig.group_relative``); a batch passed to
``predict`` must then hold whole groups, or pass each row's whole-group feature mean as ``group_means``
(``probe.model.group_mean``), as the buffer of survivors does. ``fit`` samples whole groups per batch (the
ranking term needs two rollouts of one group), builds a fresh AdamW each call and leaves the probe in eval mode. The recorder costs
nothing at steps other than k (the default processors run untouched). ``probe.score(capture, token_mask)``
does features + predict in one call. ``Probe.state()`` / ``Probe.from_state`` put a probe into and out of a
training checkpoint.
"""

from probe.capture import ObserverGroup, ProbeCapture, ProbeRecorder, capture_attention, default_blocks
from probe.data import ProbeDataset, load_dataset
from probe.features import FEATURE_SETS, FeatureConfig, build_features
from probe.metrics import probe_metrics
from probe.model import ProbeCNN, ProbeModelConfig, probe_loss
from probe.probe import Probe, ProbeMeta, ProbeMismatchError, transformer_fingerprint
from probe.train import FitConfig, evaluate, fit, init_probe

__all__ = [
    "FEATURE_SETS", "FeatureConfig", "FitConfig", "ObserverGroup", "Probe", "ProbeCNN", "ProbeCapture",
    "ProbeDataset", "ProbeMeta", "ProbeMismatchError", "ProbeModelConfig", "ProbeRecorder", "build_features",
    "capture_attention", "default_blocks", "evaluate", "fit", "init_probe", "load_dataset", "probe_loss",
    "probe_metrics", "transformer_fingerprint",
]  # fmt: skip
