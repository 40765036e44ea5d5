"""The reward interface, the registry of built-ins and loading a user's reward by dotted path.

A reward scores decoded images::

    reward(images, prompts, metadata) -> {"<key>": scores[B], ...}

``images`` is a float tensor ``[B, 3, H, W]`` in [0, 1]; ``prompts`` the B prompt strings; ``metadata`` one
dict per image (the prompt's structured tags, e.g. the shapes world's GenEval-style metadata; ``{}`` when a
prompt source has none). A reward may return several named scores (a checker can return ``score`` and
``correct``); the first key is its main score, the one a run optimises. Rewards that want PIL images call
:func:`to_pil`.

Built-ins register under a short name with :func:`register`; a user's reward is a dotted path
``package.module:Callable`` (a class or a factory, called with keyword arguments from the config; or a plain
function that is itself the reward), loaded by :func:`load_reward`.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image

PROJECT = "flux-probe-grpo"


class Reward(Protocol):
    """Anything callable as ``reward(images, prompts, metadata) -> dict[str, Tensor[B]]``."""

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]: ...


class RewardError(RuntimeError):
    """A reward failed or returned something unusable; the message names the reward and what to do."""


class RewardTimeoutError(RewardError):
    """A reward gave no answer within its time limit; its thread may never return, so the run cannot go on."""


class RewardOutputError(RewardError):
    """A reward returned something that is not a dict of ``[B]`` scores: a bug, never dropped by policy."""


class RewardImportError(ImportError):
    """A reward's module cannot be imported (a plugin off PYTHONPATH, a missing optional package); the message
    names the module and the fix, so the trainer prints it as one line."""


class MissingExtraError(RewardImportError):
    """A built-in reward needs an optional dependency that is not installed."""


REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str) -> Callable:
    """Class or factory decorator: make a built-in reward loadable by ``name``."""

    def decorate(factory: Callable[..., Reward]) -> Callable[..., Reward]:
        if name in REGISTRY:
            raise ValueError(f"reward name {name!r} is registered twice")
        REGISTRY[name] = factory
        return factory

    return decorate


def require(module: str, extra: str, what: str, broken_hint: str = "") -> Any:
    """Import an optional dependency of a built-in reward.

    Raises:
        MissingExtraError: naming the extra that installs it (``pip install 'flux-probe-grpo[ocr]'``) when it
            is missing, or the import error (plus ``broken_hint``) when it is installed but fails to import.
    """
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name in (package, module):
            raise MissingExtraError(
                f"the {what} reward needs the optional package {package!r}, which is not installed. "
                f"Install it with: pip install '{PROJECT}[{extra}]'"
            ) from error
        raise MissingExtraError(
            f"the {what} reward needs {package!r}, which is installed but fails to import "
            f"({type(error).__name__}: {error}). {broken_hint or 'Check the versions of its dependencies.'}"
        ) from error


def import_object(path: str, what: str = "object") -> Any:
    """The attribute named by ``"package.module:attribute"``.

    Raises:
        ValueError: for a malformed path or a missing attribute.
        RewardImportError: when the module cannot be imported.
    """
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{what} path {path!r} must look like 'package.module:Callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RewardImportError(
            f"cannot import module {module_name!r} of {what} {path!r}: {error}. Is the module on PYTHONPATH "
            "(or installed) in the environment that runs the trainer?"
        ) from error
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"module {module_name!r} has no attribute {attribute!r} ({what} {path!r})")
        target = getattr(target, part)
    return target


def _is_plain_reward_function(factory: Callable) -> bool:
    """True for a function (not a class) whose first three parameters are positional and required."""
    if inspect.isclass(factory) or not callable(factory):
        return False
    try:
        parameters = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in parameters
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is inspect.Parameter.empty
    ]
    return len(positional) >= 3


def load_reward(spec: str, **kwargs) -> Reward:
    """Build a reward from a registry name (``"shapes"``) or a dotted path (``"mypkg.scoring:MyReward"``).

    A dotted path may name a class or a factory (called with ``kwargs``), or a plain function with the
    reward's own signature ``(images, prompts, metadata)`` (used as is; it takes no ``kwargs``). Its module is
    imported from ``sys.path``, to which the current directory is appended.

    Raises:
        ValueError: for an unknown name (listing the known ones), a malformed path, or constructor arguments
            the reward does not accept.
        ImportError: when the module of a dotted path cannot be imported, or a built-in's optional extra is
            missing (:class:`MissingExtraError`, naming the extra).
    """
    import rewards.builtins  # noqa: F401  (registers the built-ins)

    if ":" in spec:
        if os.getcwd() not in sys.path:  # a user's module next to where the run starts, as `python -m` would find it
            sys.path.append(os.getcwd())
        factory = import_object(spec, "reward")
    elif spec in REGISTRY:
        factory = REGISTRY[spec]
    else:
        raise ValueError(f"unknown reward {spec!r}; built-ins: {sorted(REGISTRY)}, or use 'package.module:Callable'")
    if _is_plain_reward_function(factory):
        if kwargs:
            raise ValueError(
                f"reward {spec!r} is a plain function (images, prompts, metadata) and takes no constructor "
                f"arguments, but reward_kwargs gives {sorted(kwargs)}; make it a class to configure it"
            )
        return factory
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as error:
        raise ValueError(
            f"reward {spec!r} does not accept the arguments {sorted(kwargs)} from reward_kwargs: {error}. "
            f"Its signature: {spec}{inspect.signature(factory)}"
        ) from error
    except ValueError:  # signature not inspectable (a C callable): let the call itself report
        pass
    reward = factory(**kwargs)
    if not callable(reward):
        raise ValueError(
            f"reward {spec!r} built a {type(reward).__name__}, which is not callable as "
            "reward(images, prompts, metadata)"
        )
    return reward


def check_scores(name: str, output: Any, batch_size: int) -> dict[str, torch.Tensor]:
    """Validate what a reward returned and convert it to float32 CPU tensors ``[B]``.

    Accepts tensors, NumPy arrays and lists for each score.

    Raises:
        RewardOutputError: naming the reward, when the output is not a non-empty dict of ``[B]`` scores.
    """
    fix = "a reward must return a dict of named scores, each of shape [B], e.g. {'score': tensor_of_B_floats}"
    if not isinstance(output, Mapping) or not output:
        raise RewardOutputError(f"reward {name!r} returned {type(output).__name__} {output!r:.80}; {fix}")
    scores = {}
    for key, value in output.items():
        if not isinstance(key, str):
            raise RewardOutputError(f"reward {name!r} returned a score under the non-string key {key!r}; {fix}")
        try:
            if isinstance(value, torch.Tensor):
                tensor = value.detach().to("cpu", torch.float32)
            else:
                tensor = torch.as_tensor(np.asarray(value, dtype=np.float32))
        except (TypeError, ValueError) as error:
            raise RewardOutputError(f"reward {name!r}: score {key!r} is not numeric ({error}); {fix}") from error
        if tuple(tensor.shape) != (batch_size,):
            raise RewardOutputError(
                f"reward {name!r}: score {key!r} has shape {tuple(tensor.shape)} for a batch of {batch_size} "
                f"images; {fix} (one value per image, in the order given)"
            )
        scores[key] = tensor
    return scores


_STEP_STATE: contextvars.ContextVar[dict | None] = contextvars.ContextVar("reward_step_state", default=None)


@contextlib.contextmanager
def scoring_step(shared: dict | None = None) -> Iterator[dict]:
    """State shared by every reward call of one scoring step, with any group-by-group retries.

    The reward set opens one per batch, or one per training step shared by the batches its threads score
    (``shared``: :meth:`rewards.compose.RewardSet.step`); a reward that budgets something per step (the remote
    client its retries) opens one too, which joins the open one, so a reward called on its own makes each call a
    step. The state is per thread unless ``shared`` hands several threads the same dict.
    """
    state = _STEP_STATE.get()
    if state is not None:
        yield state
        return
    token = _STEP_STATE.set({} if shared is None else shared)
    try:
        yield _STEP_STATE.get()
    finally:
        _STEP_STATE.reset(token)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """``[B, 3, H, W]`` in [0, 1] to B RGB PIL images (rounded to 8 bits)."""
    array = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in array]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` picks this process's current CUDA device when there is one (as set by accelerate), else CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/``None``: bf16 on a GPU that supports it, else fp16 on GPU, fp32 on CPU.

    Raises:
        ValueError: for an unknown name.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of 'auto', {', '.join(map(repr, _DTYPES))}")
    return _DTYPES[dtype]


def resolve_file(location: str, filename: str | None, what: str) -> str:
    """A weights file from a local path or the Hugging Face Hub.

    Args:
        location: a local file, a local folder holding ``filename``, or a hub repo id holding ``filename``.
        filename: the file inside the folder or repo (ignored when ``location`` is a file).
        what: named in errors (e.g. ``"aesthetic head"``).

    Raises:
        FileNotFoundError: when it is neither a local file nor downloadable, saying what to pass instead.
    """
    if os.path.isfile(location):
        return location
    if filename and os.path.isfile(os.path.join(location, filename)):
        return os.path.join(location, filename)
    if not filename:
        raise FileNotFoundError(f"{what}: {location!r} is not a file; pass a local file or a hub repo id + filename")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(location, filename)
    except Exception as error:  # offline, unknown repo, missing file: all reported the same way
        raise FileNotFoundError(
            f"{what}: cannot find {filename!r} at {location!r} locally or on the Hub ({type(error).__name__}: "
            f"{error}). Pass a local path in reward_kwargs, or allow downloads (unset HF_HUB_OFFLINE)."
        ) from error
