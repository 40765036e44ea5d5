"""Run configuration: flat, documented dataclasses, one per concern, parsed with ``trl.TrlParser``.

A run is ``--config file.yaml`` plus ``--flag value`` overrides (TRL's convention); every option is a flat
key documented once, here, in its field's ``help`` (meaning, valid values, recommended value, anchor).
YAML files group keys under comments that match the sections below. ``rl.config_parse.parse_config`` rejects
unknown keys by name (in the YAML and on the command line, with a close-match suggestion) and values of the wrong
type, then runs the cross-field checks of :meth:`RunConfig.validate`, which say what to set instead.
Nothing here loads a model, a reward or a prompt file. The defaults fit the default model (the shipped tiny one:
its image size, text length and LoRA shape); FLUX.1-dev's settings live in its configs (configs/flux_dev_*.yaml).

To add a section (as ``PruningConfig`` was added, rl/pruning_config.py): write a dataclass deriving
from :class:`rl.config_base.Section` with new, unique keys and add it as a field of :class:`RunConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
from typing import Any

from rewards.compose import FAILURE_POLICIES, parse_reward_spec
from rewards.shapes import parse_category_weights
from rl.config_base import Section, nonnegative, option, positive
from rl.objectives import OBJECTIVES
from rl.prune_policies import PRUNE_POLICIES
from rl.pruning import funnel_group_sizes, parse_funnel
from rl.pruning_config import PruningConfig, validate_pruning
from rl.schedule import LR_SCHEDULES
from rl.sde import AWM_KL_FORMS

# seconds: the shortest waits ordinary delays do not trip (a checkpoint write; scoring a batch)
MIN_COLLECTIVE_TIMEOUT_S, MIN_REWARD_TIMEOUT_S = 10.0, 1.0

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


@dataclasses.dataclass
class ModelConfig(Section):
    """The base model and its LoRA."""

    choices = {"init_lora_weights": LORA_INITS}

    pretrained: str = option(
        "assets/tiny-flux-shapes",
        "Base model: a diffusers FluxPipeline folder or hub id (black-forest-labs/FLUX.1-dev). The shipped tiny "
        "model is the default; FLUX.1-dev in bf16 needs an 80 GB GPU unsharded (README, GPU section; bench/RESULTS.md, "
        "'Memory per process').",
    )
    revision: str | None = option(None, "Hub revision (branch, tag or commit) of `pretrained`; None: the default.")
    max_sequence_length: int = option(
        16,
        "T5 tokens per prompt. The tiny model: 16; FLUX.1-dev: 512 (256 is enough for short prompts and faster).",
    )
    lora_rank: int = option(16, "LoRA rank r. The tiny model: 8-32; FLUX.1-dev: 64 (Flow-GRPO).")
    lora_alpha: float = option(
        32.0, "LoRA alpha; the update is scaled by alpha / r. Usually 2 r: FLUX.1-dev 128 (Flow-GRPO)."
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
        positive(self, "max_sequence_length", "lora_rank", "lora_alpha")
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
        "runs any config (under FSDP and ZeRO-3, where every forward is a collective, the processes with fewer "
        "groups run throwaway forwards to keep in step). Flow-GRPO FLUX: 48; the tiny model: 8-16.",
    )
    prompt_skip_after: int = option(
        0,
        "GRESO's pre-rollout skipping (arXiv 2506.02177; rl/prompt_skip.py): a prompt whose last N groups in a row "
        "had all-equal rewards is skipped (its slot redrawn) with probability 1 - prompt_skip_explore. Pays with "
        "binary rewards, where many groups are flat. 0: never skip.",
    )
    prompt_skip_explore: float = option(
        0.2, "The probability a skippable prompt is trained anyway, so one that became learnable is seen again."
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
        "(0.7 in its base config); 0.7-1.0 works; 0 has no density: flow_grpo cannot train, awm can.",
    )
    guidance_scale: float = option(
        3.5, "FLUX's distilled guidance value (guidance embedding). FLUX.1-dev: 3.5; ignored by models without it."
    )
    height: int = option(
        64,
        "Image height in pixels, a multiple of twice the VAE's downscale factor (16 for FLUX.1-dev). Keep it within "
        "2x of the model's native size (its VAE's sample_size: 1024 for FLUX.1-dev, 64 for the tiny model); farther "
        "off, the launcher warns naming both sizes (rl/sampler.py native_size_warning). The tiny model: 64; "
        "Flow-GRPO on FLUX.1-dev: 512.",
    )
    width: int = option(
        64, "Image width in pixels; as height (a multiple of twice the VAE's downscale factor, within 2x of native)."
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
    train_window_shift_every: int = option(
        0,
        "Slide the 'window' mode's window (with sde_window_only, its SDE noise too) train_window_shift_stride "
        "steps later every this many GRPO steps, back to train_window_start after the last trainable position: "
        "MixGRPO's progressive strategy with roll-back (its FLUX run: a window of 4 of 25 steps, moved 1 step "
        "every 25 iterations). 0: a fixed window (Flow-GRPO-Fast).",
    )
    train_window_shift_stride: int = option(1, "Steps the sliding window moves each time (MixGRPO: 1).")
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
        """The steps of the ``window`` mode (and of ``sde_window_only``'s SDE noise) at the first GRPO step."""
        return range(self.train_window_start, self.train_window_start + self.train_window_size)

    def window_at(self, step: int) -> range:
        """The window at GRPO step ``step`` (0-based): :attr:`train_window`, slid ``train_window_shift_stride``
        steps later every ``train_window_shift_every`` steps and back to its start after the last position whose
        window ends before the untrained last step (a pure function of the step, so a resume continues it)."""
        if not self.train_window_shift_every:
            return self.train_window
        stride = self.train_window_shift_stride
        positions = (self.num_steps - 1 - self.train_window_size - self.train_window_start) // stride + 1
        start = self.train_window_start + stride * ((step // self.train_window_shift_every) % positions)
        return range(start, start + self.train_window_size)

    def check(self) -> None:
        positive(self, "prompts_per_step", "group_size", "num_steps", "height", "width", "sample_batch_size")
        if self.noise_level < 0:
            raise ValueError(f"noise_level must be >= 0, got {self.noise_level}")
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must lie in (0, 1], got {self.train_fraction}")
        if self.prompt_skip_after < 0:
            raise ValueError(f"prompt_skip_after must be >= 0 (0: never skip), got {self.prompt_skip_after}")
        if not 0 <= self.prompt_skip_explore <= 1:
            raise ValueError(f"prompt_skip_explore must lie in [0, 1], got {self.prompt_skip_explore}")
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
    reward_timeout_s: float = option(
        900.0,
        "Longest wait for one batch's scores; a reward that gives no answer in time (a deadlocked judge, a network "
        "call without a deadline) stops the run after a checkpoint, instead of stalling it forever. 0: no limit. "
        "Raise it if scoring one chunk of a step (see reward_overlap) can legitimately take longer; with several "
        "processes the wait is at most half of distributed_timeout_s (the others would give up on it then).",
    )

    def check(self) -> None:
        positive(self, "reward_workers")
        if not (self.reward_timeout_s == 0 or self.reward_timeout_s >= MIN_REWARD_TIMEOUT_S):
            raise ValueError(
                f"reward_timeout_s must be 0 (no limit) or at least {MIN_REWARD_TIMEOUT_S:g} s, got {self.reward_timeout_s}"
            )
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

    max_steps: int = option(
        100, "GRPO steps (each: sample, score, optimise). The tiny model's `make train`: 160 (README, Results)."
    )
    max_minutes: float = option(
        0.0, "Wall-clock budget in minutes; training stops (and still evaluates and saves) once exceeded. 0: none."
    )
    max_flux_compute: float = option(
        0.0,
        "Compute budget in FLUX.1-dev transformer forwards (rl/cost.py prices every call, training pass, decode and "
        "reward call); training stops once exceeded. Compares pruned and unpruned runs at equal compute "
        "(launch/ablate.py --budget_flux_compute). 0: none.",
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
        "advantage-weighted objective is unbounded and drifts (measured in docs/experiments.md, 'Flow-GRPO "
        "training'); p < 0.5 bounds it (rl/sde.py). AWM's code: 0.25.",
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
        "reference forward. The KL is Flow-GRPO's code's, mean((mu - mu_ref)^2) / (2 sigma_t^2), so its values "
        "carry over: 0 for FLUX, 0.01-0.04 for SD3.5 (against reward hacking).",
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
        "CPUs with AVX512-BF16, where the tiny model's GRPO step is faster: docs/experiments.md, 'Flow-GRPO "
        "training'). Latents and log-prob math are always fp32.",
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
        positive(self, "max_steps", "learning_rate", "max_grad_norm", "train_batch_size", "awm_error_power")
        positive(self, "distributed_timeout_s")
        positive(self, "gradient_accumulation_steps", "num_inner_epochs", "clip_range", "adv_clip_max")
        nonnegative(
            self, "kl_beta", "max_minutes", "max_flux_compute", "lr_warmup_steps", "awm_ema_kl_beta", "adv_scale_max"
        )
        if not 0 <= self.awm_ema_kl_decay < 1:
            raise ValueError(f"awm_ema_kl_decay must lie in [0, 1), got {self.awm_ema_kl_decay}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        for key in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(f"{key} must lie in [0, 1), got {getattr(self, key)}")
        positive(self, "adam_epsilon")  # 0: LoRA A's first gradient is exactly 0 (B starts at 0), and 0 / 0 is NaN
        nonnegative(self, "adam_weight_decay")
        if self.lr_warmup_steps >= self.max_steps:
            raise ValueError(
                f"lr_warmup_steps={self.lr_warmup_steps} >= max_steps={self.max_steps}: the run would end before the "
                "learning rate reaches learning_rate. Set lr_warmup_steps below max_steps (0: no warm-up)."
            )
        if self.distributed_timeout_s < MIN_COLLECTIVE_TIMEOUT_S:
            raise ValueError(
                f"distributed_timeout_s={self.distributed_timeout_s} s: a collective waiting less than "
                f"{MIN_COLLECTIVE_TIMEOUT_S:g} s fails on any ordinary delay (a checkpoint write). torch's default: 1800."
            )


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
        positive(self, "eval_images_per_prompt")
        nonnegative(self, "eval_every", "eval_num_steps", "eval_num_prompts", "final_eval_num_prompts",
                    "final_eval_images_per_prompt")  # fmt: skip


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
        "Delete the run an output_dir holds (its own files; others stay) before starting. Without it a fresh run (no resume_from) or a "
        "branch refuses such a folder rather than mix its log and checkpoints with the old run's. It wins over "
        "resume_from: latest (the folder is cleared and the run starts afresh), so a command that relaunches a "
        "preemptible job must leave it out.",
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
        positive(self, "log_every")


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
        "The default keeps a killed run's loss under 10 minutes at a small cost (bench/RESULTS.md, 'Checkpoint "
        "cost'); SIGTERM and SIGINT (preemption, Ctrl-C) and a run-stopping reward failure always write one before "
        "exiting.",
    )
    save_total_limit: int = option(
        0,
        "Keep only the newest N checkpoints (0: keep all). A checkpoint of FLUX.1-dev with r=64 is ~3.6 GB "
        "(projected: bench/RESULTS.md, 'Checkpoint cost').",
    )
    resume_from: str | None = option(
        None,
        "Resume a run: 'latest' (the newest complete checkpoint in <output_dir>/checkpoints; starts fresh when "
        "there is none, so one command both starts and resumes a preemptible job) or a checkpoint folder path: "
        "the folder's newest (an earlier one while later ones exist is refused), or another run's, which starts a "
        "branch in output_dir (the same command again continues the branch). The resumed run continues exactly "
        "(same prompts, noise, weights and logged rewards) as if never stopped; its config is checked against the "
        "checkpoint's (allow_config_change).",
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
        nonnegative(self, "save_every", "save_total_limit", "save_every_minutes")


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
    def trained_group_size(self) -> int:
        """Most rollouts per prompt a step trains: the survivors of a fixed-count pruning policy (its last stage's),
        else every started rollout (pruned ones too when ``prune_train_early`` trains their early steps)."""
        p, started = self.pruning, self.started_group_size
        if p.prune_policy == "none" or p.prune_train_early or not PRUNE_POLICIES[p.prune_policy].fixed_count:
            return started
        return funnel_group_sizes(started, self.pruning_stages)[-1]

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
        validate_pruning(self)
        objective = OBJECTIVES[self.training.policy_objective]
        if s.noise_level == 0 and objective.needs.sde_noise:
            raise ValueError(
                f"noise_level=0 samples deterministically, but policy_objective={self.training.policy_objective!r} "
                "needs SDE noise on the trained steps (transitions have no density, so there is no ratio). Set "
                "noise_level > 0 (0.7-1.0; FLUX default 0.9), or policy_objective: awm, which trains on any sampler."
            )
        if s.noise_level == 0 and s.same_initial_noise:
            raise ValueError(
                "noise_level=0 with same_initial_noise: every rollout of a group follows one path to one image, so "
                "rewards are equal and advantages 0: nothing is trained. Set same_initial_noise false (each rollout "
                "its own initial noise) or noise_level > 0."
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
        if s.train_window_shift_every:
            if s.train_window_shift_every < 0 or s.train_window_shift_stride < 1:
                raise ValueError(
                    f"train_window_shift_every={s.train_window_shift_every} and train_window_shift_stride="
                    f"{s.train_window_shift_stride} must be >= 0 and >= 1"
                )
            if s.train_steps != "window":
                raise ValueError(
                    f"train_window_shift_every slides the 'window' mode's window, but train_steps="
                    f"{s.train_steps!r}: set train_steps window (or train_window_shift_every 0)"
                )
            if not s.train_first_step and s.train_window_start == 0:  # K trained steps must stay constant
                raise ValueError(
                    "train_first_step=false with a sliding window starting at step 0 would train one step fewer "
                    "at the first position than at the others: set train_window_start >= 1"
                )
        if not s.train_first_step and (s.num_steps < 3 or (s.train_steps == "window" and list(s.train_window) == [0])):
            raise ValueError(
                f"train_first_step=false leaves no step to train (num_steps={s.num_steps}, train_steps="
                f"{s.train_steps!r}, window {list(s.train_window)}): step 0 is left out and the last step is never "
                "trained. Widen the window past step 0, set num_steps >= 3, or train_first_step=true."
            )
        t = self.training
        for name, unit in OBJECTIVES.items():  # an objective's own options, set under another objective
            changed = [
                f.name
                for f in dataclasses.fields(t)
                if unit.option_prefix and f.name.startswith(unit.option_prefix) and getattr(t, f.name) != f.default
            ]
            if changed and t.policy_objective != name:
                raise ValueError(
                    f"{', '.join(changed)} only act under policy_objective {name!r}, not {t.policy_objective!r}: set "
                    f"policy_objective: {name} or leave them at their defaults."
                )
        most = s.prompts_per_step * self.trained_group_size  # all on one process (the trainer: per process)
        if t.gradient_accumulation_steps > most:
            raise ValueError(
                f"gradient_accumulation_steps={t.gradient_accumulation_steps} splits a step's rollouts into that many "
                f"micro-batches, but a step trains at most {most} (prompts_per_step x the rollouts trained per "
                "prompt): the rest would run forward and backward on no sample. Set gradient_accumulation_steps <= "
                f"{most}."
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
        if "clipfrac" in objective.metrics:  # an objective clipping a probability ratio (flow_grpo's PPO)
            self.warn_ratio_clipping()

    def warn_ratio_clipping(self) -> None:
        """Warn of settings under which a PPO-style ratio clip misbehaves."""
        s, t = self.sampling, self.training
        if t.mixed_precision == "bf16" and s.sample_batch_size != t.train_batch_size:
            logger.warning(
                "mixed_precision=bf16 with sample_batch_size=%d != train_batch_size=%d: bf16 kernels round "
                "differently per batch shape, so the ratio starts ~1e-4 away from 1 (measured 1.0004 on a "
                "FLUX.1-dev-sized model), past clip_range, and the clipped samples give no gradient. Set them equal.",
                s.sample_batch_size,
                t.train_batch_size,
            )
        if t.clip_range > 0.05:
            logger.warning(
                "clip_range=%g: log-probs are per-element means, so ratios stay within ~1e-3 of 1 and a PPO-style "
                "clip range never clips; Flow-GRPO uses 1e-4",
                t.clip_range,
            )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{section: {key: value}}`` (the YAML layout, with sections as top-level mappings)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in self.sections()}

    def flat(self) -> dict[str, Any]:
        """``{key: value}`` over all sections (a loadable YAML, and the wandb config)."""
        return {k: v for section in self.to_dict().values() for k, v in section.items()}
