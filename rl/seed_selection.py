"""Predictor-guided best-of-N sampling for inference (the Diffusion Probe paper's seed selection).

Per prompt: start N seeds with deterministic sampling (noise level 0, as ``FluxPipeline``), run them to the
capture step k, let a predictor (rl/predictors/: ``probe``, ``preview``, ``lookahead``) predict each one's final
reward, keep the K predicted best, finish only those and return the best of them by the real reward when one is
given (by the prediction otherwise). The survivors continue from their own states with their own seeds' noise,
so each finished image is the one sampling that seed alone gives: bit-identical when each transformer call holds
one rollout (``batch_size`` 1; tests/rl/test_seed_selection.py), and within the last bits otherwise, since batched
CPU and GPU kernels may round a rollout differently beside other batch-mates (~1e-5 in pixels on the tiny model).

A funnel prunes more than once (Pro-GRPO's 48 -> 24 -> 12, arXiv 2512.15347): capture steps k_1 < k_2 < ...
keeping K_1 > K_2 > ... seeds, each stage ranking only the previous stage's survivors, a later (more accurate)
prediction paid for by fewer seeds. Compute per prompt (T steps; each predictor adds its own,
:class:`rl.predictors.PredictionCost`; one stage: N_1 = N, K_1 = K)::

    transformer calls = sum_i N_i (k_i - k_(i-1) + predictor calls) + K_last (T - k_last)    full best-of-N: N T
    decodes           = sum_i N_i predictor decodes + K_last                                 full best-of-N: N
    reward calls      = sum_i N_i predictor reward calls + K_last (0 without a reward)       full best-of-N: N

with N_i the seeds alive at stage i (N, then K_1, K_2, ...) and k_0 = 0.

Measured on the shipped model: bench/RESULTS.md, "Seed selection" (``bench/seed_selection.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Sequence
from typing import TypeVar

import torch
from diffusers import FluxPipeline

from rewards.compose import RewardResult, RewardSet, build_reward_set
from rl.config import ModelConfig, RunConfig, TrainingConfig
from rl.predictors import PredictionCost, PredictionInputs, Predictor, build_predictor, known_rewards
from rl.predictors.preview import X0Recorder
from rl.pruning_config import PruningConfig
from rl.sampler import FluxSampler, PromptEmbeddings, StepObserver, encode_prompts

Item = TypeVar("Item")


@dataclasses.dataclass
class SeedChoice:
    """What best-of-N selection did for one prompt.

    Attributes:
        prompt: the prompt text.
        seeds: the N seeds started.
        predicted: ``[N]`` each seed's predicted final reward at the (first) capture step.
        kept: indices into ``seeds`` of the K survivors (of the last stage), best predicted first.
        kept_rewards: ``[K]`` the survivors' real rewards (None without a reward).
        chosen: index into ``seeds`` of the returned image.
        images: ``[K, 3, H, W]`` the survivors' finished images in [0, 1], in ``kept`` order.
        cost: what this prompt cost (transformer calls, decodes, reward calls).
        previews: ``[N, 3, H, W]`` every seed's x0 preview at the capture step (decoded for display only, not
            in ``cost``), or None.
        later_predicted: a funnel's later stages: per stage ``[N]`` the predictions of the seeds still alive there
            (NaN for those stopped before).
    """

    prompt: str
    seeds: list[int]
    predicted: torch.Tensor
    kept: list[int]
    kept_rewards: torch.Tensor | None
    chosen: int
    images: torch.Tensor
    cost: PredictionCost
    previews: torch.Tensor | None = None
    later_predicted: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def image(self) -> torch.Tensor:
        """``[3, H, W]`` the returned image."""
        return self.images[self.kept.index(self.chosen)]

    def to_dict(self) -> dict:
        """JSON-ready: seeds, predictions, survivors, their rewards, the choice and the cost."""
        rewards = None if self.kept_rewards is None else [finite_or_none(r) for r in self.kept_rewards]
        report = {
            "prompt": self.prompt,
            "seeds": self.seeds,
            "predicted": [finite_or_none(p) for p in self.predicted],  # null: no prediction (a failed preview)
            "kept_seeds": [self.seeds[i] for i in self.kept],
            "kept_rewards": rewards,
            "chosen_seed": self.seeds[self.chosen],
            "cost": dataclasses.asdict(self.cost),
        }
        if self.later_predicted:  # null: stopped before that stage
            report["later_predicted"] = [[finite_or_none(p) for p in stage.tolist()] for stage in self.later_predicted]
        return report


class ObserverPair:
    """Two step observers on one rollout: both contexts entered, both told after each call (either may be None)."""

    def __init__(self, first: StepObserver | None, second: StepObserver | None) -> None:
        self.observers = [o for o in (first, second) if o is not None]

    def forward_context(self, step: int, rows: torch.Tensor) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        for observer in self.observers:
            stack.enter_context(observer.forward_context(step, rows))
        return stack

    def after_forward(
        self, step: int, rows: torch.Tensor, latents: torch.Tensor, velocity: torch.Tensor, sigma: float
    ) -> None:
        for observer in self.observers:
            observer.after_forward(step, rows, latents, velocity, sigma)


def finite_or_none(value: float) -> float | None:
    """A score for JSON: None where there is none (NaN: not predicted, not scored, or stopped before)."""
    value = float(value)
    return value if math.isfinite(value) else None


def rank_key(value: float) -> float:
    """A score as ranked: one that is not finite (no prediction, a failed reward) below every real one."""
    value = float(value)
    return value if math.isfinite(value) else -math.inf


def keep_best(predicted: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest of ``predicted`` ``[N]``, best first; ties go to the earlier seed, and a
    seed without a prediction (NaN) ranks below every predicted one.

    Raises:
        ValueError: ``keep`` outside [1, N].
    """
    if not 1 <= keep <= len(predicted):
        raise ValueError(f"keep={keep} must lie in [1, N={len(predicted)}]")
    order = sorted(range(len(predicted)), key=lambda i: (-rank_key(predicted[i]), i))
    return order[:keep]


def keep_best_of(predicted: torch.Tensor, alive: list[int], keep: int) -> list[int]:
    """The ``keep`` seeds of ``alive`` (indices into ``predicted`` ``[N]``) predicted best, best first; ties go to
    the earlier seed (a funnel's later stage ranks only the survivors of the stage before)."""
    alive = sorted(alive)
    return [alive[i] for i in keep_best(predicted[alive], keep)]


def choose(kept: list[int], kept_scores: torch.Tensor) -> int:
    """The survivor with the highest score (real reward, or prediction without one); ties: the better predicted.
    A survivor the reward failed on (NaN) is chosen only when every one failed."""
    best = max(range(len(kept)), key=lambda j: (rank_key(kept_scores[j]), -j))
    return kept[best]


def predictor_for(
    name: str,
    sampler: FluxSampler,
    capture_step: int,
    lookahead_steps: int = 2,
    probe_path: str = "",
    preview_steps: int = 1,
    precision: str | None = None,
    text_length: int = 16,
) -> Predictor:
    """A registered predictor (``probe``, ``preview``, ``lookahead``, ...) for inference with ``sampler``.

    ``precision``: what the rollouts run under (``no``, ``bf16``, ``fp16``); None: the sampler's transformer's
    dtype says (a probe trained on fp32 rollouts is refused for a bf16 pipeline).

    ``text_length``: the T5 tokens of the prompt embeddings it will see (a fresh ``probe_path: init`` probe captures
    that many; a probe file carries its own).

    Built through the registry as training builds it, so a probe file is checked against this sampler (a
    probe trained under the trainer's SDE sampler is refused for deterministic inference, naming each
    difference).
    """
    pruning = PruningConfig(
        predictor=name,
        capture_step=capture_step,
        lookahead_steps=lookahead_steps,
        probe_path=probe_path,
        preview_steps=preview_steps,
    )
    config = RunConfig(
        model=ModelConfig(max_sequence_length=text_length),
        pruning=pruning,
        training=TrainingConfig(mixed_precision=precision or precision_of(sampler)),
    )
    return build_predictor(config, sampler)


def precision_of(sampler: FluxSampler) -> str:
    """The mixed-precision name of the sampler's transformer weights: ``bf16``, ``fp16`` or ``no`` (fp32)."""
    dtype = next(sampler.transformer.parameters()).dtype
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def as_list(value: Item | Sequence[Item]) -> list[Item]:
    """One stage's value, or a funnel's values, as a list."""
    return list(value) if isinstance(value, Sequence) else [value]


def keeps_valid(keeps: list[int], n: int) -> bool:
    """A funnel's survivors per stage: strictly decreasing within [1, n]."""
    return sorted(set(keeps), reverse=True) == keeps and 1 <= keeps[-1] <= keeps[0] <= n


def capture_steps_valid(steps: list[int], last: int) -> bool:
    """A funnel's capture steps: strictly increasing within [1, last]."""
    return sorted(set(steps)) == steps and 1 <= steps[0] <= steps[-1] <= last


class SeedSelector:
    """Best-of-N sampling with early stopping by a predictor, once or as a funnel (see the module docstring).

    Args:
        sampler: a deterministic :class:`FluxSampler` (``noise_level`` 0), the pipeline with or without a LoRA.
        predictor: what ranks the seeds at the capture step; ``preview`` and ``lookahead`` score with ``reward``.
            A funnel: one per stage.
        capture_step: k, the denoising steps every seed runs before the prediction (the ``reward`` oracle
            finishes every seed: T whatever is given). A funnel: one per stage, increasing.
        reward: the real reward (the returned image is the survivors' best by it), or None.

    Raises:
        ValueError: a stochastic sampler, capture steps outside [1, T] or not increasing, not one predictor per
            capture step, or a reward-based predictor without a reward.
    """

    def __init__(
        self,
        sampler: FluxSampler,
        predictor: Predictor | Sequence[Predictor],
        capture_step: int | Sequence[int],
        reward: RewardSet | None = None,
    ) -> None:
        if sampler.noise_level != 0:
            raise ValueError(
                f"seed selection samples deterministically (a seed names one image), got noise_level="
                f"{sampler.noise_level}: build the sampler with noise_level 0"
            )
        predictors, steps = as_list(predictor), as_list(capture_step)
        if len(predictors) != len(steps):
            raise ValueError(f"{len(predictors)} predictors for {len(steps)} capture steps: give one per stage")
        steps = [sampler.num_steps if p.finishes_rollouts else k for p, k in zip(predictors, steps)]
        if not capture_steps_valid(steps, sampler.num_steps):
            raise ValueError(f"capture_step={steps} must increase within [1, T={sampler.num_steps}]")
        for p in predictors:
            if p.scores_with_reward and reward is None:
                raise ValueError(
                    f"the {p.name!r} predictor scores decoded previews with the real reward: give a reward "
                    "(--reward), or use --predictor probe, which needs none"
                )
        self.sampler, self.predictors, self.capture_steps, self.reward = sampler, predictors, steps, reward

    @torch.no_grad()
    def select(
        self,
        embeds: PromptEmbeddings,
        seeds: list[int],
        keep: int | Sequence[int],
        metadata: list[dict] | None = None,
        previews: bool = False,
    ) -> list[SeedChoice]:
        """Best-of-``len(seeds)`` for every prompt of ``embeds``, finishing ``keep`` seeds of each.

        Args:
            embeds: the prompts (all of them are sampled together, in batches of the sampler's batch size).
            seeds: the N seeds of every prompt.
            keep: K, survivors finished per prompt. A funnel: the survivors of each stage, decreasing.
            metadata: per prompt, what the reward needs (the shapes world's specs), default ``{}``.
            previews: also decode every seed's x0 at the (first) capture step (``x - sigma v`` of call k) for
                display.

        Raises:
            ValueError: not one ``keep`` per stage, or keeps not decreasing within [1, N].
        """
        prompts, keeps = embeds.prompts, as_list(keep)
        metadata = metadata or [{} for _ in prompts]
        count, n = len(prompts), len(seeds)
        if len(keeps) != len(self.capture_steps):
            raise ValueError(f"keep={keeps}: give one per capture step {self.capture_steps}")
        if not keeps_valid(keeps, n):
            raise ValueError(f"keep={keeps} must decrease within [1, N={n}]")
        device = next(self.sampler.transformer.parameters()).device
        prompt_index = torch.arange(count).repeat_interleave(n)
        row_prompts = [prompts[i] for i in prompt_index.tolist()]
        row_meta = [metadata[i] for i in prompt_index.tolist()]
        rollouts = self.sampler.start(prompt_index, torch.tensor(seeds).repeat(count), device)
        kept = [list(range(n)) for _ in range(count)]  # per prompt, its seeds alive, in the order of ``rollouts``
        recorder = X0Recorder(self.capture_steps[0] - 1) if previews else None
        predicted, costs = [], []
        for stage, (predictor, step, kept_per_prompt) in enumerate(zip(self.predictors, self.capture_steps, keeps)):
            rows = [p * n + i for p in range(count) for i in kept[p]]  # rows of ``rollouts``, prompt p, seed i
            observer = predictor.observer(self.sampler)
            watch = ObserverPair(observer, recorder if stage == 0 else None)
            rollouts = self.sampler.advance(rollouts, embeds, step, watch)

            def score_latents(latents: torch.Tensor, rows: list[int] = rows) -> RewardResult:
                images = self.sampler.decode(latents)
                return self.reward(images, [row_prompts[r] for r in rows], [row_meta[r] for r in rows])

            inputs = PredictionInputs(self.sampler, embeds, rollouts, observer, score_latents)
            prediction = predictor.predict(inputs)
            costs.append(prediction.cost.per_rollout(len(rows)))
            scores = torch.full((count * n,), math.nan)
            scores[rows] = prediction.known_scores().float().cpu()  # NaN: no prediction (a failed preview)
            predicted.append(scores.view(count, n))
            position = {row: j for j, row in enumerate(rows)}
            kept = [keep_best_of(predicted[-1][p], kept[p], kept_per_prompt) for p in range(count)]
            rollouts = rollouts.select(torch.tensor([position[p * n + i] for p in range(count) for i in kept[p]]))
        finished = self.sampler.advance(rollouts, embeds, self.sampler.num_steps)
        images = self.sampler.decode(finished.latents)
        keep = keeps[-1]
        survivors = [p * n + i for p in range(count) for i in kept[p]]
        rewards, reused = None, prediction.result is not None
        if reused:  # the last stage scored the finished seeds with the real reward: not scored again
            rewards = torch.stack([predicted[-1][p, kept[p]] for p in range(count)])
        elif self.reward is not None:
            result = self.reward(images, [row_prompts[r] for r in survivors], [row_meta[r] for r in survivors])
            rewards = known_rewards(result).cpu().view(count, keep)
        scored = rewards is not None and not reused
        per_prompt = selection_cost(self.sampler.num_steps, self.capture_steps, n, keeps, costs, scored)
        shown = None
        if recorder is not None:
            shown = self.sampler.decode(recorder.x0().to(device))
            shown = shown.view(count, n, *shown.shape[1:])
        choices = []
        for p in range(count):
            scores = rewards[p] if rewards is not None else predicted[-1][p, kept[p]]
            choices.append(
                SeedChoice(
                    prompt=prompts[p],
                    seeds=list(seeds),
                    predicted=predicted[0][p],
                    kept=kept[p],
                    kept_rewards=None if rewards is None else rewards[p],
                    chosen=choose(kept[p], scores),
                    images=images.view(count, keep, *images.shape[1:])[p],
                    cost=dataclasses.replace(per_prompt),
                    previews=None if shown is None else shown[p],
                    later_predicted=[stage[p] for stage in predicted[1:]],
                )
            )
        return choices


def best_of_n(
    pipeline: FluxPipeline,
    prompts: list[str],
    n: int,
    keep: int | Sequence[int],
    capture_step: int | Sequence[int],
    predictor: str = "lookahead",
    reward: RewardSet | str | None = None,
    *,
    num_steps: int,
    height: int,
    width: int,
    guidance_scale: float = 3.5,
    max_sequence_length: int = 512,
    metadata: list[dict] | None = None,
    lookahead_steps: int = 2,
    preview_steps: int | Sequence[int] = 1,
    probe_path: str = "",
    batch_size: int = 16,
    previews: bool = False,
) -> list[SeedChoice]:
    """Best-of-``n`` for each prompt in one call: seeds 0..n-1 run to ``capture_step``, the registered
    ``predictor`` (``probe``, ``preview``, ``lookahead``) ranks them, the ``keep`` predicted best are finished
    and the best of those by ``reward`` (a :class:`RewardSet` or a spec such as ``"shapes"``; by the prediction
    without one) is chosen. A funnel: one capture step, keep and preview step count per stage. Sampling is
    deterministic (noise level 0); ``pipeline`` may carry a LoRA. Each :class:`SeedChoice` holds every seed's
    prediction, the survivors' images and rewards, and the compute spent per prompt."""
    sampler = FluxSampler(pipeline, num_steps, 0.0, guidance_scale, height, width, batch_size=batch_size)
    steps = as_list(capture_step)
    preview_counts = as_list(preview_steps)
    preview_counts = preview_counts * len(steps) if len(preview_counts) == 1 else preview_counts
    predictors = [
        predictor_for(predictor, sampler, k, lookahead_steps, probe_path, count, text_length=max_sequence_length)
        for k, count in zip(steps, preview_counts, strict=True)
    ]
    scorer = build_reward_set(reward) if isinstance(reward, str) else reward
    selector = SeedSelector(sampler, predictors, steps, scorer)
    embeds = encode_prompts(pipeline, prompts, max_sequence_length)
    return selector.select(embeds, list(range(n)), keep, metadata, previews=previews)


def selection_cost(
    num_steps: int,
    capture_step: int | Sequence[int],
    n: int,
    keep: int | Sequence[int],
    predictor_cost: PredictionCost | Sequence[PredictionCost],
    scored: bool,
) -> PredictionCost:
    """What best-of-``n`` keeping ``keep`` costs per prompt (the module docstring's formula); a funnel: one capture
    step, keep and predictor cost per stage.

    Args:
        predictor_cost: the predictor's cost per rollout.
        scored: the survivors are scored by the real reward.
    """
    calls = decodes = reward_calls = 0.0
    alive, done = n, 0
    for step, kept, cost in zip(as_list(capture_step), as_list(keep), as_list(predictor_cost), strict=True):
        calls += alive * (step - done + cost.transformer_calls)
        decodes += alive * cost.decodes
        reward_calls += alive * cost.reward_calls
        alive, done = kept, step
    return PredictionCost(calls + alive * (num_steps - done), decodes + alive, reward_calls + (alive if scored else 0))


def full_best_of_n_cost(num_steps: int, n: int) -> PredictionCost:
    """What plain best-of-N costs per prompt: every seed finished, decoded and scored."""
    return PredictionCost(float(n * num_steps), float(n), float(n))


def framed(image: torch.Tensor, colour: tuple[float, float, float] | None, width: int = 2) -> torch.Tensor:
    """``[3, H, W]`` with a ``width``-pixel border of ``colour`` (None: unchanged)."""
    if colour is None:
        return image
    image = image.clone()
    paint = torch.tensor(colour)[:, None, None]
    image[:, :width], image[:, -width:] = paint, paint
    image[:, :, :width], image[:, :, -width:] = paint, paint
    return image


def preview_grid(choices: list[SeedChoice]) -> torch.Tensor:
    """``[P N, 3, H, W]`` every seed's preview, survivors framed green and the chosen one blue, prompt-major."""
    tiles = []
    for choice in choices:
        for i, preview in enumerate(choice.previews):
            colour = (0.1, 0.3, 1.0) if i == choice.chosen else (0.1, 0.8, 0.1) if i in choice.kept else None
            tiles.append(framed(preview, colour))
    return torch.stack(tiles)
