"""Fitting a probe: from scratch on collected data (``launch/probe_train.py``) or online on a GRPO buffer.

:func:`init_probe` builds a :class:`probe.probe.Probe` whose input and output standardisation come from a
dataset; :func:`fit` trains it for a number of steps on batches of whole prompt groups (so the ranking term
always has pairs) and returns a log; :func:`evaluate` computes :func:`probe.metrics.probe_metrics`. The same
:func:`fit` serves the pruned trainer's online refresh (``probe_refresh_every``): a few steps on a
:class:`probe.data.ProbeDataset` built from a buffer of (features, real reward, group id), keeping the probe's
normalisation fixed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from probe.data import ProbeDataset, load_dataset, read_manifest
from probe.features import FeatureConfig, feature_config
from probe.metrics import SELECTABLE_METRICS, probe_metrics
from probe.model import ProbeModelConfig, aux_loss, group_mean, low_score_weights, probe_loss
from probe.probe import Probe, ProbeMeta

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class FitConfig:
    """Optimisation settings of :func:`fit`.

    Attributes:
        steps: optimizer steps.
        batch_groups: prompt groups per batch (a batch holds every rollout of each group).
        lr: AdamW learning rate (cosine-decayed to 0 over ``steps``; constant when ``cosine`` is False).
        weight_decay: AdamW weight decay.
        rank_weight: weight of the within-group pairwise ranking term (0: MSE only).
        aux_weight: weight of the auxiliary heads' MSE on the data's reward parts (used when the data has
            ``aux`` columns and the network as many heads; the online buffer has none).
        low_score_quantile: rollouts whose reward is below this quantile of the training rewards ...
        low_score_weight: ... weigh this much in the MSE (the paper's low-score oversampling; 1 disables).
        grad_clip: max gradient norm.
        eval_every: evaluate on ``eval_data`` every this many steps (0: only at the end).
        select_metric: keep the weights that scored best on this ``eval_data`` metric (None: keep the last): one
            of :data:`probe.metrics.SELECTABLE_METRICS` (``regret``: the lowest).
        cosine: cosine learning-rate decay.
        seed: batch order and dropout.
    """

    steps: int = 2000
    batch_groups: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    rank_weight: float = 0.0
    aux_weight: float = 0.5
    low_score_quantile: float = 0.25
    low_score_weight: float = 2.0
    grad_clip: float = 1.0
    eval_every: int = 0
    select_metric: str | None = None
    cosine: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.select_metric is not None and self.select_metric not in SELECTABLE_METRICS:
            raise ValueError(f"select_metric={self.select_metric!r} is not one of {', '.join(SELECTABLE_METRICS)}")


def init_probe(
    data: ProbeDataset, feature_config: FeatureConfig, meta: ProbeMeta, model_kwargs: dict | None = None
) -> Probe:
    """A fresh probe with per-channel feature standardisation and reward scale fitted on ``data``.

    Args:
        model_kwargs: :class:`probe.model.ProbeModelConfig` fields other than ``in_channels`` (taken from the data).
    """
    channels = data.features.shape[1]
    model_config = ProbeModelConfig(in_channels=channels, **(model_kwargs or {}))
    features = data.features.float()
    mean = features.mean(dim=(0, 2, 3))
    std = features.std(dim=(0, 2, 3)).clamp(min=1e-6)
    deviation_std = (features - group_mean(features, data.group)).std(dim=(0, 2, 3)).clamp(min=1e-6)
    reward = data.reward.float()
    reward_std = float(reward.std().clamp(min=1e-6))
    return Probe(model_config, feature_config, meta, mean, std, float(reward.mean()), reward_std, deviation_std)


def evaluate(probe: Probe, data: ProbeDataset) -> dict[str, float]:
    """:func:`probe.metrics.probe_metrics` of the probe's predictions on ``data``."""
    device = probe.feature_mean.device
    prediction = probe.predict(
        data.features.to(device), data.sigma.to(device), data.group.to(device), group_means=data.group_means
    ).cpu()
    return probe_metrics(prediction, data.reward, data.group)


def _group_batches(group: torch.Tensor, batch_groups: int, rng: np.random.Generator) -> Callable[[], torch.Tensor]:
    """A function returning the row indices of ``batch_groups`` random whole groups (a fresh epoch order each pass)."""
    ids, inverse = np.unique(group.numpy(), return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(ids))]
    state = {"order": rng.permutation(len(ids)), "position": 0}

    def next_batch() -> torch.Tensor:
        if state["position"] + batch_groups > len(ids):
            state["order"], state["position"] = rng.permutation(len(ids)), 0
        chosen = state["order"][state["position"] : state["position"] + batch_groups]
        state["position"] += batch_groups
        return torch.from_numpy(np.concatenate([members[i] for i in chosen]))

    return next_batch


def fit(
    probe: Probe,
    data: ProbeDataset,
    config: FitConfig,
    eval_data: ProbeDataset | None = None,
    progress: bool = False,
) -> list[dict]:
    """Train ``probe`` in place on ``data``; the probe's normalisation buffers are not changed.

    Args:
        probe: a probe from :func:`init_probe` or :meth:`Probe.load` (online refresh).
        data: training rollouts (whole groups).
        config: optimisation settings.
        eval_data: held-out rollouts for periodic evaluation and ``select_metric``.
        progress: show a tqdm bar.

    Returns:
        One dict per logged step: ``step``, ``loss``, ``mse``, ``rank``, and ``eval/<metric>`` when evaluated.
    """
    device = probe.feature_mean.device
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    next_batch = _group_batches(data.group, min(config.batch_groups, len(torch.unique(data.group))), rng)
    target = (data.reward.float() - probe.reward_mean.cpu()) / probe.reward_std.cpu()
    threshold = float(torch.quantile(target, config.low_score_quantile))
    weights = low_score_weights(target, threshold, config.low_score_weight)
    aux_target = _standardised_aux(data, probe.model_config.aux_outputs) if config.aux_weight else None
    optimizer = torch.optim.AdamW(probe.network.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, config.steps) / config.steps)) if config.cosine else 1.0
    )
    log: list[dict] = []
    best = (-float("inf"), None)
    probe.train()
    bar = tqdm(range(1, config.steps + 1), desc="probe fit", disable=not progress, leave=False)
    for step in bar:
        rows = next_batch()
        features = data.features[rows].to(device)
        means = None if data.group_means is None else data.group_means[rows].to(device)
        scores, aux = probe.forward_with_aux(features, data.sigma[rows].to(device), data.group[rows].to(device), means)
        loss, parts = probe_loss(
            scores, target[rows].to(device), data.group[rows].to(device), weights[rows].to(device), config.rank_weight
        )
        if aux_target is not None:
            aux_part = aux_loss(aux, aux_target[rows].to(device))
            loss = loss + config.aux_weight * aux_part
            parts["aux"] = aux_part.item()
        optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            torch.nn.utils.clip_grad_norm_(probe.network.parameters(), config.grad_clip)
            optimizer.step()
        else:  # a NaN update would make the network NaN for good: skipped, as the trainer does; the rest goes on
            logger.warning("probe fit step %d: non-finite loss %s, update skipped", step, loss.item())
        schedule.step()
        entry = {"step": step, "loss": loss.item(), **parts}
        evaluate_now = eval_data is not None and (
            step == config.steps or (config.eval_every and step % config.eval_every == 0)
        )
        if evaluate_now:
            metrics = evaluate(probe, eval_data)
            probe.train()
            entry.update({f"eval/{k}": v for k, v in metrics.items()})
            if config.select_metric is not None:
                value = SELECTABLE_METRICS[config.select_metric] * metrics[config.select_metric]  # higher: better
                if np.isfinite(value) and value > best[0]:
                    best = (value, copy.deepcopy(probe.network.state_dict()))
            bar.set_postfix(srcc=f"{metrics['within_group_srcc']:.3f}", pcc=f"{metrics['pcc']:.3f}")
        if evaluate_now or step % 50 == 0 or step == config.steps:
            log.append(entry)
    if best[1] is not None:
        probe.network.load_state_dict(best[1])
        value = SELECTABLE_METRICS[config.select_metric] * best[0]
        logger.info("kept the weights with the best %s (%.4f)", config.select_metric, value)
    probe.eval()
    return log


def _standardised_aux(data: ProbeDataset, heads: int) -> torch.Tensor | None:
    """The data's reward parts ``[N, A]``, each standardised over the data, for the network's ``heads``
    auxiliary heads; None when either side has none.

    Raises:
        ValueError: if the data holds another number of parts than the network has heads.
    """
    if data.aux is None or heads == 0:
        return None
    if data.aux.shape[1] != heads:
        raise ValueError(f"the data has {data.aux.shape[1]} auxiliary targets, the probe {heads} auxiliary heads")
    aux = data.aux.float()
    mean = aux.nanmean(dim=0)
    std = (aux - mean).square().nanmean(dim=0).sqrt().clamp(min=1e-6)
    return (aux - mean) / std


@dataclasses.dataclass
class TrainReport:
    """Outcome of :func:`train_from_collections`: held-out metrics, validation metrics and the fit log."""

    test: dict[str, float]
    validation: dict[str, float]
    log: list[dict]
    train_rollouts: int
    test_rollouts: int


def collection_meta(directories: list[str], capture_step: int, reward_key: str | None = None) -> ProbeMeta:
    """The :class:`ProbeMeta` of a probe trained on these collections (``grid`` filled by :func:`train_probe`).

    Raises:
        ValueError: if the collections disagree on the model (architecture or weights), step count, blocks, noise
            (level, SDE steps, shared initial noise), sizes or reward (spec, kwargs, weights).
    """
    manifests = [read_manifest(d) for d in directories]
    sampler_keys = ("num_steps", "noise_level", "sde_steps", "guidance_scale", "resolution", "precision",
                    "same_initial_noise")  # fmt: skip
    rewards = ("reward", "reward_kwargs", "reward_weights")  # the targets: one total, one meaning
    for key in ("fingerprint", "weights", "blocks", "text_length", *sampler_keys, *rewards):
        values = {json.dumps(m.get(key)) for m in manifests}
        if len(values) > 1:
            raise ValueError(f"collections differ in {key}: {sorted(values)}; train and test must match")
    manifest = manifests[0]
    return ProbeMeta(
        base_model=manifest["pipeline"],
        transformer_fingerprint=manifest["fingerprint"],
        capture_step=capture_step,
        num_steps=manifest["num_steps"],
        blocks=tuple(manifest["blocks"]),
        grid=(0, 0),
        text_length=manifest["text_length"],
        noise_level=manifest["noise_level"],
        reward=reward_key or manifest["reward"],
        sampler=collection_sampler(manifest),
    )


def collection_sampler(manifest: dict) -> dict:
    """The :func:`probe.probe.sampler_signature` of a collection's sampler, from its manifest."""
    steps = manifest["num_steps"]
    sde_steps = manifest.get("sde_steps")
    return {
        "num_steps": steps,
        "noise_level": float(manifest["noise_level"]),
        "sde_steps": sorted(range(steps) if sde_steps is None else sde_steps),
        "guidance_scale": float(manifest["guidance_scale"]),
        "height": manifest["resolution"],
        "width": manifest["resolution"],
        "precision": manifest.get("precision", "no"),
        "same_initial_noise": bool(manifest.get("same_initial_noise", False)),
    }


def train_probe(
    train: ProbeDataset,
    test: ProbeDataset | None,
    features: FeatureConfig | str,
    meta: ProbeMeta,
    fit_config: FitConfig,
    model_kwargs: dict | None = None,
    val_fraction: float = 0.1,
    progress: bool = False,
) -> tuple[Probe, TrainReport]:
    """Train a probe on ``train`` and evaluate it on ``test`` (held-out prompts).

    ``train`` is split by prompt into fit and validation parts (``val_fraction`` of its prompts; the validation
    part picks the checkpoint when ``fit_config.select_metric`` is set). Without ``test`` the validation part
    is reported as the test set.
    """
    fit_part, validation = train.split_by_prompt(val_fraction, seed=fit_config.seed) if val_fraction else (train, None)
    if test is None:
        if validation is None:
            raise ValueError("no held-out data: give test collections or val_fraction > 0")
        if fit_config.select_metric is not None:
            raise ValueError(
                f"select_metric={fit_config.select_metric!r} picks the checkpoint on the validation prompts, so they "
                "cannot also be the reported test set: give test collections of other prompts"
            )
        test = validation
    meta = dataclasses.replace(meta, grid=tuple(train.features.shape[-2:]), metrics={})
    torch.manual_seed(fit_config.seed)  # the network's initialisation
    probe = init_probe(fit_part, feature_config(features), meta, model_kwargs)
    log = fit(probe, fit_part, fit_config, eval_data=validation, progress=progress)
    report = TrainReport(
        test=evaluate(probe, test),
        validation=evaluate(probe, validation) if validation is not None else {},
        log=log,
        train_rollouts=len(fit_part),
        test_rollouts=len(test),
    )
    probe.meta.metrics = report.test
    return probe, report


def train_from_collections(
    train_dirs: list[str],
    test_dirs: list[str],
    capture_step: int,
    features: FeatureConfig | str,
    fit_config: FitConfig,
    model_kwargs: dict | None = None,
    val_fraction: float = 0.1,
    reward_key: str | None = None,
    aux_keys: tuple[str, ...] | list[str] = (),
    progress: bool = False,
) -> tuple[Probe, TrainReport]:
    """:func:`train_probe` on collections written by ``launch/probe_collect.py`` (test: other prompts), with one
    auxiliary head per component in ``aux_keys``.

    Raises:
        ValueError: if the collections disagree on the model, step count, blocks or noise level.
    """
    meta = collection_meta([*train_dirs, *test_dirs], capture_step, reward_key)
    train = load_dataset(train_dirs, capture_step, features, reward_key, aux_keys)
    test = load_dataset(test_dirs, capture_step, features, reward_key) if test_dirs else None
    shared = sorted(set(train.prompts) & set(test.prompts)) if test is not None else []
    if shared:
        raise ValueError(
            f"{len(shared)} of the {len(set(test.prompts))} test prompts are training prompts too (e.g. "
            f"{shared[0]!r}), so the held-out metrics would be inflated: collect the test data from other prompts "
            "(launch/probe_collect.py --prompts shapes:test, or a held-out file)"
        )
    model_kwargs = {**(model_kwargs or {}), "aux_outputs": len(aux_keys)}
    return train_probe(train, test, features, meta, fit_config, model_kwargs, val_fraction, progress)
