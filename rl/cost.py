"""What a GRPO run spends, counted per operation, and its FLUX.1-dev-equivalent compute.

Wall-clock on the tiny model misprices operations against FLUX.1-dev: there a VAE decode costs about three
transformer calls, on FLUX.1-dev a small fraction of one. So the trainer counts operations
(:class:`ComputeCounts`) and :func:`flux_equivalent` prices them with FLUX.1-dev's per-operation costs in
units of one transformer forward, estimated from FLOP counts (every ablation summary records the costs it
priced with, ``cost_model``), at 512 x 512 (1,024 image + 512 text tokens), batch 1:

- transformer forward: 2 x 11.9e9 parameters x 1,536 tokens + attention (4 x 1,536^2 x 3,072 x 57 blocks)
  ~ 38 TFLOPs = **1**.
- training pass (forward + backward of a LoRA'd transformer): **3**, the usual backward = 2 x forward, an
  upper estimate here (the frozen base needs no weight gradients); per image an H200 measured 2.5x a forward
  at batch 2 and 3.2x with gradient checkpointing at batch 4 (bench/RESULTS.md, "GPU path").
- VAE decode to 512 x 512: the decoder's 3x3 convolutions, ~0.54 TFLOPs at each of 512^2 x 128, 256^2 x 256
  and 128^2 x 512 channels, ~0.2 at 64^2 ~ 1.8 TFLOPs = **0.05**. This leaves out the upsamplers' convolutions
  (~0.3 TFLOPs each): counted with hooks on diffusers' ``AutoencoderKL`` it is 2.5 TFLOPs, 0.066; kept at 0.05
  so the measured tables stay comparable (a run's total moves by under 0.1%).
- reward call: a ViT-H/14 at 224 px (PickScore, HPSv2, CLIP-H) ~ 0.33 TFLOPs = **0.01**; a VLM judge costs
  far more, so pass your own :class:`OperationCosts`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class ComputeCounts:
    """Operations spent on training so far, over every process (evaluation excluded).

    Attributes:
        transformer_calls: denoising and lookahead forwards, one per rollout per call (KL references included).
        train_passes: forward + backward passes, one per (rollout, trained step) sample.
        decodes: VAE decodes, one per image (finals and previews).
        reward_calls: images scored by the reward.
    """

    transformer_calls: float = 0.0
    train_passes: float = 0.0
    decodes: float = 0.0
    reward_calls: float = 0.0


@dataclasses.dataclass(frozen=True)
class OperationCosts:
    """Cost of each operation in transformer forwards (defaults: FLUX.1-dev at 512 px, from FLOP counts)."""

    transformer_call: float = 1.0
    train_pass: float = 3.0
    decode: float = 0.05
    reward_call: float = 0.01


FLUX_DEV_COSTS = OperationCosts()


def flux_equivalent(counts: ComputeCounts, costs: OperationCosts = FLUX_DEV_COSTS) -> float:
    """The counted operations priced in transformer forwards of FLUX.1-dev."""
    return (
        counts.transformer_calls * costs.transformer_call
        + counts.train_passes * costs.train_pass
        + counts.decodes * costs.decode
        + counts.reward_calls * costs.reward_call
    )
