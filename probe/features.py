"""Fixed-size probe input per rollout from a :class:`probe.capture.ProbeCapture`.

The maps ``A[b, block, i, t]`` (image token i attending to text token t, softmax over all joint keys) are
restricted to the prompt's real tokens (``PromptEmbeddings.token_mask``: words and the end token, never
padding) and reduced to a fixed number of channels on the ``h x w`` image-token grid, whatever the prompt's
length. With ``n`` real tokens and, per token, its spatial map normalised to mean 1 over the grid,
``M[t, i] = A[i, t] / mean_i A[i, t]``, the channels are, in this order:

1. ``attention_stats`` (per block, block-major: all statistics of block ``blocks[0]``, then the next block):
   - ``mass``:    ``sum_t A[i, t]``, the share of image token i's attention that goes to the prompt;
   - ``max``:     ``max_t M[t, i]``, where some word's attention concentrates;
   - ``mean``:    ``mean_t M[t, i]``;
   - ``std``:     ``std_t M[t, i]``, whether words agree on where to look;
   - ``entropy``: entropy of ``A[i, :] / sum_t A[i, t]`` over the real tokens, divided by ``log n``.
2. ``token_slots`` channels: ``M[t]`` averaged over blocks for the first ``token_slots`` real tokens in prompt
   order (slot j = the prompt's j-th token; zeros past its length). Within a GRPO group every rollout has the
   same prompt, so slot j is the same word for all of them: these channels let the probe compare *where* each
   word (a noun, a colour, a count) lands across seeds of one prompt, which pooled statistics blur.
3. ``x0`` channels: the packed x0 prediction ``x - sigma * v`` on the token grid (FLUX packs 2x2 latent
   patches of 16 channels into 64 per token), i.e. the model's own guess of the final latent at step k.
4. ``latents`` channels (optional): the packed latents after step k, which add the SDE noise that step k
   injected (the sampler returns them anyway; ``ProbeRecorder.result(rollouts)`` attaches them).

``FeatureConfig.channel_names(...)`` lists the layout by name. Named presets (``FEATURE_SETS``):
``attention`` (1 + 2), ``x0`` (3), ``combined`` (1 + 2 + 3), ``latents`` (4) and ``all`` (1 + 2 + 3 + 4).
"""

from __future__ import annotations

import dataclasses

import torch

from probe.capture import ProbeCapture

ATTENTION_STATS: tuple[str, ...] = ("mass", "max", "mean", "std", "entropy")
_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Which channels the probe reads (see the module docstring for the layout).

    Attributes:
        attention_stats: per-block statistics over real tokens, a subset of ``ATTENTION_STATS`` (order kept).
        token_slots: per-token maps (block mean) for the first this many real tokens; 0 for none.
        x0: append the packed x0 prediction.
        latents: append the packed latents after step k.
    """

    attention_stats: tuple[str, ...] = ATTENTION_STATS
    token_slots: int = 8
    x0: bool = True
    latents: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.attention_stats) - set(ATTENTION_STATS)
        if unknown:
            raise ValueError(f"unknown attention statistics {sorted(unknown)}; choose from {ATTENTION_STATS}")
        if self.token_slots < 0:
            raise ValueError(f"token_slots must be >= 0, got {self.token_slots}")
        if not (self.attention_stats or self.token_slots or self.x0 or self.latents):
            raise ValueError("a feature set needs at least one channel group")

    @property
    def uses_attention(self) -> bool:
        return bool(self.attention_stats) or self.token_slots > 0

    def channel_names(self, blocks: tuple[int, ...], x0_channels: int) -> list[str]:
        """Channel layout, e.g. ``["block0/mass", ..., "slot0", ..., "x0/0", ..., "latents/0", ...]``."""
        names = [f"block{b}/{s}" for b in blocks for s in self.attention_stats]
        names += [f"slot{j}" for j in range(self.token_slots)]
        names += [f"x0/{c}" for c in range(x0_channels)] if self.x0 else []
        names += [f"latents/{c}" for c in range(x0_channels)] if self.latents else []
        return names

    def num_channels(self, num_blocks: int, x0_channels: int) -> int:
        latent_groups = int(self.x0) + int(self.latents)
        return num_blocks * len(self.attention_stats) + self.token_slots + latent_groups * x0_channels

    def channels_within(self, larger: FeatureConfig, blocks: tuple[int, ...], x0_channels: int) -> list[int]:
        """Indices of this config's channels inside ``larger``'s layout (features of a subset without recomputing).

        Raises:
            ValueError: if ``larger`` lacks some of this config's channels.
        """
        names = larger.channel_names(blocks, x0_channels)
        missing = [n for n in self.channel_names(blocks, x0_channels) if n not in names]
        if missing:
            raise ValueError(f"channels {missing[:4]}... are not in the larger feature set")
        return [names.index(n) for n in self.channel_names(blocks, x0_channels)]

    def to_dict(self) -> dict:
        return {
            "attention_stats": list(self.attention_stats),
            "token_slots": self.token_slots,
            "x0": self.x0,
            "latents": self.latents,
        }

    @classmethod
    def from_dict(cls, data: dict) -> FeatureConfig:
        return cls(
            tuple(data["attention_stats"]), int(data["token_slots"]), bool(data["x0"]), bool(data.get("latents"))
        )


FEATURE_SETS: dict[str, FeatureConfig] = {
    "attention": FeatureConfig(x0=False),
    "x0": FeatureConfig(attention_stats=(), token_slots=0, x0=True),
    "combined": FeatureConfig(),
    # the stored state itself: after the SDE window it determines the image (docs/design.md section 3)
    "latents": FeatureConfig(attention_stats=(), token_slots=0, x0=False, latents=True),
    "all": FeatureConfig(latents=True),
}


def feature_config(name_or_config: str | FeatureConfig) -> FeatureConfig:
    """A preset by name (``FEATURE_SETS``) or a config passed through.

    Raises:
        ValueError: for an unknown preset name.
    """
    if isinstance(name_or_config, FeatureConfig):
        return name_or_config
    if name_or_config not in FEATURE_SETS:
        raise ValueError(f"unknown feature set {name_or_config!r}; choose from {sorted(FEATURE_SETS)}")
    return FEATURE_SETS[name_or_config]


def attention_channels(attention: torch.Tensor, token_mask: torch.Tensor, config: FeatureConfig) -> torch.Tensor:
    """Attention channels (groups 1 and 2 of the layout) ``[B, C_att, S_img]``.

    Args:
        attention: ``[B, n_blocks, S_img, L]`` captured maps (any float dtype).
        token_mask: ``[B, L']`` with ``L' >= L``; True on real tokens (columns past ``L`` must be padding).
        config: which channels.

    Raises:
        ValueError: if a real token lies beyond the captured columns, or a row has no real token.
    """
    attention = attention.float()
    length = attention.shape[-1]
    mask = token_mask.to(attention.device).bool()
    if mask[:, length:].any():
        raise ValueError(f"real tokens beyond the {length} captured text columns; capture more (keep_text_tokens)")
    mask = mask[:, :length]
    count = mask.sum(-1)
    if (count == 0).any():
        raise ValueError("a rollout's prompt has no real token in token_mask")
    m = mask[:, None, None, :].float()  # [B, 1, 1, L]
    n = count.float()[:, None, None]  # [B, 1, 1]
    real = attention * m
    mass = real.sum(-1)  # [B, nb, S]
    normalised = real / (real.mean(dim=2, keepdim=True) + _EPS)  # M[t, i]: mean 1 over the grid per token
    channels = []
    stats: dict[str, torch.Tensor] = {}
    if "mass" in config.attention_stats:
        stats["mass"] = mass
    if "max" in config.attention_stats:
        stats["max"] = normalised.masked_fill(m == 0, float("-inf")).amax(-1)
    if {"mean", "std"} & set(config.attention_stats):
        mean = normalised.sum(-1) / n
        stats["mean"] = mean
        stats["std"] = ((normalised - mean[..., None]).square() * m).sum(-1).div(n).sqrt()
    if "entropy" in config.attention_stats:
        p = real / (mass[..., None] + _EPS)
        entropy = -(p * (p + _EPS).log()).sum(-1)
        stats["entropy"] = entropy / torch.log(n.clamp(min=2))
    if config.attention_stats:
        channels.append(torch.stack([stats[s] for s in config.attention_stats], dim=2).flatten(1, 2))
    if config.token_slots:
        rank = mask.long().cumsum(-1) - 1  # j for the j-th real token
        slot_ids = torch.arange(config.token_slots, device=attention.device)
        select = (mask[:, None, :] & (rank[:, None, :] == slot_ids[None, :, None])).float()  # [B, slots, L]
        channels.append(torch.einsum("bjl,bsl->bjs", select, normalised.mean(dim=1)))
    return torch.cat(channels, dim=1)


def build_features(capture: ProbeCapture, token_mask: torch.Tensor, config: FeatureConfig | str) -> torch.Tensor:
    """The probe input ``[B, C, h, w]`` (fp32) of B rollouts; C = ``config.num_channels(n_blocks, x0_channels)``.

    Args:
        capture: from :class:`probe.capture.ProbeRecorder`.
        token_mask: ``[B, L]`` real-token mask of each rollout's prompt
            (``embeds.token_mask[rollouts.prompt_index]``).
        config: a :class:`FeatureConfig` or preset name.

    Raises:
        ValueError: if x0 or latents are asked for but the capture has none.
    """
    config = feature_config(config)
    h, w = capture.grid
    parts = []
    if config.uses_attention:
        parts.append(attention_channels(capture.attention, token_mask, config))
    for name in [n for n in ("x0", "latents") if getattr(config, n)]:
        packed = getattr(capture, name)
        if packed is None:
            raise ValueError(f"the feature set reads {name}, but the capture has none (see ProbeCapture.{name})")
        parts.append(packed.float().to(parts[0].device if parts else packed.device).transpose(1, 2))
    features = torch.cat(parts, dim=1)
    if features.shape[-1] != h * w:
        raise ValueError(f"{features.shape[-1]} image tokens do not fill the {h}x{w} grid")
    return features.reshape(features.shape[0], features.shape[1], h, w)
