"""Predictor-guided best-of-N sampling for inference (the Diffusion Probe paper's seed selection).

Per prompt: start N seeds with deterministic sampling (noise level 0, as ``FluxPipeline``), run them to the
capture step k, let a predictor (rl/predictors/: ``probe``, ``preview``, ``lookahead``) predict each one's final
reward, keep the K predicted best, finish only those and return the best of them by the real reward when one is
given (by the prediction otherwise). The survivors continue from their own states with their own seeds' noise,
so each finished image is the one sampling that seed alone gives: bit-identical when each transformer call holds
one rollout (``batch_size`` 1; tests/rl/test_seed_selection.py), and within the last bits otherwise, since batched
CPU and GPU kernels may round a rollout differently beside other batch-mates (~1e-5 in pixels on the tiny model).

Compute per prompt (T steps; the predictor adds its own, :class:`rl.predictors.PredictionCost`)::

    transformer calls = N k + predictor calls + K (T - k)       full best-of-N: N T
    decodes           = predictor decodes + K                   full best-of-N: N
    reward calls      = predictor reward calls + K (0 without)  full best-of-N: N

Measured on the shipped model: bench/RESULTS.md, "Seed selection" (``bench/seed_selection.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from rewards.compose import RewardResult, RewardSet
from rl.config import ModelConfig, RunConfig, TrainingConfig
from rl.predictors import PredictionCost, PredictionInputs, Predictor, build_predictor, reward_scores
from rl.predictors.preview import X0Recorder
from rl.pruning_config import PruningConfig
from rl.sampler import FluxSampler, PromptEmbeddings, StepObserver


@dataclasses.dataclass
class SeedChoice:
    """What best-of-N selection did for one prompt.

    Attributes:
        prompt: the prompt text.
        seeds: the N seeds started.
        predicted: ``[N]`` each seed's predicted final reward at the capture step.
        kept: indices into ``seeds`` of the K survivors, best predicted first.
        kept_rewards: ``[K]`` the survivors' real rewards (None without a reward).
        chosen: index into ``seeds`` of the returned image.
        images: ``[K, 3, H, W]`` the survivors' finished images in [0, 1], in ``kept`` order.
        cost: what this prompt cost (transformer calls, decodes, reward calls).
        previews: ``[N, 3, H, W]`` every seed's x0 preview at the capture step (decoded for display only, not
            in ``cost``), or None.
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

    @property
    def image(self) -> torch.Tensor:
        """``[3, H, W]`` the returned image."""
        return self.images[self.kept.index(self.chosen)]

    def to_dict(self) -> dict:
        """JSON-ready: seeds, predictions, survivors, their rewards, the choice and the cost."""
        rewards = None if self.kept_rewards is None else [float(r) for r in self.kept_rewards]
        return {
            "prompt": self.prompt,
            "seeds": self.seeds,
            "predicted": [float(p) for p in self.predicted],
            "kept_seeds": [self.seeds[i] for i in self.kept],
            "kept_rewards": rewards,
            "chosen_seed": self.seeds[self.chosen],
            "cost": dataclasses.asdict(self.cost),
        }


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


def keep_best(predicted: torch.Tensor, keep: int) -> list[int]:
    """Indices of the ``keep`` highest of ``predicted`` ``[N]``, best first; ties go to the earlier seed.

    Raises:
        ValueError: ``keep`` outside [1, N].
    """
    if not 1 <= keep <= len(predicted):
        raise ValueError(f"keep={keep} must lie in [1, N={len(predicted)}]")
    order = sorted(range(len(predicted)), key=lambda i: (-float(predicted[i]), i))
    return order[:keep]


def choose(kept: list[int], kept_scores: torch.Tensor) -> int:
    """The survivor with the highest score (real reward, or prediction without one); ties: the better predicted."""
    best = max(range(len(kept)), key=lambda j: (float(kept_scores[j]), -j))
    return kept[best]


def predictor_for(
    name: str,
    sampler: FluxSampler,
    capture_step: int,
    lookahead_steps: int = 2,
    probe_path: str = "",
    precision: str = "no",
    text_length: int = 16,
) -> Predictor:
    """A registered predictor (``probe``, ``preview``, ``lookahead``, ...) for inference with ``sampler``.

    ``text_length``: the T5 tokens of the prompt embeddings it will see (a fresh ``probe_path: init`` probe captures
    that many; a probe file carries its own).

    Built through the registry as training builds it, so a probe file is checked against this sampler (a
    probe trained under the trainer's SDE sampler is refused for deterministic inference, naming each
    difference).
    """
    pruning = PruningConfig(
        predictor=name, capture_step=capture_step, lookahead_steps=lookahead_steps, probe_path=probe_path
    )
    config = RunConfig(
        model=ModelConfig(max_sequence_length=text_length),
        pruning=pruning,
        training=TrainingConfig(mixed_precision=precision),
    )
    return build_predictor(config, sampler)


class SeedSelector:
    """Best-of-N sampling with early stopping by a predictor (see the module docstring).

    Args:
        sampler: a deterministic :class:`FluxSampler` (``noise_level`` 0), the pipeline with or without a LoRA.
        predictor: what ranks the seeds at the capture step; ``preview`` and ``lookahead`` score with ``reward``.
        capture_step: k, the denoising steps every seed runs before the prediction (the ``reward`` oracle
            finishes every seed: T whatever is given).
        reward: the real reward (the returned image is the survivors' best by it), or None.

    Raises:
        ValueError: a stochastic sampler, a capture step outside [1, T], or a reward-based predictor without
            a reward.
    """

    def __init__(
        self, sampler: FluxSampler, predictor: Predictor, capture_step: int, reward: RewardSet | None = None
    ) -> None:
        if sampler.noise_level != 0:
            raise ValueError(
                f"seed selection samples deterministically (a seed names one image), got noise_level="
                f"{sampler.noise_level}: build the sampler with noise_level 0"
            )
        if predictor.finishes_rollouts:
            capture_step = sampler.num_steps
        if not 1 <= capture_step <= sampler.num_steps:
            raise ValueError(f"capture_step={capture_step} must lie in [1, T={sampler.num_steps}]")
        self.sampler, self.predictor, self.capture_step, self.reward = sampler, predictor, capture_step, reward
        if predictor.scores_with_reward and reward is None:
            raise ValueError(
                f"the {predictor.name!r} predictor scores decoded previews with the real reward: give a reward "
                "(--reward), or use --predictor probe, which needs none"
            )

    @torch.no_grad()
    def select(
        self,
        embeds: PromptEmbeddings,
        seeds: list[int],
        keep: int,
        metadata: list[dict] | None = None,
        previews: bool = False,
    ) -> list[SeedChoice]:
        """Best-of-``len(seeds)`` for every prompt of ``embeds``, finishing ``keep`` seeds of each.

        Args:
            embeds: the prompts (all of them are sampled together, in batches of the sampler's batch size).
            seeds: the N seeds of every prompt.
            keep: K, survivors finished per prompt.
            metadata: per prompt, what the reward needs (the shapes world's specs), default ``{}``.
            previews: also decode every seed's x0 at the capture step (``x - sigma v`` of call k) for display.
        """
        prompts = embeds.prompts
        metadata = metadata or [{} for _ in prompts]
        count, n = len(prompts), len(seeds)
        device = next(self.sampler.transformer.parameters()).device
        prompt_index = torch.arange(count).repeat_interleave(n)
        row_prompts = [prompts[i] for i in prompt_index.tolist()]
        row_meta = [metadata[i] for i in prompt_index.tolist()]
        started = self.sampler.start(prompt_index, torch.tensor(seeds).repeat(count), device)
        observer = self.predictor.observer(self.sampler)
        recorder = X0Recorder(self.capture_step - 1) if previews else None
        early = self.sampler.advance(started, embeds, self.capture_step, ObserverPair(observer, recorder))

        def score_latents(latents: torch.Tensor) -> RewardResult:
            images = self.sampler.decode(latents)
            return self.reward(images, row_prompts, row_meta)

        prediction = self.predictor.predict(PredictionInputs(self.sampler, embeds, early, observer, score_latents))
        predicted = prediction.scores.float().cpu().view(count, n)
        kept = [keep_best(predicted[p], keep) for p in range(count)]
        rows = torch.tensor([p * n + i for p in range(count) for i in kept[p]])
        finished = self.sampler.advance(early.select(rows), embeds, self.sampler.num_steps)
        images = self.sampler.decode(finished.latents)
        rewards = None
        if self.reward is not None:
            survivor_prompts = [row_prompts[r] for r in rows.tolist()]
            survivor_meta = [row_meta[r] for r in rows.tolist()]
            rewards = reward_scores(self.reward(images, survivor_prompts, survivor_meta)).view(count, keep)
        per_rollout = prediction.cost.per_rollout(count * n)
        per_prompt = selection_cost(
            self.sampler.num_steps, self.capture_step, n, keep, per_rollout, rewards is not None
        )
        shown = None
        if recorder is not None:
            shown = self.sampler.decode(recorder.x0().to(device))
            shown = shown.view(count, n, *shown.shape[1:])
        choices = []
        for p in range(count):
            scores = rewards[p] if rewards is not None else predicted[p, kept[p]]
            choices.append(
                SeedChoice(
                    prompt=prompts[p],
                    seeds=list(seeds),
                    predicted=predicted[p],
                    kept=kept[p],
                    kept_rewards=None if rewards is None else rewards[p],
                    chosen=choose(kept[p], scores),
                    images=images.view(count, keep, *images.shape[1:])[p],
                    cost=dataclasses.replace(per_prompt),
                    previews=None if shown is None else shown[p],
                )
            )
        return choices


def selection_cost(
    num_steps: int, capture_step: int, n: int, keep: int, predictor_cost: PredictionCost, scored: bool
) -> PredictionCost:
    """What best-of-``n`` keeping ``keep`` costs per prompt (the module docstring's formula).

    Args:
        predictor_cost: the predictor's cost per rollout.
        scored: the survivors are scored by the real reward.
    """
    return PredictionCost(
        n * capture_step + n * predictor_cost.transformer_calls + keep * (num_steps - capture_step),
        n * predictor_cost.decodes + keep,
        n * predictor_cost.reward_calls + (keep if scored else 0),
    )


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
