"""GRPO training of FLUX with LoRA: sampler, SDE math, objectives, trainer, pruning (docs/design.md)."""

from rl.library_notices import hide_library_notices

hide_library_notices()
