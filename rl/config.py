"""Run configuration: flat, documented dataclasses, one per concern, parsed with ``trl.TrlParser``.

A run is ``--config file.yaml`` plus ``--flag value`` overrides (TRL's convention); every option is a flat
key documented once, here, in its field's ``help`` (meaning, valid values, recommended value, anchor).
YAML files group keys under comments that match the sections below. :func:`parse_config` rejects unknown
keys by name (in the YAML and on the command line, with a close-match suggestion) and values of the wrong
type, then runs the cross-field checks of :meth:`RunConfig.validate`, which say what to set instead.
Nothing here loads a model, a reward or a prompt file.

To add a section (as the pruning issue added ``PruningConfig``): write a dataclass deriving
from :class:`Section` with new, unique keys and add it as a field of :class:`RunConfig`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import types
import typing
from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar

import yaml

from rewards.compose import FAILURE_POLICIES, parse_reward_spec
from rewards.shapes import parse_category_weights
from rl.objectives import OBJECTIVES
from rl.predictors import PREDICTORS
from rl.pruning import ADVANTAGE_MODES, POLICIES, PREDICTION_POLICIES, funnel_group_sizes, keep_count, parse_funnel
from rl.schedule import LR_SCHEDULES
from rl.sde import AWM_KL_FORMS

logger = logging.getLogger(__name__)

# diffusers' FLUX LoRA targets (examples/dreambooth/train_dreambooth_lora_flux.py): joint-attention q/k/v/out,
# the text-stream add-projections and both feed-forwards; single-stream blocks match ``attn.to_q/k/v``.
FLUX_LORA_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
TRAIN_STEP_MODES = ("all_but_last", "window", "random")
LORA_INITS = ("true", "false", "gaussian")
PRECISIONS = ("no", "bf16")
ADV_STDS = ("group", "batch")
WANDB_MODES = ("offline", "online", "disabled")


def option(default: Any, help: str) -> Any:
    """A dataclass field with its documentation (``help``) in the metadata, as TRL and HfArgumentParser read it."""
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` has the (simple) annotated type: str, int, float, bool, list[...], dict, unions."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if annotation is Any:
        return True
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


class Section:
    """Base of every config section: type checks of YAML values (argparse converts only strings).

    ``choices`` maps a string key to its valid values (a tuple, or a registry whose keys are the names, read
    when a config is made so late registrations count); they are checked here and listed by ``--help``.
    """

    choices: ClassVar[dict[str, Collection[str]]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            name, annotation, value = field.name, hints[field.name], getattr(self, field.name)
            if annotation is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))
            elif not _matches(value, annotation):
                raise ValueError(f"{name}: expected {annotation}, got {value!r} ({type(value).__name__})")
        for name in self.choices:
            _one_of(name, getattr(self, name), self.valid_values(name))
        self.check()

    @classmethod
    def valid_values(cls, name: str) -> tuple[str, ...]:
        """The valid values of key ``name`` (a registry's names sorted), or () when any value of its type is."""
        allowed = cls.choices.get(name, ())
        return tuple(sorted(allowed)) if isinstance(allowed, dict) else tuple(allowed)

    def check(self) -> None:
        """Single-section value checks; raise ValueError naming the key."""


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _positive(section: Section, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(section, name)}")


@dataclasses.dataclass
class ModelConfig(Section):
    """The base model and its LoRA."""

    choices = {"init_lora_weights": LORA_INITS}

    pretrained: str = option(
        "assets/tiny-flux-shapes",
        "Base model: a diffusers FluxPipeline folder or hub id (black-forest-labs/FLUX.1-dev). The shipped tiny "
        "model is the default; FLUX.1-dev needs a GPU with >= 40 GB in bf16.",
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of `pretrained`; None: the default.")
    max_sequence_length: int = option(
        512,
        "T5 tokens per prompt. FLUX.1-dev: 512 (256 is enough for short prompts and faster); the tiny model: 16.",
    )
    lora_rank: int = option(64, "LoRA rank r. FLUX.1-dev: 64 (Flow-GRPO); the tiny model: 8-32.")
    lora_alpha: float = option(
        128.0, "LoRA alpha; the update is scaled by alpha / r. FLUX.1-dev: 128 (Flow-GRPO); usually 2 r."
    )
    lora_target_modules: list[str] = option(
        FLUX_LORA_TARGETS,
        "Module-name suffixes that get a LoRA: attention q/k/v/out, the text-stream add-projections and the "
        "feed-forwards (diffusers' FLUX LoRA default, which single-stream blocks match through attn.to_q/k/v).",
    )
    init_lora_weights: str = option(
        "true",
        "peft's init_lora_weights: 'true' (A Kaiming-uniform, B zero: training starts at the base model; "
        "recommended), 'gaussian' (A Gaussian, B zero), 'false' (A and B random: the LoRA changes the model "
        "from the start; for tests only).",
    )

    def check(self) -> None:
        _positive(self, "max_sequence_length", "lora_rank", "lora_alpha")
        if not self.lora_target_modules:
            raise ValueError("lora_target_modules is empty: name at least one module suffix (e.g. attn.to_q)")


@dataclasses.dataclass
class SamplingConfig(Section):
    """Training prompts and rollouts (the SDE sampler of rl/sampler.py)."""

    choices = {"train_steps": TRAIN_STEP_MODES}

    prompts: str = option(
        "shapes:train",
        "Training prompt source: 'shapes:train' (the shapes world's training split, category-balanced, with "
        "checker metadata), a .txt file (one prompt per line) or a .jsonl file (GenEval-style lines with a "
        "'prompt' key; the whole line is the reward's metadata).",
    )
    prompt_category_weights: str = option(
        "",
        "shapes:* prompt sources only: relative draw weight per category, e.g. 'position=2.5 color_attr=2.5' "
        "(categories not named keep 1; empty: category-balanced).",
    )
    prompts_per_step: int = option(
        16,
        "Prompts per GRPO step over ALL processes, each trained once: every process owns whole groups (where the "
        "count does not divide, the first processes own one more), so any process count up to prompts_per_step "
        "runs any config. Flow-GRPO FLUX: 48; the tiny model: 8-16.",
    )
    group_size: int = option(
        8,
        "Rollouts per prompt (G); advantages are relative within a group. Flow-GRPO FLUX: 24; the tiny model: "
        "8. Must be >= 2.",
    )
    num_steps: int = option(
        10, "Denoising steps T of training rollouts. Flow-GRPO: 6 for FLUX, 10 for SD3.5; the tiny model: 10."
    )
    noise_level: float = option(
        0.9,
        "SDE noise level a (sigma_t = a sqrt(s / (1 - s)), docs/design.md section 3). Flow-GRPO: 0.9 for FLUX "
        "(0.7 in its base config); 0.7-1.0 works; 0 has no density (cannot train).",
    )
    guidance_scale: float = option(
        3.5, "FLUX's distilled guidance value (guidance embedding). FLUX.1-dev: 3.5; ignored by models without it."
    )
    height: int = option(
        512,
        "Image height in pixels, a multiple of twice the VAE's downscale factor (16 for FLUX.1-dev). Keep it within "
        "2x of the model's native size (its VAE's sample_size: 1024 for FLUX.1-dev, 64 for the tiny model); farther "
        "off, the launcher warns naming both sizes (rl/sampler.py native_size_warning). Flow-GRPO on FLUX.1-dev: 512; "
        "the tiny model: 64.",
    )
    width: int = option(
        512, "Image width in pixels; as height (a multiple of twice the VAE's downscale factor, within 2x of native)."
    )
    sample_batch_size: int = option(
        16, "Rollouts per transformer call while sampling (a memory knob; results do not depend on it)."
    )
    same_initial_noise: bool = option(
        False, "Share the initial noise within a group (the SDE noise still differs); Flow-GRPO's 'same_latent'."
    )
    train_steps: str = option(
        "all_but_last",
        "Which denoising steps are trained: 'all_but_last' (Flow-GRPO), 'window' (steps [train_window_start, "
        "train_window_start + train_window_size), as in Flow-GRPO-Fast / MixGRPO) or 'random' (a fresh random "
        "train_fraction of the steps per rollout, as in DanceGRPO). The last step is never trained: its "
        "log-prob is ill-conditioned.",
    )
    train_window_start: int = option(0, "First trained step of the 'window' mode (0 = the noisiest step).")
    train_window_size: int = option(2, "Number of trained steps of the 'window' mode. Flow-GRPO-Fast: 2-3.")
    train_fraction: float = option(
        0.6, "Fraction of the T - 1 trainable steps drawn per rollout in 'random' mode, rounded down (DanceGRPO: 0.6)."
    )
    sde_window_only: bool = option(
        False,
        "With train_steps='window': add SDE noise on the window's steps only and take every other step with the "
        "deterministic ODE (Flow-GRPO-Fast, MixGRPO), so the rollouts are the evaluation's sampler except where "
        "they are trained, and all of a rollout's randomness is credited to the trained steps.",
    )
    train_first_step: bool = option(
        True,
        "Train the first denoising step (sigma = 1: pure noise in, so its prediction sees no image). false leaves "
        "it out of whichever train_steps mode (the SDE noise of sde_window_only stays where it is). AWM's reference "
        "code: false in its GenEval and OCR configs (time_type 'discrete_wo_init' draws from step 1 on: "
        "train_sd3_awm.py lines 1197-1205; config/dgx_awm.py lines 88, 228), true in its PickScore one ('discrete', "
        "lines 1172-1180).",
    )

    @property
    def train_window(self) -> range:
        """The steps of the ``window`` mode (and of ``sde_window_only``'s SDE noise)."""
        return range(self.train_window_start, self.train_window_start + self.train_window_size)

    def check(self) -> None:
        _positive(self, "prompts_per_step", "group_size", "num_steps", "height", "width", "sample_batch_size")
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must lie in (0, 1], got {self.train_fraction}")
        if self.prompt_category_weights:
            if not self.prompts.startswith("shapes:"):
                raise ValueError(f"prompt_category_weights needs a shapes:* prompt source, not {self.prompts!r}")
            try:
                parse_category_weights(self.prompt_category_weights)
            except ValueError as error:
                raise ValueError(f"prompt_category_weights: {error}") from None


@dataclasses.dataclass
class RewardConfig(Section):
    """The reward (rewards/): a weighted sum of named components."""

    choices = {"reward_failure_policy": FAILURE_POLICIES}

    reward: str = option(
        "shapes",
        "Comma-separated reward components: built-in names (shapes, pickscore, ...; see rewards/) or "
        "'package.module:Callable' dotted paths to your own, each optionally labelled 'name=spec'. Each "
        "component's scores are logged as reward/<name>/<key>.",
    )
    reward_weights: list[float] | None = option(
        None, "One weight per component of `reward`, in order; None: weight 1 each. The total is the weighted sum."
    )
    reward_kwargs: dict | str | None = option(
        None,
        "Constructor kwargs per component, keyed by its name (the spec string unless labelled): a mapping in YAML or a JSON string on the "
        'command line, e.g. \'{"remote": {"url": "http://host:8000/score"}}\'.',
    )
    reward_failure_policy: str = option(
        "raise",
        "What a raised exception or a NaN/inf score does: 'raise' (stop the run; recommended) or 'drop_group' "
        "(drop the affected prompt groups from the step and count them in reward/dropped).",
    )
    reward_workers: int = option(
        1,
        "Threads of the reward pool: how many chunks of a step (see reward_overlap) are scored at once, e.g. "
        "remote requests in flight together (remote rewards: 4-8). A component without a true thread_safe "
        "attribute is still called by one thread at a time.",
    )
    reward_overlap: bool = option(
        True,
        "Score while sampling: the step's rollouts are denoised in chunks of whole prompt groups (each ending "
        "where the rollouts so far fill whole sample_batch_size batches), and each finished chunk is decoded on "
        "a worker thread and scored in the reward pool while the transformer denoises the next one, so a slow "
        "reward (a VLM judge, a detector on another node) hides behind sampling instead of adding its time to "
        "every step. false: each chunk is decoded and scored before the next is denoised. The same calls run "
        "either way, so results are bit-identical (tests/rl/test_reward_overlap.py). Overlap needs two or more "
        "chunks per process; the decode of one chunk shares the device with the next one's denoising. "
        "Recommended: true. Measured in bench/RESULTS.md, 'Reward overlap'.",
    )

    def check(self) -> None:
        _positive(self, "reward_workers")
        if isinstance(self.reward_kwargs, str):
            try:
                self.reward_kwargs = json.loads(self.reward_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(f"reward_kwargs is not valid JSON ({error}): {self.reward_kwargs!r}") from error
        if self.reward_kwargs is not None and not (
            isinstance(self.reward_kwargs, dict) and all(isinstance(v, dict) for v in self.reward_kwargs.values())
        ):
            raise ValueError(f"reward_kwargs must map each reward spec to a dict of kwargs, got {self.reward_kwargs!r}")
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]

    @property
    def reward_components(self) -> list[str]:
        """Component names (a spec's ``name=`` label, else the spec itself); they key ``reward_kwargs``."""
        return [name for name, _ in parse_reward_spec(self.reward)]


@dataclasses.dataclass
class TrainingConfig(Section):
    """Optimisation: GRPO loss, advantages, AdamW, precision and the step budget."""

    choices = {
        "lr_schedule": LR_SCHEDULES,
        "policy_objective": OBJECTIVES,
        "adv_std": ADV_STDS,
        "mixed_precision": PRECISIONS,
        "awm_kl_form": AWM_KL_FORMS,
    }

    max_steps: int = option(100, "GRPO steps (each: sample, score, optimise). The tiny model improves in ~30-60.")
    max_minutes: float = option(
        0.0, "Wall-clock budget in minutes; training stops (and still evaluates and saves) once exceeded. 0: none."
    )
    learning_rate: float = option(
        1e-4, "AdamW learning rate of the LoRA. Flow-GRPO: 3e-4 (FLUX and SD3.5); the tiny model: 1e-4..1e-3."
    )
    lr_schedule: str = option(
        "constant",
        "Learning rate over the GRPO steps: 'constant', 'linear' or 'cosine' decay to 0 at max_steps (rl/schedule.py;"
        " a run stopped early by max_minutes never reaches the low end).",
    )
    lr_warmup_steps: int = option(0, "GRPO steps of linear learning-rate warm-up before the schedule.")
    adam_beta1: float = option(0.9, "AdamW beta1 (first-moment decay) in [0, 1). Flow-GRPO: 0.9.")
    adam_beta2: float = option(0.999, "AdamW beta2 (second-moment decay) in [0, 1). Flow-GRPO: 0.999.")
    adam_weight_decay: float = option(1e-4, "AdamW weight decay (Flow-GRPO: 1e-4).")
    adam_epsilon: float = option(1e-8, "AdamW epsilon (denominator guard). Flow-GRPO: 1e-8.")
    max_grad_norm: float = option(1.0, "Gradient-norm clipping threshold per optimizer step (Flow-GRPO: 1.0).")
    train_batch_size: int = option(
        8,
        "Most rollouts per forward/backward micro-batch (per process); each micro-batch runs once per trained "
        "step. A memory knob together with gradient_accumulation_steps.",
    )
    gradient_accumulation_steps: int = option(
        1,
        "Micro-batches accumulated into one optimizer step (each over all its trained steps). Per GRPO step and "
        "inner epoch there are ceil(rollouts / (train_batch_size x this)) optimizer steps.",
    )
    policy_objective: str = option(
        "flow_grpo",
        "What the advantages weight. 'flow_grpo': the PPO-clipped ratio of the recorded SDE transitions' exact "
        "log-probs (Flow-GRPO, docs/design.md section 3). 'awm': advantage-weighted matching (Xue et al., 2025): the "
        "flow-matching error of each finished rollout's clean latents, noised afresh to each trained step's sigma, "
        "weighted by -advantage (rl/sde.py); no ratio or clip, any sampler (noise_level 0 allowed). On the tiny "
        "model AWM gains more per step (docs/experiments.md, 'Flow-GRPO training').",
    )
    awm_error_power: float = option(
        0.25,
        "policy_objective 'awm': the log-likelihood is -error^p / p. 1 is the plain flow-matching error, whose "
        "advantage-weighted objective is unbounded and drifted (error 0.65 -> 3.7, held-out score back to the base "
        "in 160 tiny-model steps); p < 0.5 bounds it (rl/sde.py). AWM's code: 0.25.",
    )
    awm_sigma_weight: bool = option(
        False,
        "policy_objective 'awm': multiply each trained step's log-likelihood by its sigma in (0, 1], so low-noise "
        "steps weigh less. AWM's reference code: true (its 'ghuber' weighting, train_sd3_awm.py line 249, in every "
        "config).",
    )
    awm_kl_form: str = option(
        "gaussian",
        "policy_objective 'awm': per-element form of the KL terms (kl_beta, awm_ema_kl_beta) between two velocity "
        "predictions. 'gaussian': the KL of unit-variance Gaussians around them, (v - v')^2 / 2; 'squared': "
        "(v - v')^2, twice that. AWM's reference code: 'squared' (kl_weight and kl_ema_weight 'Uniform', "
        "train_sd3_awm.py lines 1337, 1346), so its beta 0.001 (GenEval) equals kl_beta 0.002 under 'gaussian'.",
    )
    awm_ema_kl_beta: float = option(
        0.0,
        "policy_objective 'awm': weight of a second KL, to an EMA of the policy's own LoRA (a trust region that "
        "follows the policy); 0 skips its extra forward. AWM's reference code: 1 (ema_beta, train_sd3_awm.py lines "
        "1276-1280, 1341-1350; computed there only when its KL to the reference is on, line 1330).",
    )
    awm_ema_kl_decay: float = option(
        0.3,
        "policy_objective 'awm' with awm_ema_kl_beta > 0: after each GRPO step the EMA becomes decay x EMA + "
        "(1 - decay) x LoRA with decay = min(awm_ema_kl_decay, 0.001 x steps done), so it stays near the last "
        "step's policy; in [0, 1). AWM's reference code: 0.3, ramped 0.001 per optimizer step, one per epoch in "
        "its configs (kl_ema_decay_type 'linear', train_sd3_awm.py lines 1409-1419).",
    )
    num_inner_epochs: int = option(1, "Passes over one GRPO step's samples (PPO epochs). Flow-GRPO: 1.")
    clip_range: float = option(
        1e-4,
        "PPO clip epsilon on the ratio. Log-probs are per-element MEANS, so ratios barely move: Flow-GRPO uses "
        "1e-4, not PPO's 0.2.",
    )
    kl_beta: float = option(
        0.0,
        "Weight of the KL to the reference (the same transformer with the LoRA disabled). 0 skips the extra "
        "reference forward. Flow-GRPO: 0 for FLUX, 0.01-0.04 for SD3.5 (against reward hacking).",
    )
    adv_std: str = option(
        "group",
        "Advantage normaliser: 'group' (each prompt group's std; GRPO) or 'batch' (the std of all rewards "
        "of the step over every process; Flow-GRPO's global_std, its default; robust to near-equal groups).",
    )
    adv_clip_max: float = option(5.0, "Advantages are clipped to [-adv_clip_max, adv_clip_max] (Flow-GRPO: 5).")
    adv_scale_max: float = option(
        0.0,
        "When > 0, the clipped advantages are multiplied by adv_scale_max / adv_clip_max, into [-adv_scale_max, "
        "adv_scale_max] with signs and order kept; 0: unscaled. Under AdamW a constant factor mostly reweighs the KL "
        "terms against the policy term (rl/advantages.py). AWM's reference code: 1 (advantage_max after clipping to "
        "5, train_sd3_awm.py lines 1293-1299).",
    )
    ema_decay: float = option(
        0.9,
        "EMA of the LoRA weights per optimizer step (with the usual (1 + n) / (10 + n) warm-up); evaluation and "
        "the saved LoRA use it. 0 disables the EMA. Flow-GRPO: 0.9.",
    )
    mixed_precision: str = option(
        "no",
        "'no' (fp32) or 'bf16' (frozen weights in bf16, LoRA in fp32, autocast; recommended on GPUs and on "
        "CPUs with AVX512-BF16, where the tiny model's GRPO step is 1.3x faster). Latents and log-prob math are always "
        "fp32.",
    )
    distributed_timeout_s: float = option(
        1800.0,
        "Seconds a collective (gradient all-reduce, metric reduction, barrier) waits for the other processes before "
        "the run stops with an error naming this key: a node that died or hangs ends the others within this time "
        "instead of never. Must exceed the longest stretch one process works while the others wait (the main "
        "process's checkpoint write, an uneven evaluation). torch's default: 1800.",
    )
    seed: int = option(0, "Seed of prompt order, rollout noise and LoRA initialisation.")

    def check(self) -> None:
        _positive(self, "max_steps", "learning_rate", "max_grad_norm", "train_batch_size", "awm_error_power")
        _positive(self, "distributed_timeout_s")
        _positive(self, "gradient_accumulation_steps", "num_inner_epochs", "clip_range", "adv_clip_max")
        if min(self.kl_beta, self.max_minutes, self.lr_warmup_steps, self.awm_ema_kl_beta, self.adv_scale_max) < 0:
            raise ValueError("kl_beta, max_minutes, lr_warmup_steps, awm_ema_kl_beta and adv_scale_max must be >= 0")
        if not 0 <= self.awm_ema_kl_decay < 1:
            raise ValueError(f"awm_ema_kl_decay must lie in [0, 1), got {self.awm_ema_kl_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")


@dataclasses.dataclass
class EvalConfig(Section):
    """Held-out evaluation: deterministic sampling (noise level 0), fixed seeds, EMA weights."""

    eval_prompts: str = option(
        "shapes:test",
        "Held-out prompt source (same formats as `prompts`): 'shapes:test' for the shapes world; must differ "
        "from the training prompts for an honest score.",
    )
    eval_num_steps: int = option(
        0, "Denoising steps of evaluation samples; 0: num_steps. Flow-GRPO evaluates FLUX with 28 (trains with 6)."
    )
    eval_every: int = option(10, "Evaluate every N GRPO steps (0: only before and after training).")
    eval_num_prompts: int = option(
        64, "Prompts per periodic evaluation: an evenly spaced fixed subset of the source; 0: all of them."
    )
    eval_images_per_prompt: int = option(
        2, "Seeds per prompt; image j of prompt p uses seed 1000 p + j (as launch/eval_shapes.py)."
    )
    eval_before_training: bool = option(
        True,
        "Evaluate the base model (LoRA disabled) at step 0 on the final evaluation's prompts and seeds, logged as "
        "base_eval/*; summary.json then holds base vs final. Recommended (the run's before/after).",
    )
    final_eval_num_prompts: int = option(
        0, "Prompts of the base (step 0) and final evaluations; 0: all of them (shapes:test: 256)."
    )
    final_eval_images_per_prompt: int = option(
        0,
        "Seeds per prompt of the base and final evaluations; 0: eval_images_per_prompt. More seeds than the "
        "periodic evaluation make the run's before/after less noisy (8 reproduces launch/eval_shapes.py).",
    )

    @property
    def final_images_per_prompt(self) -> int:
        """Seeds per prompt of the base and final evaluations (``final_eval_images_per_prompt``, resolved)."""
        return self.final_eval_images_per_prompt or self.eval_images_per_prompt

    def check(self) -> None:
        _positive(self, "eval_images_per_prompt")
        counts = ("eval_every", "eval_num_steps", "eval_num_prompts", "final_eval_num_prompts",
                  "final_eval_images_per_prompt")  # fmt: skip
        if min(getattr(self, name) for name in counts) < 0:
            raise ValueError(f"{', '.join(counts)} must be >= 0")


@dataclasses.dataclass
class LoggingConfig(Section):
    """Where the run writes, and how it reports."""

    choices = {"wandb_mode": WANDB_MODES}

    output_dir: str = option(
        "runs/grpo",
        "Run folder: metrics.jsonl (every logged metric), config.yaml (the resolved config), summary.json (base "
        "vs final held-out scores), lora/ (the diffusers-format LoRA).",
    )
    overwrite_output_dir: bool = option(
        False,
        "Clear an output_dir that holds another run before starting. Without it a fresh run (no resume_from) "
        "refuses such a folder rather than mix its log and checkpoints with the old run's.",
    )
    log_every: int = option(1, "Write metrics every N GRPO steps.")
    wandb_mode: str = option(
        "offline",
        "'offline' (local files, `wandb sync` later; the default, needs no network), 'online' (needs "
        "WANDB_API_KEY; falls back to offline without one) or 'disabled'. Logging never stops a run.",
    )
    wandb_project: str = option("flux-probe-grpo", "wandb project name.")
    run_name: str | None = option(None, "Run name for wandb; None: the output folder's name.")
    progress_bar: bool = option(True, "Show tqdm progress bars (main process only).")

    def check(self) -> None:
        _positive(self, "log_every")


@dataclasses.dataclass
class CheckpointConfig(Section):
    """Checkpoints (rl/checkpoint.py), resume and the diffusers-format LoRA export."""

    save_lora: bool = option(True, "Save the LoRA in diffusers format to <output_dir>/lora at the end.")
    save_every: int = option(
        0,
        "Write a full checkpoint to <output_dir>/checkpoints/step-<n> every N GRPO steps (0: never): LoRA, "
        "optimizer, EMA, probe and its online buffer, RNG states, step (= data position), plus the LoRA in "
        "diffusers format in its lora/ folder. Written atomically. FLUX.1-dev: 10-30; preemptible jobs: often.",
    )
    save_every_minutes: float = option(
        10.0,
        "Also write a checkpoint when this many minutes of training passed since the last one (0: by steps only). "
        "The default keeps a killed run's loss under 10 minutes for well under 2% of a run's time; SIGTERM and "
        "SIGINT (preemption, Ctrl-C) and a run-stopping reward failure always write one before exiting.",
    )
    save_total_limit: int = option(
        0, "Keep only the newest N checkpoints (0: keep all). A checkpoint of FLUX.1-dev with r=64 is ~1-2 GB."
    )
    resume_from: str | None = option(
        None,
        "Resume a run: 'latest' (the newest complete checkpoint in <output_dir>/checkpoints; starts fresh when "
        "there is none, so one command both starts and resumes a preemptible job) or a checkpoint folder path. "
        "The resumed run continues exactly (same prompts, noise, weights and logged rewards) as if never stopped.",
    )
    allow_config_change: bool = option(
        False,
        "Resume although keys that change what the run is (model, data, reward, sampler, objective, optimiser, "
        "LoRA, pruning) differ from the checkpointed run's; without it such a resume is refused, listing them.",
    )
    save_ema: bool = option(
        True, "Export the EMA weights (when ema_decay > 0) rather than the last ones (Flow-GRPO evaluates EMA)."
    )

    def check(self) -> None:
        if self.save_every < 0 or self.save_total_limit < 0:
            raise ValueError(
                f"save_every and save_total_limit must be >= 0, got {self.save_every}, {self.save_total_limit}"
            )


@dataclasses.dataclass
class PruningConfig(Section):
    """Pruning (docs/design.md section 5; rl/pruning.py, rl/pruned_rollout.py) and the online probe refresh."""

    choices = {"prune_policy": POLICIES, "predictor": PREDICTORS, "prune_advantage": ADVANTAGE_MODES}

    prune_policy: str = option(
        "none",
        "Which rollouts continue past capture_step: 'none' (all: the unpruned trainer), 'topk' (the best "
        "predicted prune_keep_fraction of each group), 'variance' (the subset of maximal predicted variance, "
        "exactly: PODS' rule; GRPO learns from contrast), 'maxvar' (alternately the best and worst predicted), "
        "'random' (the ablation control: same cost, no predictor) or 'threshold' (predicted reward >= "
        "prune_threshold, at least 2 per group).",
    )
    predictor: str = option(
        "probe",
        "What the policy selects by (rl/predictors/): 'probe' (the CNN on attention, probe_path; no reward "
        "call), 'preview' (Pro-GRPO: the capture_step-th call's x0 decoded and scored by the reward), "
        "'lookahead' (lookahead_steps Euler steps from the state after capture_step, decoded and scored) or "
        "'reward' (every rollout finished and scored: the oracle; with prune_policy variance, PODS).",
    )
    lookahead_steps: int = option(2, "Euler steps of the 'lookahead' predictor from capture_step to sigma 0.")
    prune_expand: int = option(
        1,
        "m: start m x group_size rollouts per prompt and prune them to round(prune_keep_fraction m G) "
        "(expand-and-prune, Pro-GRPO; m = 2 with prune_keep_fraction 0.5 trains group_size per prompt). 1: "
        "prune the group itself.",
    )
    prune_funnel: str = option(
        "",
        "Prune at several steps: 'k1:r1,k2:r2,...' (increasing steps; r of the rollouts still running survive each "
        "stage; replaces capture_step and prune_keep_fraction). Pro-GRPO's 48 -> 24 -> 12: group_size 12, "
        "prune_expand 4, '2:0.5,4:0.5'. Predictors preview and lookahead; survivors advantages. '': one stage.",
    )
    prune_keep_fraction: float = option(
        0.5,
        "r: survivors per started group = round(r m G), at least 2. Denoising costs k/T + r (1 - k/T) of an "
        "unpruned step of the started group; the reward model runs on r of the finished images.",
    )
    capture_step: int = option(
        2,
        "k (1-based): rollouts stop after k denoising steps for the prediction ('probe': the call whose "
        "attention it reads, must equal the probe's; 'preview': the call whose x0 it decodes; 'lookahead': "
        "the state it starts from). Unused by 'reward'.",
    )
    probe_path: str = option(
        "",
        "Probe file (launch/probe_train.py; assets/probe/ for the shipped model), checked against the model, "
        "capture_step and num_steps; 'init' starts from a randomly initialised probe (learnt online only; "
        "benchmarks). Needed by every policy but 'none' and 'random'.",
    )
    prune_explore: int = option(
        1,
        "Rollouts per group kept at random regardless of the probe (they take survivor slots, the count is "
        "unchanged), so the online refresh sees data the probe did not choose. 0: none.",
    )
    prune_threshold: float = option(0.5, "Cut of the 'threshold' policy, in reward units.")
    prune_min_spread: float = option(
        0.0,
        "Skip whole groups whose predicted rewards have a population std below this (their advantages would "
        "be ~0). 0: never skip. In reward units; try ~0.1 of the reward's typical within-group std.",
    )
    prune_advantage: str = option(
        "survivors",
        "'survivors' (group statistics over the survivors) or 'imputed' (pruned rollouts' calibrated "
        "predictions take part in each group's mean and std).",
    )
    prune_train_early: bool = option(
        False,
        "Also train on pruned rollouts' recorded steps before capture_step (their trained steps < k), with their "
        "imputed advantages; their later steps get zero weight. Needs a pruning policy and prune_advantage: "
        "imputed. Costs training compute: pruned rollouts join the micro-batches. Off by default (ablated).",
    )
    probe_refresh_every: int = option(
        0,
        "Fine-tune the probe every N GRPO steps on the buffer of (features, real reward) of survivors; the "
        "online PCC / within-group SRCC on the newest batch are logged before it sees that batch. 0: never.",
    )
    probe_refresh_steps: int = option(20, "Optimizer steps of each online refresh.")
    probe_refresh_lr: float = option(3e-4, "AdamW learning rate of the online refresh (constant).")
    probe_rank_weight: float = option(
        1.0, "Weight of the within-group ranking term in the online refresh loss (0: MSE only)."
    )
    probe_buffer_size: int = option(
        2048, "Most rollouts in the online refresh buffer (the oldest leave first); saved in checkpoints."
    )
    max_images_denoised: float = option(
        0.0,
        "Budget in denoised images (a rollout stopped at step k counts k/T); training stops once exceeded. "
        "Compares pruned and unpruned runs at equal compute (launch/ablate.py). 0: none.",
    )

    def check(self) -> None:
        _positive(self, "lookahead_steps", "prune_expand")
        _positive(self, "capture_step", "probe_refresh_steps", "probe_refresh_lr", "probe_buffer_size")
        if not 0 < self.prune_keep_fraction <= 1:
            raise ValueError(f"prune_keep_fraction must lie in (0, 1], got {self.prune_keep_fraction}")
        if min(self.prune_explore, self.probe_refresh_every, self.prune_min_spread, self.max_images_denoised) < 0:
            raise ValueError(
                "prune_explore, probe_refresh_every, prune_min_spread and max_images_denoised must be >= 0"
            )


@dataclasses.dataclass
class RunConfig:
    """All sections of a run; each key lives in exactly one section."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    pruning: PruningConfig = dataclasses.field(default_factory=PruningConfig)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def started_group_size(self) -> int:
        """Rollouts started per prompt: ``group_size``, times ``prune_expand`` under a pruning policy."""
        expand = self.pruning.prune_expand if self.pruning.prune_policy != "none" else 1
        return self.sampling.group_size * expand

    @property
    def pruning_stages(self) -> list[tuple[int, float]]:
        """``[(k, r), ...]``: the funnel's stages, or the one stage ``(capture_step, prune_keep_fraction)``."""
        p = self.pruning
        if p.prune_funnel:
            return parse_funnel(p.prune_funnel, self.sampling.num_steps)
        return [(p.capture_step, p.prune_keep_fraction)]

    @classmethod
    def sections(cls) -> dict[str, type[Section]]:
        """Section name -> dataclass, in order."""
        return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}

    def validate(self) -> None:
        """Cross-field checks. Raises ValueError stating the constraint, why, and what to set instead."""
        s, r = self.sampling, self.reward
        self.validate_pruning()
        objective = OBJECTIVES[self.training.policy_objective]
        if s.noise_level == 0 and objective.needs.sde_noise:
            raise ValueError(
                f"noise_level=0 samples deterministically, but policy_objective={self.training.policy_objective!r} "
                "needs SDE noise on the trained steps (transitions have no density, so there is no ratio). Set "
                "noise_level > 0 (0.7-1.0; FLUX default 0.9), or policy_objective: awm, which trains on any sampler."
            )
        if s.group_size < 2:
            raise ValueError(
                f"group_size={s.group_size}: GRPO's advantage compares rollouts of one prompt, so a group of one "
                "has advantage 0 and teaches nothing. Set group_size >= 2 (8-24)."
            )
        if s.num_steps < 2:
            raise ValueError(f"num_steps={s.num_steps}: the last step is never trained, so set num_steps >= 2.")
        if s.train_steps == "window" and (
            s.train_window_size < 1 or s.train_window_start < 0 or s.train_window.stop > s.num_steps - 1
        ):
            raise ValueError(
                f"train window [{s.train_window.start}, {s.train_window.stop}) must lie in "
                f"[0, num_steps - 1 = {s.num_steps - 1}): the last step is never trained (its log-prob is "
                "ill-conditioned). Set train_window_start + train_window_size <= num_steps - 1."
            )
        if not s.train_first_step and (s.num_steps < 3 or (s.train_steps == "window" and list(s.train_window) == [0])):
            raise ValueError(
                f"train_first_step=false leaves no step to train (num_steps={s.num_steps}, train_steps="
                f"{s.train_steps!r}, window {list(s.train_window)}): step 0 is left out and the last step is never "
                "trained. Widen the window past step 0, set num_steps >= 3, or train_first_step=true."
            )
        t = self.training
        changed = [
            f.name for f in dataclasses.fields(t) if f.name.startswith("awm_") and getattr(t, f.name) != f.default
        ]
        if changed and t.policy_objective != "awm":
            raise ValueError(
                f"{', '.join(changed)} only act under policy_objective 'awm', not {t.policy_objective!r}: set "
                "policy_objective: awm or leave them at their defaults."
            )
        if s.sde_window_only and s.train_steps != "window":
            raise ValueError(
                f"sde_window_only=true needs train_steps='window' (got {s.train_steps!r}): the SDE steps must be the "
                "trained ones, known before sampling. Set train_steps=window (and train_window_start / "
                "train_window_size) or sde_window_only=false."
            )
        components = r.reward_components
        if r.reward_weights is not None and len(r.reward_weights) != len(components):
            raise ValueError(
                f"reward_weights has {len(r.reward_weights)} values for {len(components)} reward components "
                f"{components}: give one weight per component, in order, or omit reward_weights (all 1)."
            )
        unknown = set(r.reward_kwargs or {}) - set(components)
        if unknown:
            raise ValueError(
                f"reward_kwargs has keys {sorted(unknown)} that are not reward components {components}: key each "
                "component's kwargs by its name (its exact spec string unless labelled name=spec)."
            )
        if self.eval.eval_prompts == s.prompts:
            logger.warning("eval_prompts == prompts (%s): the evaluation is not held out", s.prompts)
        if self.training.mixed_precision == "bf16" and s.sample_batch_size != self.training.train_batch_size:
            logger.warning(
                "mixed_precision=bf16 with sample_batch_size=%d != train_batch_size=%d: bf16 kernels round "
                "differently per batch shape, so the ratio starts ~1e-4 away from 1 (measured 1.0004 on a "
                "FLUX.1-dev-sized model), past clip_range, and the clipped samples give no gradient. Set them equal.",
                s.sample_batch_size,
                self.training.train_batch_size,
            )
        if self.training.clip_range > 0.05:
            logger.warning(
                "clip_range=%g: log-probs are per-element means, so ratios stay within ~1e-3 of 1 and a PPO-style "
                "clip range never clips; Flow-GRPO uses 1e-4",
                self.training.clip_range,
            )

    def validate_funnel(self) -> None:
        """A funnel prunes by fixed counts at increasing steps with a reward-based predictor, survivors only."""
        p = self.pruning
        stages = self.pruning_stages  # raises naming a malformed stage
        if p.prune_policy not in ("topk", "maxvar", "variance", "random"):
            raise ValueError(
                f"prune_funnel needs a fixed-count policy (variance, topk, maxvar, random), not {p.prune_policy!r}"
            )
        if p.predictor in ("reward", "probe") and len(stages) > 1:
            raise ValueError(
                f"prune_funnel={p.prune_funnel!r} predicts at {len(stages)} steps; predictor={p.predictor!r} cannot "
                "('reward' finishes every rollout, a probe file reads one step): use preview or lookahead."
            )
        if p.prune_advantage != "survivors" or p.prune_train_early:
            raise ValueError(
                "prune_funnel trains survivors only: set prune_advantage: survivors, prune_train_early: false"
            )
        sizes = funnel_group_sizes(self.started_group_size, stages)
        if sizes[-1] < 2 or any(p.prune_explore > size for size in sizes):
            raise ValueError(
                f"prune_funnel={p.prune_funnel!r} leaves {sizes} rollouts per group from {self.started_group_size} "
                f"started: the last stage needs >= 2 and every stage >= prune_explore={p.prune_explore}."
            )

    def validate_pruning(self) -> None:
        """Cross-field checks of the pruning section against the sampling section."""
        p, s = self.pruning, self.sampling
        if p.prune_funnel:
            self.validate_funnel()
        if p.prune_policy == "none":
            if p.prune_min_spread > 0:
                raise ValueError(
                    "prune_min_spread > 0 skips groups, but prune_policy='none' must train exactly like the unpruned "
                    "trainer. Set a pruning policy (topk, maxvar, random, threshold) or prune_min_spread: 0."
                )
        elif p.predictor != "reward" and not 1 <= p.capture_step < s.num_steps:
            raise ValueError(
                f"capture_step={p.capture_step} must lie in [1, num_steps - 1 = {s.num_steps - 1}]: pruning stops "
                "rollouts after step k, so k = T saves nothing. Set capture_step to ~0.2 num_steps (2 of 10)."
            )
        if p.prune_expand > 1 and p.prune_policy == "none":
            raise ValueError(
                f"prune_expand={p.prune_expand} starts more rollouts for a policy to prune, but prune_policy='none' "
                "keeps them all: set a pruning policy (variance, topk, ...) or, for a larger unpruned group, "
                "group_size instead."
            )
        if p.probe_refresh_every > 0 and p.predictor != "probe":
            raise ValueError(
                f"probe_refresh_every={p.probe_refresh_every} refreshes the probe, but predictor={p.predictor!r}: "
                "set predictor: probe or probe_refresh_every: 0."
            )
        needs_prediction = p.prune_policy in PREDICTION_POLICIES or p.prune_advantage == "imputed"
        needs_prediction = needs_prediction or p.probe_refresh_every > 0 or p.prune_min_spread > 0
        if needs_prediction and p.predictor == "probe" and not p.probe_path:
            raise ValueError(
                f"prune_policy={p.prune_policy!r}, prune_advantage={p.prune_advantage!r}, probe_refresh_every="
                f"{p.probe_refresh_every}, prune_min_spread={p.prune_min_spread} need predictions, and "
                "predictor='probe' reads a probe: set probe_path to a probe file (launch/probe_train.py) or "
                "'init', choose another predictor (preview, lookahead, reward), or use prune_policy 'random' / 'none'."
            )
        if p.prune_advantage == "imputed" and p.prune_policy == "none":
            raise ValueError(
                "prune_advantage='imputed' imputes pruned rollouts; with prune_policy='none' there are none"
            )
        if p.prune_train_early and (p.prune_policy == "none" or p.prune_advantage != "imputed"):
            raise ValueError(
                f"prune_train_early=true trains pruned rollouts' early steps with imputed advantages, but "
                f"prune_policy={p.prune_policy!r}, prune_advantage={p.prune_advantage!r}: set a pruning policy "
                "(topk, maxvar, random, threshold) and prune_advantage: imputed, or prune_train_early: false."
            )
        if p.prune_train_early and OBJECTIVES[self.training.policy_objective].needs.finished_images:
            raise ValueError(
                "prune_train_early=true trains pruned rollouts on the steps they recorded, but policy_objective="
                f"{self.training.policy_objective!r} needs finished images, which pruned rollouts never have: set "
                "prune_train_early: false or an objective that trains on transitions (flow_grpo)."
            )
        started = self.started_group_size
        if p.prune_policy in ("topk", "maxvar", "variance", "random") and p.prune_explore > keep_count(
            started, p.prune_keep_fraction
        ):
            raise ValueError(
                f"prune_explore={p.prune_explore} exceeds the {keep_count(started, p.prune_keep_fraction)} "
                f"survivors per group ({started} started, prune_keep_fraction={p.prune_keep_fraction}): "
                "the policy would choose nothing. Lower prune_explore or raise prune_keep_fraction."
            )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {key: value}}`` (the YAML layout, with sections as top-level mappings)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.sections()}

    def flat(self) -> dict[str, Any]:
        """``{key: value}`` over all sections (a loadable YAML, and the wandb config)."""
        return {k: v for section in self.to_dict().values() for k, v in section.items()}


# Keys a resumed run may change: budgets, evaluation cadence, logging and checkpointing. Any other key changes
# what the run is (model, data, reward, sampler, objective, optimiser, LoRA, pruning), so resuming with another
# value is refused unless --allow_config_change says otherwise (RunConfig.resume_changes).
RESUME_SAFE_KEYS = frozenset(
    {"max_steps", "max_minutes", "max_images_denoised", "reward_workers", "reward_overlap", "eval_every",
     "eval_num_prompts", "eval_images_per_prompt", "final_eval_num_prompts", "final_eval_images_per_prompt",
     "eval_before_training", "log_every", "wandb_mode", "wandb_project", "run_name", "progress_bar", "output_dir", "overwrite_output_dir",
     "save_every", "save_every_minutes", "save_total_limit", "resume_from", "save_lora", "save_ema", "allow_config_change",
     "distributed_timeout_s"}
)  # fmt: skip


def resume_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[dict, dict]:
    """``(safe, unsafe)``: ``key -> (old, new)`` of every key whose value differs between two flat configs."""
    changed = {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    safe = {k: v for k, v in changed.items() if k in RESUME_SAFE_KEYS}
    return safe, {k: v for k, v in changed.items() if k not in RESUME_SAFE_KEYS}


def known_keys() -> dict[str, str]:
    """Every config key -> its section name; raises if two sections share a key."""
    keys: dict[str, str] = {}
    for section, cls in RunConfig.sections().items():
        for f in dataclasses.fields(cls):
            if f.name in keys:
                raise TypeError(f"config key {f.name!r} is defined in both {keys[f.name]} and {section}")
            keys[f.name] = section
    return keys


def _unknown_key_error(key: str, where: str) -> ValueError:
    close = difflib.get_close_matches(key, list(known_keys()), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; see rl/config.py for every key"
    return ValueError(f"unknown config key {key!r} in {where}{hint}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=True)
            mark = key_node.start_mark
            if key in first:
                raise ValueError(
                    f"config file {mark.name}, line {mark.line + 1}: key {key!r} is given twice (first on line "
                    f"{first[key]}) and YAML would silently keep the last; delete one of them"
                )
            first[key] = mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    """A config file's YAML, with a duplicate key an error (it would silently take the last value).

    Raises:
        ValueError: a syntax error or a duplicate key, naming the file, the line and the problem.
    """
    try:
        with path.open(encoding="utf-8") as handle:  # a stream, so marks carry the file's name
            return yaml.load(handle, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and context_mark:  # where an unclosed bracket or quote began
            problem += f" ({context} on line {context_mark.line + 1})"
        raise ValueError(f"config file {where}: {problem}; fix the YAML there") from None


def _check_keys(args: list[str]) -> None:
    """Reject unknown keys in the YAML file given by ``--config`` and among ``--flag`` overrides."""
    known = set(known_keys())
    if "--config" in args:
        path = Path(args[args.index("--config") + 1])
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must be a YAML mapping of keys to values")
        for key in data:
            if key != "env" and key not in known:
                raise _unknown_key_error(key, str(path))
    for arg in args:
        if arg.startswith("--") and arg not in ("--config", "--help"):
            key = arg[2:].split("=", 1)[0]
            if key not in known:
                raise _unknown_key_error(key, "the command line")


def parse_config(args: list[str] | None = None, description: str = "") -> RunConfig:
    """Parse ``--config file.yaml`` and ``--key value`` overrides (command line wins) into a validated RunConfig.

    ``--help`` (or ``-h``) prints ``description`` and every option by section (rl/config_help.py) and exits 0.

    Raises:
        ValueError: an unknown key (named, with a suggestion), a value of the wrong type, or a failed check.
        FileNotFoundError: a missing config file.
    """
    import sys

    from rl.config_help import ConfigParser

    args = list(sys.argv[1:] if args is None else args)
    _check_keys(args)
    sections = RunConfig.sections()
    parser = ConfigParser(tuple(sections.values()), names=tuple(sections), description=description, allow_abbrev=False)
    parsed = parser.parse_args_and_config(args)
    return RunConfig(**dict(zip(sections, parsed)))
