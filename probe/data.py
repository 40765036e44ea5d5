"""Probe training data: collected shards on disk and the in-memory dataset the trainer reads.

``launch/probe_collect.py`` writes a directory::

    manifest.json          the collection's settings (a resumed run must match them)
    shard_00000.pt ...     whole prompt groups each; written atomically, so a shard file is complete or absent

A shard is a ``torch.save`` dict (loadable with ``weights_only=True``) of n rollouts:

- ``prompts`` (list[str], n), ``metadata`` (list[str], n: JSON), ``group`` ``[n]`` (one id per prompt draw,
  unique across the collection), ``seed`` ``[n]``;
- ``reward`` ``[n]`` (the reward set's weighted total) and ``components`` ``{"<name>/<key>": [n]}``;
- ``token_mask`` ``[n, L]`` real T5 tokens;
- ``captures`` ``{k: {"attention": [n, n_blocks, S_img, L_k], "x0": [n, S_img, C], "latents": [n, S_img, C],
  "sigma": float}}`` (fp16) for each capture step k (``L_k`` = the shard's longest prompt in tokens: T5 puts
  padding last; ``latents``: after step k);
- ``blocks`` and ``grid``.

:func:`load_dataset` turns shards into a :class:`ProbeDataset` of features for one capture step and one
feature set; :meth:`ProbeDataset.split_by_prompt` splits by prompt text, so no prompt is on both sides.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from probe.capture import ProbeCapture
from probe.features import FeatureConfig, build_features, feature_config
from rl.paths import repository_hint

SHARD_FORMAT_VERSION = 1


def shard_path(directory: str | Path, index: int) -> Path:
    return Path(directory) / f"shard_{index:05d}.pt"


def atomic_save(payload, path: str | Path) -> None:
    """``torch.save`` to a temporary name, then rename: an interrupted write never leaves a partial file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def write_manifest(directory: str | Path, settings: dict) -> None:
    """Create ``manifest.json``, or check that an existing one records the same settings.

    Raises:
        ValueError: when resuming into a directory collected with other settings (naming the keys).
    """
    path = Path(directory) / "manifest.json"
    settings = json.loads(json.dumps(settings))  # normalise tuples to lists
    if path.exists():
        existing = json.loads(path.read_text())
        differing = sorted(k for k in set(existing) | set(settings) if existing.get(k) != settings.get(k))
        if differing:
            details = ", ".join(f"{k}: {existing.get(k)!r} -> {settings.get(k)!r}" for k in differing)
            raise ValueError(f"{directory} holds a collection with other settings ({details}); use a new --out")
        return
    Path(directory).mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("manifest.json.tmp")
    tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_manifest(directory: str | Path) -> dict:
    return json.loads((Path(directory) / "manifest.json").read_text())


def load_saved(path: str | Path, what: str, fix: str, map_location: str | torch.device = "cpu") -> dict:
    """A dict this package wrote with ``torch.save`` (a probe, a shard), loaded with ``weights_only=True``.

    Args:
        path: the file.
        what: what the file should be, for the message ("probe file").
        fix: what to do about a damaged one, for the message.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a truncated, corrupt or foreign file, naming it, the reason and ``fix``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist{repository_hint(path)}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # damaged bytes end in EOFError, RuntimeError (zip), IndexError, KeyError, ...
        detail = str(error).split(". ")[0].splitlines()[0] if str(error) else ""  # torch adds paragraphs of advice
        raise ValueError(
            f"{what} {path} cannot be read: it is truncated, damaged or no {what} ({type(error).__name__}"
            f"{': ' + detail if detail else ''}); {fix}"
        ) from None
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path} holds a {type(state).__name__}, not this package's dict; {fix}")
    return state


def iter_shards(directory: str | Path) -> Iterator[dict]:
    """Every complete shard of a collection, in index order.

    Raises:
        FileNotFoundError: no shards in ``directory``.
        ValueError: a damaged shard (named: delete it and re-run the collection, which rewrites missing shards).
    """
    paths = sorted(Path(directory).glob("shard_*.pt"))
    if not paths:
        raise FileNotFoundError(f"no shard_*.pt in {directory}")
    fix = "delete it and re-run the same launch/probe_collect.py command, which collects missing shards again"
    for path in paths:
        shard = load_saved(path, "probe data shard", fix)
        if shard.get("format_version") != SHARD_FORMAT_VERSION:
            raise ValueError(f"{path}: shard format {shard.get('format_version')}, expected {SHARD_FORMAT_VERSION}")
        yield shard


def shard_capture(shard: dict, capture_step: int) -> ProbeCapture:
    """The :class:`ProbeCapture` stored in a shard for one capture step.

    Raises:
        ValueError: if the shard has no capture at that step (listing the ones it has).
    """
    captures = shard["captures"]
    if capture_step not in captures:
        raise ValueError(f"no capture at step {capture_step}; the data has steps {sorted(captures)}")
    entry = captures[capture_step]
    return ProbeCapture(
        attention=entry["attention"],
        x0=entry.get("x0"),
        sigma=float(entry["sigma"]),
        capture_step=capture_step,
        blocks=tuple(shard["blocks"]),
        grid=tuple(shard["grid"]),
        latents=entry.get("latents"),
    )


@dataclasses.dataclass
class ProbeDataset:
    """N rollouts' probe inputs and real rewards.

    Attributes:
        features: ``[N, C, h, w]`` raw features (see :mod:`probe.features`).
        sigma: ``[N]`` sigma of each rollout's capture.
        reward: ``[N]`` real final reward.
        group: ``[N]`` prompt-group id (rollouts of one prompt draw, different noise).
        prompts: N prompt strings (the split key).
        aux: ``[N, A]`` reward parts the probe's auxiliary heads learn (``load_dataset``'s ``aux_keys``), or None.
        group_means: ``[N, C, h, w]`` the features' mean over each rollout's whole group, when the rows hold only
            part of it (the online buffer keeps survivors, and a group-relative probe predicted them against their
            whole group); None: the mean over the rows.
    """

    features: torch.Tensor
    sigma: torch.Tensor
    reward: torch.Tensor
    group: torch.Tensor
    prompts: list[str]
    aux: torch.Tensor | None = None
    group_means: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.reward.shape[0]

    @classmethod
    def from_tensors(
        cls,
        features: torch.Tensor,
        sigma: torch.Tensor | float,
        reward: torch.Tensor,
        group: torch.Tensor,
        prompts: list[str] | None = None,
        group_means: torch.Tensor | None = None,
    ) -> ProbeDataset:
        """A dataset from in-memory rollouts, e.g. GRPO's online buffer of (features, real reward, group id).

        Args:
            features: ``[N, C, h, w]`` raw features (:meth:`probe.probe.Probe.features`).
            sigma: the capture's sigma, scalar or ``[N]``.
            reward: ``[N]`` real rewards.
            group: ``[N]`` group ids (rollouts of one prompt draw share one).
            prompts: N prompt strings; default: the group id as text (a split by prompt is then a split by group).

        Raises:
            ValueError: if the tensors disagree on N.
        """
        n = features.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).expand(n).clone()
        prompts = [str(g) for g in group.tolist()] if prompts is None else list(prompts)
        sizes = {
            "features": n,
            "sigma": len(sigma),
            "reward": len(reward),
            "group": len(group),
            "prompts": len(prompts),
        }
        if len(set(sizes.values())) > 1:
            raise ValueError(f"rollout counts differ: {sizes}")
        means = None if group_means is None else group_means.detach().cpu()
        return cls(features.detach().cpu(), sigma, reward.detach().cpu().float(), group.detach().cpu().long(), prompts,
                   group_means=means)  # fmt: skip

    def subset(self, indices: torch.Tensor | np.ndarray | list[int]) -> ProbeDataset:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ProbeDataset(
            self.features[indices],
            self.sigma[indices],
            self.reward[indices],
            self.group[indices],
            [self.prompts[i] for i in indices.tolist()],
            None if self.aux is None else self.aux[indices],
            None if self.group_means is None else self.group_means[indices],
        )

    def split_by_prompt(self, fraction: float, seed: int = 0) -> tuple[ProbeDataset, ProbeDataset]:
        """``(rest, held_out)`` with about ``fraction`` of the distinct prompts held out (all their rollouts)."""
        unique = sorted(set(self.prompts))
        if len(unique) < 2:
            raise ValueError(
                f"{len(unique)} distinct prompt(s): holding out a fraction of the prompts needs at least 2 (collect more "
                "prompts, or set the validation fraction to 0)"
            )
        rng = np.random.default_rng(seed)
        held = set(rng.choice(len(unique), size=max(1, round(fraction * len(unique))), replace=False).tolist())
        held_prompts = {unique[i] for i in held}
        mask = np.array([p in held_prompts for p in self.prompts])
        return self.subset(np.flatnonzero(~mask)), self.subset(np.flatnonzero(mask))

    def channels(self, indices: list[int]) -> ProbeDataset:
        """The same rollouts with only the feature channels ``indices`` (e.g. one group of a larger feature set)."""
        means = None if self.group_means is None else self.group_means[:, indices]
        return dataclasses.replace(self, features=self.features[:, indices], group_means=means)

    @staticmethod
    def concatenate(parts: list[ProbeDataset]) -> ProbeDataset:
        return ProbeDataset(
            torch.cat([p.features for p in parts]),
            torch.cat([p.sigma for p in parts]),
            torch.cat([p.reward for p in parts]),
            torch.cat([p.group for p in parts]),
            [prompt for p in parts for prompt in p.prompts],
            None if any(p.aux is None for p in parts) else torch.cat([p.aux for p in parts]),
            None if any(p.group_means is None for p in parts) else torch.cat([p.group_means for p in parts]),
        )


def load_dataset(
    directories: str | Path | list[str | Path],
    capture_step: int,
    features: FeatureConfig | str,
    reward_key: str | None = None,
    aux_keys: tuple[str, ...] | list[str] = (),
) -> ProbeDataset:
    """Features at one capture step for every rollout of one or more collections.

    Args:
        directories: collection directories (group ids are offset per directory so they stay unique).
        capture_step: which stored capture to read.
        features: feature set (preset name or config).
        reward_key: a component (``"shapes/score"``) instead of the weighted total.
        aux_keys: components kept as the dataset's ``aux`` columns (auxiliary targets).

    Raises:
        ValueError: a component the collection does not hold (naming those it holds).
    """
    config = feature_config(features)
    directories = [directories] if isinstance(directories, str | Path) else list(directories)
    parts = []
    group_offset = 0
    for directory in directories:
        largest = -1
        for shard in iter_shards(directory):
            capture = shard_capture(shard, capture_step)
            reward = shard["reward"] if reward_key is None else _component(shard, reward_key, directory)
            aux = [_component(shard, key, directory).float() for key in aux_keys]
            group = shard["group"].long()
            largest = max(largest, int(group.max()))
            parts.append(
                ProbeDataset(
                    features=build_features(capture, shard["token_mask"], config),
                    sigma=torch.full((len(reward),), capture.sigma),
                    reward=reward.float(),
                    group=group + group_offset,
                    prompts=list(shard["prompts"]),
                    aux=torch.stack(aux, dim=1) if aux else None,
                )
            )
        group_offset += largest + 1
    return ProbeDataset.concatenate(parts)


def _component(shard: dict, key: str, directory: str | Path) -> torch.Tensor:
    if key not in shard["components"]:
        raise ValueError(
            f"{directory} holds no reward component {key!r}; it has {sorted(shard['components'])} (a component "
            "added to the reward later needs a new collection)"
        )
    return shard["components"][key]
