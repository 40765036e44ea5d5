"""A trained probe: network, input/output normalisation and the facts it is only valid under, in one file.

A probe file (``torch.save`` of a dict of plain types and tensors, loadable with ``weights_only=True``) holds:

- ``state_dict``: :class:`probe.model.ProbeCNN` weights;
- ``model_config``, ``feature_config``: to rebuild the network and the features it reads;
- ``feature_mean`` / ``feature_std`` ``[C]``: per-channel standardisation fitted on the training data
  (``deviation_std``: of the deviations from the group mean, for group-relative probes);
- ``reward_mean`` / ``reward_std``: the network predicts standardised rewards; :meth:`Probe.predict`
  returns real reward units;
- ``meta``: ``base_model`` (id or path), ``transformer_fingerprint`` (hash of the transformer config),
  ``capture_step``, ``num_steps``, ``blocks``, ``grid``, ``text_length``, ``noise_level``, ``reward``, and the
  held-out ``metrics``.

:meth:`Probe.load` checks the fingerprint, capture step, step count and blocks against the model and sampler
it is loaded for and raises :class:`ProbeMismatchError` naming what differs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from probe.capture import ProbeCapture, ProbeRecorder, attention_modules
from probe.data import load_saved
from probe.features import FeatureConfig, build_features
from probe.model import ProbeCNN, ProbeModelConfig, group_mean

FORMAT_VERSION = 1
# Config keys that say where or by which library version a model was saved, not what it computes.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "_diffusers_version", "_use_default_values", "_class_name"}


class ProbeMismatchError(ValueError):
    """A probe file does not fit the model, capture step or sampler it is being loaded for."""


def transformer_fingerprint(transformer: nn.Module) -> str:
    """A 16-hex-digit hash of the transformer's architecture config (stable across save/load and LoRA wrapping)."""
    config = getattr(transformer, "config", None)
    if config is None:
        raise TypeError(f"{type(transformer).__name__} has no diffusers config to fingerprint")
    items = {k: v for k, v in dict(config).items() if k not in _VOLATILE_CONFIG_KEYS}
    text = json.dumps(items, sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def sampler_signature(sampler, precision: str, same_initial_noise: bool = False) -> dict:
    """What about a sampler changes the states a probe reads: steps, noise, SDE window, guidance, size, precision,
    and whether a group's rollouts share their initial noise (then they differ only by the SDE's).

    Args:
        sampler: an :class:`rl.sampler.FluxSampler` (or anything with its attributes).
        precision: the mixed precision the rollouts ran under (``no``, ``bf16``, ``fp16``).
        same_initial_noise: the run's ``same_initial_noise`` (inference: every seed its own).
    """
    return {
        "num_steps": int(sampler.num_steps),
        "noise_level": float(sampler.noise_level),
        "sde_steps": sorted(int(s) for s in sampler.sde_steps),
        "guidance_scale": float(sampler.guidance_scale),
        "height": int(sampler.height),
        "width": int(sampler.width),
        "precision": str(precision),
        "same_initial_noise": bool(same_initial_noise),
    }


def sampler_differences(recorded: dict, current: dict) -> list[str]:
    """``key: recorded -> current`` for every sampler setting the two signatures both name and disagree on
    (which steps are SDE steps does not matter when neither sampler adds noise)."""
    noiseless = recorded.get("noise_level") == current.get("noise_level") == 0
    return [
        f"{key}: {recorded[key]!r} -> {current[key]!r}"
        for key in current
        if key in recorded and recorded[key] != current[key] and not (noiseless and key == "sde_steps")
    ]


@dataclasses.dataclass
class ProbeMeta:
    """What a probe was trained for.

    Attributes:
        base_model: the pipeline's id or path (informational: paths move; the fingerprint is checked).
        transformer_fingerprint: :func:`transformer_fingerprint` of the transformer the data came from.
        capture_step: k of "capture at step k of T".
        num_steps: T (the schedule's sigmas, hence the capture's noise level, depend on it).
        blocks: global attention block indices the features read.
        grid: ``(h, w)`` image-token grid of the training data.
        text_length: the sampler's max_sequence_length.
        noise_level: SDE noise level of the collected rollouts.
        reward: the reward spec the probe predicts.
        metrics: held-out metrics (see :mod:`probe.metrics`).
        sampler: :func:`sampler_signature` of the sampler the data was collected with; empty in files written
            before it was recorded (their collections put SDE noise on every step: :meth:`Probe.check_sampler`).
    """

    base_model: str
    transformer_fingerprint: str
    capture_step: int
    num_steps: int
    blocks: tuple[int, ...]
    grid: tuple[int, int]
    text_length: int
    noise_level: float
    reward: str
    metrics: dict = dataclasses.field(default_factory=dict)
    sampler: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["blocks"], data["grid"] = list(self.blocks), list(self.grid)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ProbeMeta:
        return cls(**{**data, "blocks": tuple(data["blocks"]), "grid": tuple(data["grid"])})


class Probe(nn.Module):
    """Predicts a rollout's final reward from its early-step capture.

    Args:
        model_config: network sizes (``in_channels`` must match the feature config's channel count).
        feature_config: which channels the probe reads.
        meta: what the probe is valid for.
        feature_mean, feature_std: ``[C]`` input standardisation (zeros / ones if omitted).
        reward_mean, reward_std: output scale.

    Typical use inside a sampler loop (pruned GRPO, rl/pruned_rollout.py)::

        probe = Probe.load("assets/probe/tiny-flux-shapes-window-step4.pt", pipeline.transformer,
                           capture_step=4, num_steps=sampler.num_steps, sampler=sampler_signature(sampler, "bf16"))
        recorder = probe.recorder(sampler)
        early = sampler.advance(start, embeds, until_step=probe.capture_step, observer=recorder)
        predicted = probe.score(recorder.result(early), embeds.token_mask[early.prompt_index])  # [B]
    """

    def __init__(
        self,
        model_config: ProbeModelConfig,
        feature_config: FeatureConfig,
        meta: ProbeMeta,
        feature_mean: torch.Tensor | None = None,
        feature_std: torch.Tensor | None = None,
        reward_mean: float = 0.0,
        reward_std: float = 1.0,
        deviation_std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.model_config = model_config
        self.feature_config = feature_config
        self.meta = meta
        self.network = ProbeCNN(model_config)
        channels = model_config.in_channels
        self.register_buffer("feature_mean", torch.zeros(channels) if feature_mean is None else feature_mean.float())
        self.register_buffer("feature_std", torch.ones(channels) if feature_std is None else feature_std.float())
        self.register_buffer("deviation_std", torch.ones(channels) if deviation_std is None else deviation_std.float())
        self.register_buffer("reward_mean", torch.tensor(float(reward_mean)))
        self.register_buffer("reward_std", torch.tensor(float(reward_std)))

    @property
    def capture_step(self) -> int:
        return self.meta.capture_step

    # ----- inference -------------------------------------------------------------------------------------

    def recorder(self, sampler, **kwargs) -> ProbeRecorder:
        """A :class:`ProbeRecorder` for ``sampler`` at this probe's step and blocks (keeps x0 only if read)."""
        kwargs.setdefault("record_x0", self.feature_config.x0)
        return ProbeRecorder.for_sampler(sampler, self.capture_step, self.meta.blocks, self.meta.text_length, **kwargs)

    def features(self, capture: ProbeCapture, token_mask: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` raw (unstandardised) features of a capture, as this probe reads them."""
        if capture.capture_step != self.capture_step or tuple(capture.blocks) != tuple(self.meta.blocks):
            raise ProbeMismatchError(
                f"capture at step {capture.capture_step} of blocks {capture.blocks}; the probe reads step "
                f"{self.capture_step} of blocks {self.meta.blocks}"
            )
        return build_features(capture, token_mask, self.feature_config)

    def network_input(
        self, features: torch.Tensor, group: torch.Tensor | None = None, group_means: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Standardised network input ``[B, C or 2C, h, w]`` (2C: deviations from the group mean appended; the
        mean over the rows of each group, or ``group_means`` ``[B, C, h, w]`` when the rows are part of a group).

        Raises:
            ValueError: if the probe is group-relative and ``group`` is None.
        """
        features = features.float()
        x = (features - self.feature_mean[:, None, None]) / self.feature_std[:, None, None]
        if not self.model_config.group_relative:
            return x
        if group is None:
            raise ValueError("this probe is group-relative: pass the group id (prompt) of every rollout")
        means = group_mean(features, group.to(features.device)) if group_means is None else group_means.float()
        deviation = features - means.to(features.device)
        return torch.cat([x, deviation / self.deviation_std[:, None, None]], dim=1)

    def forward(
        self,
        features: torch.Tensor,
        sigma: torch.Tensor | float,
        group: torch.Tensor | None = None,
        group_means: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Standardised scores ``[B]`` (differentiable; what :func:`probe.train.fit` trains).

        Args:
            features: ``[B, C, h, w]`` raw features.
            sigma: the capture's sigma, scalar or ``[B]``.
            group: ``[B]`` group ids (needed by group-relative probes; a batch must hold whole groups, or pass
                ``group_means``).
            group_means: ``[B, C, h, w]`` each row's whole-group feature mean (see :meth:`network_input`).
        """
        return self.forward_with_aux(features, sigma, group, group_means)[0]

    def forward_with_aux(
        self,
        features: torch.Tensor,
        sigma: torch.Tensor | float,
        group: torch.Tensor | None = None,
        group_means: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward`'s scores ``[B]`` and the auxiliary heads' ``[B, aux_outputs]`` (standardised parts)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=features.device).reshape(-1)
        return self.network.forward_with_aux(self.network_input(features, group, group_means), sigma)

    @torch.no_grad()
    def predict(
        self,
        features: torch.Tensor,
        sigma: torch.Tensor | float,
        group: torch.Tensor | None = None,
        batch_size: int = 256,
        group_means: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predicted final rewards ``[B]`` in real reward units (eval mode, no grad).

        Args:
            features: ``[B, C, h, w]`` raw features (:meth:`features`).
            sigma: the capture's sigma.
            group: ``[B]`` group ids of the rollouts (e.g. ``rollouts.prompt_index``); required by
                group-relative probes, ignored by others.
            group_means: ``[B, C, h, w]`` each row's whole-group feature mean (see :meth:`network_input`).
        """
        was_training = self.training
        self.eval()
        x = self.network_input(features.to(self.feature_mean.device), group, group_means)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        out = torch.cat([self.network(xb, sb) for xb, sb in zip(x.split(batch_size), sigma.split(batch_size))])
        self.train(was_training)
        return out * self.reward_std + self.reward_mean

    def score(self, capture: ProbeCapture, token_mask: torch.Tensor, group: torch.Tensor | None = None) -> torch.Tensor:
        """Features and prediction in one call: ``[B]`` predicted rewards of the captured rollouts."""
        return self.predict(self.features(capture, token_mask), capture.sigma, group)

    # ----- files -----------------------------------------------------------------------------------------

    def state(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "state_dict": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "model_config": self.model_config.to_dict(),
            "feature_config": self.feature_config.to_dict(),
            "feature_mean": self.feature_mean.cpu(),
            "feature_std": self.feature_std.cpu(),
            "deviation_std": self.deviation_std.cpu(),
            "reward_mean": float(self.reward_mean),
            "reward_std": float(self.reward_std),
            "meta": self.meta.to_dict(),
        }

    def save(self, path: str | Path) -> None:
        """Write the probe file atomically (a temporary file renamed into place)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.state(), tmp)
        os.replace(tmp, path)

    @classmethod
    def from_state(cls, state: dict) -> Probe:
        if state.get("format_version") != FORMAT_VERSION:
            raise ProbeMismatchError(f"probe file format {state.get('format_version')}, expected {FORMAT_VERSION}")
        probe = cls(
            ProbeModelConfig.from_dict(state["model_config"]),
            FeatureConfig.from_dict(state["feature_config"]),
            ProbeMeta.from_dict(state["meta"]),
            state["feature_mean"],
            state["feature_std"],
            state["reward_mean"],
            state["reward_std"],
            state.get("deviation_std"),
        )
        probe.network.load_state_dict(state["state_dict"])
        return probe

    @classmethod
    def load(
        cls,
        path: str | Path,
        transformer: nn.Module | None = None,
        capture_step: int | None = None,
        num_steps: int | None = None,
        map_location: str | torch.device = "cpu",
        sampler: dict | None = None,
    ) -> Probe:
        """Load a probe file, checking it against what it will be used with.

        Args:
            path: the probe file.
            transformer: the model the probe will read (its config fingerprint and block count are checked).
            capture_step: the step the caller will capture at (must equal the probe's).
            num_steps: the sampler's T (must equal the probe's: sigmas at step k depend on it).
            sampler: the :func:`sampler_signature` of the sampler whose states it will read (:meth:`check_sampler`).

        Raises:
            FileNotFoundError: no such file.
            ValueError: a damaged or truncated file (named, with what to do).
            ProbeMismatchError: the probe was trained for another model, step, step count, block layout or sampler.
        """
        fix = "train it again with launch/probe_train.py, or point probe_path at another probe file"
        state = load_saved(path, "probe file", fix, map_location=map_location)
        probe = cls.from_state(state)
        if sampler is not None:  # first: it names every sampler difference, the step count among them
            probe.check_sampler(sampler, source=str(path))
        probe.check_compatible(transformer, capture_step, num_steps, source=str(path))
        return probe

    def recorded_sampler(self) -> dict:
        """The sampler the probe was trained under. Files from before a setting was recorded get what collection
        did then: every step SDE, each rollout its own initial noise; guidance, size and precision stay unknown
        and unchecked."""
        recorded = dict(self.meta.sampler) or {
            "num_steps": self.meta.num_steps,
            "noise_level": self.meta.noise_level,
            "sde_steps": list(range(self.meta.num_steps)),
        }
        recorded.setdefault("same_initial_noise", False)
        return recorded

    def check_sampler(self, signature: dict, source: str = "probe") -> None:
        """Raise :class:`ProbeMismatchError` naming every setting where ``signature`` differs from the probe's.

        A probe ranks the states its training sampler produces: under another SDE window or noise level the
        early states, and how much they already decide, differ (bench/RESULTS.md, "Predictors").
        """
        differences = sampler_differences(self.recorded_sampler(), signature)
        if differences:
            raise ProbeMismatchError(
                f"{source} was trained under another sampler ({'; '.join(differences)}; probe -> run). Collect "
                "with the run's config (launch/probe_collect.py --config <run config>) and retrain "
                "(launch/probe_train.py), or run with the probe's sampler settings."
            )

    def check_compatible(
        self,
        transformer: nn.Module | None = None,
        capture_step: int | None = None,
        num_steps: int | None = None,
        source: str = "probe",
    ) -> None:
        """Raise :class:`ProbeMismatchError` if the probe does not fit the given model / step / step count."""
        meta = self.meta
        if transformer is not None:
            fingerprint = transformer_fingerprint(transformer)
            if fingerprint != meta.transformer_fingerprint:
                raise ProbeMismatchError(
                    f"{source} was trained on transformer {meta.base_model!r} (config fingerprint "
                    f"{meta.transformer_fingerprint}); this transformer's config fingerprint is {fingerprint}. "
                    "Train a probe for this model (launch/probe_collect.py, launch/probe_train.py)."
                )
            num_blocks = len(attention_modules(transformer))
            if max(meta.blocks) >= num_blocks:
                raise ProbeMismatchError(f"{source} reads blocks {meta.blocks}; the model has {num_blocks}")
        if capture_step is not None and capture_step != meta.capture_step:
            raise ProbeMismatchError(
                f"{source} was trained at capture step {meta.capture_step}, not {capture_step}: attention at another "
                "step has other statistics. Set the capture step to the probe's or train a probe for that step."
            )
        if num_steps is not None and num_steps != meta.num_steps:
            raise ProbeMismatchError(
                f"{source} was trained with {meta.num_steps} sampling steps, not {num_steps} (step "
                f"{meta.capture_step} of {num_steps} has another noise level)."
            )
