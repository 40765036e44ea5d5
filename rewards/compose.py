"""A run's reward: a weighted sum of named components, evaluated off the training thread, with a failure policy.

``RewardSet.submit`` returns a future, so the trainer scores one chunk of a step while it samples the next
(``GRPOTrainer.finish_and_score``; a thread pool, as flow_grpo's multi-score does); ``RewardResult.components``
holds every component's every score for logging (``<component>/<key>``).

Failure policy (``reward_failure_policy``), for a reward that raises or returns NaN/inf as its main score:

- ``raise`` (default): stop with a :class:`~rewards.base.RewardError` naming the reward, what went wrong and
  the prompt.
- ``drop_group``: drop every group (same ``group_ids``; by default the same prompt) that holds an affected
  image: ``valid`` is False and ``total`` is NaN there, and ``dropped_groups`` counts them. When a reward
  raises on a whole batch it is retried group by group, so only the groups it fails on are lost. A run whose
  every group is dropped ``max_failed_batches`` batches in a row stops with an error.

A reward returning something malformed (not a dict of ``[B]`` scores) is a bug, not a transient failure: it
always raises.

A training step is one :func:`~rewards.base.scoring_step` (:meth:`RewardSet.step`; a batch scored outside one is
its own): a reward that retries (the remote client) has one retry budget for every batch of the step, on every
worker thread, and their group-by-group retries, so a server that is down fails the step once instead of once per
batch or group, and ``max_failed_batches`` counts steps lost entirely. A component with a ``check_health()`` method is checked by :func:`build_reward_set`, so a reward server
that is down or refuses the token stops the run at setup, before the model loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from rewards.base import (
    Reward,
    RewardError,
    RewardOutputError,
    RewardTimeoutError,
    check_scores,
    load_reward,
    scoring_step,
)

logger = logging.getLogger(__name__)

FAILURE_POLICIES = ("raise", "drop_group")
_DROP_HINT = "set reward_failure_policy: drop_group to drop the affected groups instead of stopping the run"


@dataclasses.dataclass
class RewardResult:
    """Scores of B images.

    Attributes:
        total: ``[B]`` weighted sum of each component's main (first) score; NaN where ``valid`` is False, so a
            trainer that forgot the mask fails loudly instead of learning from a made-up score.
        components: ``"<component>/<key>" -> [B]`` every score each component returned (NaN where it failed).
        valid: ``[B]`` bool; False where the failure policy dropped the image's group.
        dropped_groups: how many groups were dropped (0 under the ``raise`` policy).
        failures: one message per failure behind the drops, naming the reward, the error and the prompt.
        seconds: wall-clock seconds the scoring took (summed over concatenated results).
    """

    total: torch.Tensor
    components: dict[str, torch.Tensor]
    valid: torch.Tensor
    dropped_groups: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @classmethod
    def failed(cls, count: int, error: Exception) -> RewardResult:
        """``count`` images left unscored by a reward failure that stops the run: all invalid, totals NaN (a caller
        that holds the failure keeps its collectives going with this until every process can stop together)."""
        return cls(torch.full((count,), math.nan), {}, torch.zeros(count, dtype=torch.bool), failures=[str(error)])

    @classmethod
    def concatenate(cls, results: list[RewardResult]) -> RewardResult:
        """The results of consecutive batches as one, in order (the trainer scores a step in chunks)."""
        if len(results) == 1:
            return results[0]
        keys = {key: None for result in results for key in result.components}  # every key, first-seen order
        return cls(
            total=torch.cat([r.total for r in results]),
            components={
                key: torch.cat([r.components.get(key, torch.full_like(r.total, math.nan)) for r in results])
                for key in keys
            },
            valid=torch.cat([r.valid for r in results]),
            dropped_groups=sum(r.dropped_groups for r in results),
            failures=[message for r in results for message in r.failures],
            seconds=sum(r.seconds for r in results),
        )


def callers_context() -> Callable[[], contextlib.ExitStack]:
    """A context that re-enters the calling thread's autocast and CUDA device on another thread (both are per
    thread: a reward scored on a worker must compute as it would on the caller)."""
    autocasts = [(device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
                 if torch.is_autocast_enabled(device)]  # fmt: skip
    cuda = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def enter() -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        if cuda is not None:
            stack.enter_context(torch.cuda.device(cuda))
        for device, dtype in autocasts:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        return stack

    return enter


def group_index(prompts: list[str], group_ids: torch.Tensor | None) -> torch.Tensor:
    """``[B]`` long: dense group numbers (0..G-1) from ``group_ids``, or from identical prompts when None."""
    if group_ids is not None:
        return torch.unique(torch.as_tensor(group_ids).reshape(-1).cpu(), return_inverse=True)[1]
    first: dict[str, int] = {}
    return torch.tensor([first.setdefault(p, len(first)) for p in prompts], dtype=torch.long)


class RewardSet:
    """Weighted components, each ``(name, reward, weight)``; ``name`` prefixes its logged scores.

    Args:
        components: the rewards and their weights; names must be unique.
        max_workers: threads scoring submitted batches. Each component is called by one thread at a time
            (a lock per component), so rewards need not be thread-safe; a reward with a true ``thread_safe``
            attribute (the remote client) is called concurrently, so several requests can be in flight.
        failure_policy: ``"raise"`` or ``"drop_group"`` (see the module docstring).
        max_failed_batches: under ``drop_group``, stop after this many consecutive steps (:meth:`step`; outside
            one, batches) lost entirely.
        timeout_s: longest wait for one batch's scores (:meth:`wait`, and every :meth:`__call__`); 0: no limit.
    """

    def __init__(
        self,
        components: list[tuple[str, Reward, float]],
        max_workers: int = 1,
        failure_policy: str = "raise",
        max_failed_batches: int = 3,
        timeout_s: float = 0.0,
    ) -> None:
        if not components:
            raise ValueError("a reward set needs at least one component")
        names = [name for name, _, _ in components]
        if len(set(names)) != len(names):
            raise ValueError(f"reward component names must be unique, got {names}")
        if failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"reward_failure_policy must be one of {FAILURE_POLICIES}, got {failure_policy!r}")
        for name, reward, _ in components:  # a client still retrying when the set calls it hung stops a healthy run
            longest = getattr(reward, "longest_request_s", 0.0)
            if timeout_s and longest > timeout_s:
                raise ValueError(
                    f"reward {name!r}: one request may take {longest:g} s with its retries (timeout x (retries + 1) "
                    f"plus the backoffs), longer than the {timeout_s:g} s a batch's scores are waited for "
                    "(reward_timeout_s; with several processes at most half of distributed_timeout_s), so the run "
                    "would stop as hung while the client still retries: lower timeout or retries in its "
                    "reward_kwargs, or raise reward_timeout_s"
                )
        self.components = components
        self.failure_policy = failure_policy
        self.max_failed_batches = max_failed_batches
        self.timeout_s = timeout_s
        self._hung: str | None = None  # why a batch outlived timeout_s: its thread may never return
        self._locks = {
            name: contextlib.nullcontext() if getattr(reward, "thread_safe", False) else threading.Lock()
            for name, reward, _ in components
        }
        self._main_keys: dict[str, list[str]] = {}
        self._failed_in_a_row = 0
        self._state_lock = threading.Lock()
        self._open_step: _Step | None = None
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="reward")

    @property
    def names(self) -> list[str]:
        return [name for name, _, _ in self.components]

    def __call__(
        self,
        images: torch.Tensor,
        prompts: list[str],
        metadata: list[dict],
        group_ids: torch.Tensor | None = None,
    ) -> RewardResult:
        """Score a batch and wait for its scores (inside :meth:`step`, as part of that step).

        Without ``timeout_s`` it is scored on the calling thread. With it, on a worker thread, so the wait can be
        bounded; the worker enters the caller's autocast and CUDA device (both are per thread) and scores the
        images as given, so the scores are the same either way.

        Args:
            images: ``[B, 3, H, W]`` float in [0, 1].
            prompts: B prompts.
            metadata: B dicts.
            group_ids: ``[B]`` ints; images sharing an id form a group (dropped together). Default: the prompt.

        Raises:
            RewardError: under the ``raise`` policy on any failure; always on malformed output; under
                ``drop_group`` after ``max_failed_batches`` consecutive batches with nothing valid.
            RewardTimeoutError: no scores within ``timeout_s``.
        """
        step = self._open_step
        if not self.timeout_s:
            return self._score_batch(step, images, prompts, metadata, group_ids)
        context = callers_context()

        def score() -> RewardResult:
            with context():
                return self._score_batch(step, images, prompts, metadata, group_ids)

        return self.wait(self._pool.submit(score))

    def wait(self, future: Future[RewardResult]) -> RewardResult:
        """The scores of a :meth:`submit`, waiting at most ``timeout_s`` (0: as long as it takes).

        Raises:
            RewardTimeoutError: no answer in time, or, once one batch hung, any batch not done yet. The reward's
                thread cannot be stopped from outside and the next call of that component would wait for its
                lock, so a run stops (after a checkpoint) and this set stays failed.
        """
        if self._hung is not None:  # the batches queued behind a hung one would each wait out the limit again
            if future.done():
                return future.result()
            raise RewardTimeoutError(f"{self._hung} (this batch was queued behind it)")
        try:
            return future.result(timeout=self.timeout_s or None)
        except FutureTimeout:
            names = ", ".join(repr(name) for name in self.names)
            self._hung = (
                f"reward {names} gave no answer within reward_timeout_s={self.timeout_s:g} s: a hung reward (a "
                "deadlocked judge, a network call without a deadline) stops the run; raise reward_timeout_s if "
                "scoring a batch legitimately takes longer"
            )
            raise RewardTimeoutError(self._hung) from None

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """One training step: every batch scored inside it, by :meth:`__call__` or :meth:`submit`, shares one
        :func:`~rewards.base.scoring_step` (one retry budget per reward) and the step, not each batch, counts toward
        ``max_failed_batches``. Leave it only once its submitted batches are done."""
        step = self._open_step = _Step()
        try:
            yield
        finally:
            self._open_step = None
        if step.batches:
            self._count_failed(step.any_valid, step.failures, "steps")

    def _score_batch(self, step, images, prompts, metadata, group_ids) -> RewardResult:
        started = time.perf_counter()
        batch = _check_inputs(images, prompts, metadata, group_ids)
        if batch == 0:  # e.g. every rollout pruned: nothing to score, nothing failed
            return RewardResult(torch.zeros(0), {}, torch.zeros(0, dtype=torch.bool))
        groups = group_index(prompts, group_ids)
        total = torch.zeros(batch)
        ok, failures = self._finite_images(images, prompts)
        images = images.nan_to_num(0.0, 0.0, 0.0) if not ok.all() else images  # rewards see pixels, not NaN
        components: dict[str, torch.Tensor] = {}
        # one retry budget per reward for the step (or this batch) and its group-by-group retries
        with scoring_step(None if step is None else step.shared):
            for name, reward, weight in self.components:
                scores, failed, messages = self._score(name, reward, images, prompts, metadata, groups)
                for key, value in scores.items():
                    components[f"{name}/{key}"] = value
                total += weight * next(iter(scores.values()))
                ok &= ~failed
                failures += messages
        dropped = torch.unique(groups[~ok])
        valid = ~torch.isin(groups, dropped)
        total = torch.where(valid, total, torch.full_like(total, math.nan))
        if len(dropped):
            logger.warning("reward: dropped %d of %d groups: %s", len(dropped), int(groups.max()) + 1, failures)
        if step is None:
            self._count_failed(bool(valid.any()), failures, "batches")
        else:
            step.add(bool(valid.any()), failures)
        return RewardResult(total, components, valid, len(dropped), failures, seconds=time.perf_counter() - started)

    def submit(
        self,
        images: torch.Tensor,
        prompts: list[str],
        metadata: list[dict],
        group_ids: torch.Tensor | None = None,
    ) -> Future[RewardResult]:
        """Score on a worker thread; ``images`` are copied to the CPU first so sampling can reuse the GPU."""
        images = images.detach().to("cpu", torch.float32, copy=True)
        group_ids = None if group_ids is None else torch.as_tensor(group_ids).detach().cpu().clone()
        return self._pool.submit(self._score_batch, self._open_step, images, list(prompts), list(metadata), group_ids)

    def close(self) -> None:
        """Wait for pending batches (unless one hung), then release the threads and any component with a
        ``close()``."""
        hung = self._hung is not None
        self._pool.shutdown(wait=not hung, cancel_futures=hung)
        for _, reward, _ in self.components:
            if callable(getattr(reward, "close", None)):
                reward.close()

    def _call(self, name: str, reward: Reward, images, prompts, metadata) -> dict[str, torch.Tensor]:
        with self._locks[name], torch.no_grad():
            output = reward(images, prompts, metadata)
        return check_scores(name, output, len(images))

    def _score(
        self, name: str, reward: Reward, images, prompts, metadata, groups
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[str]]:
        """One component's scores ``[B]`` per key, a ``[B]`` failed mask, and failure messages."""
        try:
            scores = self._call(name, reward, images, prompts, metadata)
        except RewardOutputError:
            raise
        except Exception as error:
            if self.failure_policy == "raise":
                raise RewardError(
                    f"reward {name!r} raised {type(error).__name__}: {error} (scoring {len(images)} images; first "
                    f"prompt {prompts[0]!r}). Fix the reward or its reward_kwargs, or {_DROP_HINT}."
                ) from error
            return self._score_by_group(name, reward, images, prompts, metadata, groups)
        self._main_keys.setdefault(name, list(scores))
        failed, messages = self._non_finite(name, scores, prompts)
        return scores, failed, messages

    def _score_by_group(self, name, reward, images, prompts, metadata, groups):
        """After a whole-batch exception under ``drop_group``: retry group by group, keeping what succeeds."""
        scores: dict[str, torch.Tensor] = {}
        failed = torch.zeros(len(images), dtype=torch.bool)
        messages = []
        for group in torch.unique(groups):
            index = torch.nonzero(groups == group).flatten()
            sub_prompts = [prompts[i] for i in index]
            try:
                sub = self._call(name, reward, images[index], sub_prompts, [metadata[i] for i in index])
            except RewardOutputError:
                raise
            except Exception as error:
                failed[index] = True
                problem = f"{type(error).__name__}: {error}"
                messages.append(f"reward {name!r} raised {problem} (prompt {sub_prompts[0]!r}); group dropped")
                continue
            keys = self._main_keys.setdefault(name, list(sub))
            if list(sub) != keys:
                raise RewardOutputError(f"reward {name!r} returned keys {list(sub)} for one group but {keys} before")
            for key, value in sub.items():
                scores.setdefault(key, torch.full((len(images),), math.nan))[index] = value
            group_failed, group_messages = self._non_finite(name, sub, sub_prompts)
            failed[index] |= group_failed
            messages += group_messages
        for key in self._main_keys.get(name, ["score"]):
            scores.setdefault(key, torch.full((len(images),), math.nan))
        return scores, failed, messages

    def _finite_images(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, list[str]]:
        """``[B]`` True where every pixel is finite, and the failure message: a reward would score a NaN image
        (a diverged policy or sampler) as black or white, a finite number that hides the divergence."""
        finite = torch.isfinite(images.flatten(1)).all(1)
        if finite.all():
            return finite, []
        first = int(torch.nonzero(~finite)[0])
        problem = (
            f"{int((~finite).sum())} of {len(images)} images hold non-finite pixels (e.g. for prompt "
            f"{prompts[first]!r}): the policy or the sampler diverged"
        )
        if self.failure_policy == "raise":
            raise RewardError(f"{problem}; rewards would score them as finite images. Lower the learning rate or "
                              "the SDE noise level, or resume from an earlier checkpoint.")  # fmt: skip
        return finite, [f"{problem}; group dropped"]

    def _non_finite(self, name: str, scores: dict[str, torch.Tensor], prompts: list[str]):
        key, main = next(iter(scores.items()))
        failed = ~torch.isfinite(main)
        if not failed.any():
            return failed, []
        first = int(torch.nonzero(failed)[0])
        problem = (
            f"reward {name!r} returned {int(failed.sum())} non-finite {key!r} score(s) of {len(main)} "
            f"(e.g. {main[first].item()} for prompt {prompts[first]!r})"
        )
        if self.failure_policy == "raise":
            raise RewardError(
                f"{problem}; NaN/inf would poison the group's advantages. Fix the reward, or {_DROP_HINT}."
            )
        return failed, [f"{problem}; group dropped"]

    def _count_failed(self, any_valid: bool, failures: list[str], unit: str) -> None:
        with self._state_lock:
            self._failed_in_a_row = 0 if any_valid else self._failed_in_a_row + 1
            if self._failed_in_a_row >= self.max_failed_batches:
                raise RewardError(
                    f"the rewards {self.names} failed on every group of {self._failed_in_a_row} {unit} in a row "
                    f"(last: {failures[:3]}); nothing is left to train on. Fix the reward (or its server)."
                )


@dataclasses.dataclass
class _Step:
    """What the batches of one :meth:`RewardSet.step` share and add up (they may run on several threads)."""

    shared: dict = dataclasses.field(default_factory=dict)  # the scoring_step state: the rewards' retry budgets
    batches: int = 0
    any_valid: bool = False
    failures: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def add(self, any_valid: bool, failures: list[str]) -> None:
        with self.lock:
            self.batches += 1
            self.any_valid |= any_valid
            self.failures += failures


def _check_inputs(images, prompts, metadata, group_ids) -> int:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"rewards take images as a float tensor [B, 3, H, W] in [0, 1], got {shape}")
    batch = len(images)
    if len(prompts) != batch or len(metadata) != batch:
        raise ValueError(f"{batch} images but {len(prompts)} prompts and {len(metadata)} metadata dicts")
    if group_ids is not None and torch.as_tensor(group_ids).numel() != batch:
        raise ValueError(f"{batch} images but {torch.as_tensor(group_ids).numel()} group ids")
    return batch


def parse_reward_spec(spec: str) -> list[tuple[str, str]]:
    """``"pickscore, ocr=mypkg.ocr:Ocr"`` -> ``[("pickscore", "pickscore"), ("ocr", "mypkg.ocr:Ocr")]``.

    Each comma-separated item is ``spec`` or ``name=spec``; the name labels the component in logs and keys
    its ``reward_kwargs`` (two components of the same spec, e.g. two remote servers, need distinct names).

    Raises:
        ValueError: on an empty spec or a repeated name.
    """
    items = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, target = part.partition("=")
        name, target = (name.strip(), target.strip()) if sep else (part, part)
        if not name or not target:
            raise ValueError(f"reward item {part!r} must be 'spec' or 'name=spec'")
        items.append((name, target))
    if not items:
        raise ValueError(f"reward spec {spec!r} names no reward; e.g. 'shapes' or 'pickscore,clipscore'")
    names = [name for name, _ in items]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(
                f"reward {name!r} appears twice in {spec!r}; name each one ('a={name},b={name}') and key "
                "reward_kwargs by those names"
            )
    return items


def build_reward_set(
    spec: str,
    weights: list[float] | str | None = None,
    kwargs: dict[str, dict] | str | None = None,
    max_workers: int = 1,
    failure_policy: str = "raise",
    max_failed_batches: int = 3,
    timeout_s: float = 0.0,
) -> RewardSet:
    """Build from a comma-separated list of registry names / dotted paths, e.g. ``"pickscore,clipscore"``.

    Args:
        spec: components; each is a built-in name or ``package.module:Callable``, optionally ``name=...``.
        weights: one per component (default 1 each); a list or a comma-separated string.
        kwargs: constructor arguments keyed by the component's name (its spec string unless named); a dict or
            a JSON string.
        max_workers: threads for :meth:`RewardSet.submit`.
        failure_policy: ``"raise"`` or ``"drop_group"``.
        max_failed_batches, timeout_s: see :class:`RewardSet`.

    Raises:
        ValueError: on a length mismatch between components and weights, a non-finite weight, kwargs for an
            unknown component, or invalid JSON.
        RewardError: when a component's ``check_health()`` fails (a reward server down or refusing the token).
    """
    items = parse_reward_spec(spec)
    names = [name for name, _ in items]
    if isinstance(weights, str):
        weights = [float(w) for w in weights.split(",") if w.strip()]
    weights = [float(w) for w in weights] if weights else [1.0] * len(items)
    if len(weights) != len(items):
        raise ValueError(f"reward_weights has {len(weights)} values for {len(items)} rewards ({names})")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"reward_weights must be finite, got {weights}")
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else {}
        except json.JSONDecodeError as error:
            raise ValueError(f"reward_kwargs is not valid JSON ({error}): {kwargs!r}") from error
    kwargs = kwargs or {}
    if not isinstance(kwargs, dict) or not all(isinstance(v, dict) for v in kwargs.values()):
        raise ValueError(f'reward_kwargs must map each reward to a dict of arguments, e.g. {{"{names[0]}": {{}}}}')
    unknown = set(kwargs) - set(names)
    if unknown:
        raise ValueError(f"reward_kwargs names {sorted(unknown)}, which are not among the rewards {names}")
    components = [
        (name, load_reward(target, **kwargs.get(name, {})), weight) for (name, target), weight in zip(items, weights)
    ]
    for _, reward, _ in components:
        if callable(getattr(reward, "check_health", None)):
            reward.check_health()
    return RewardSet(components, max_workers, failure_policy, max_failed_batches, timeout_s)
