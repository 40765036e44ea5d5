"""The reward interface, the registry of built-ins and the weighted multi-reward the trainer calls.

A reward scores decoded images::

    reward(images, prompts, metadata) -> {"<name>": scores[B], ...}

``images`` is a float tensor ``[B, 3, H, W]`` in [0, 1]; ``prompts`` the B prompt strings; ``metadata`` one
dict per image (the prompt's structured tags, e.g. the shapes world's GenEval-style metadata; ``{}`` when a
prompt source has none). A reward may return several named scores (a checker can return ``score`` and
``correct``); the first key is its main score. Rewards that want PIL images call :func:`to_pil`.

Built-ins register under a short name with :func:`register`; a user's reward is a dotted path
``package.module:Callable`` (a class or a factory), loaded by :func:`load_reward` with keyword arguments
from the config.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from PIL import Image


class Reward(Protocol):
    """Anything callable as ``reward(images, prompts, metadata) -> dict[str, Tensor[B]]``."""

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]: ...


REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str) -> Callable:
    """Class or factory decorator: make a built-in reward loadable by ``name``."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in REGISTRY:
            raise ValueError(f"reward name {name!r} is registered twice")
        REGISTRY[name] = factory
        return factory

    return decorate


def load_reward(spec: str, **kwargs) -> Reward:
    """Build a reward from a registry name (``"shapes"``) or a dotted path (``"mypkg.scoring:MyReward"``).

    Raises:
        ValueError: for an unknown name (listing the known ones) or a malformed path.
        ImportError: when the module of a dotted path cannot be imported.
    """
    import rewards.builtins  # noqa: F401  (registers the built-ins)

    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"reward path {spec!r} must look like 'package.module:Callable'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ImportError(f"cannot import module {module_name!r} of reward {spec!r}: {error}") from error
        try:
            factory = getattr(module, attribute)
        except AttributeError as error:
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r} (reward {spec!r})") from error
    elif spec in REGISTRY:
        factory = REGISTRY[spec]
    else:
        raise ValueError(f"unknown reward {spec!r}; built-ins: {sorted(REGISTRY)}, or use 'package.module:Callable'")
    return factory(**kwargs)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [0, 1] to B RGB PIL images."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]
