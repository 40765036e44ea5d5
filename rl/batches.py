"""The step's data as it moves through the trainer's phases: prompts and seeds in, scored rollouts out.

Kept apart from rl/trainer.py so the phases that live elsewhere (rl/pruned_rollout.py) read them without
importing the trainer.
"""

from __future__ import annotations

import dataclasses

import torch

from rl.data import Prompt
from rl.sampler import PromptEmbeddings, Rollouts


@dataclasses.dataclass
class PromptBatch:
    """This process's prompts of one GRPO step, encoded, and the bookkeeping of their G rollouts each.

    Attributes:
        prompts: the P prompts (with reward metadata) this process owns.
        embeds: their text embeddings (``[P, L, D]`` ...).
        prompt_index: ``[B]`` (B = P G) row of each rollout's prompt in ``embeds``.
        group_ids: ``[P]`` position of each prompt in the step's global batch: its rollouts' group id.
        seeds: ``[B]`` per-rollout noise seeds.
        initial_seeds: ``[B]`` seeds of the initial noise (shared within a group), or None (= ``seeds``).
    """

    prompts: list[Prompt]
    embeds: PromptEmbeddings
    prompt_index: torch.Tensor
    group_ids: torch.Tensor
    seeds: torch.Tensor
    initial_seeds: torch.Tensor | None


@dataclasses.dataclass
class ScoredRollouts:
    """Finished rollouts and their rewards.

    Attributes:
        rollouts: B finished rollouts (``states [B, T + 1, S, C]``, ``log_probs [B, T]``).
        group_ids: ``[B]`` group of each rollout.
        rewards: ``[B]`` total reward (NaN where invalid).
        components: ``"<component>/<key>" -> [B]`` every score (for logging).
        valid: ``[B]`` bool; False where the reward's failure policy dropped the group.
        recorded: ``[B]`` transitions each rollout recorded, or None (all T). Pruned rollouts trained early
            (``prune_train_early``) recorded k: their states past step k are padding, their rewards NaN.
    """

    rollouts: Rollouts
    group_ids: torch.Tensor
    rewards: torch.Tensor
    components: dict[str, torch.Tensor]
    valid: torch.Tensor
    recorded: torch.Tensor | None = None
