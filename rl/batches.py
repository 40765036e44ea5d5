"""The step's data as it moves through the trainer's phases: prompts and seeds in, scored rollouts out; how a
step's rows are chunked for scoring (:func:`score_chunks`) and which denoising steps each trains (:func:`trained_steps`).

Kept apart from rl/trainer.py so the phases that live elsewhere (rl/pruned_rollout.py) read them without
importing the trainer.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from rl.config import SamplingConfig
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
        step_texts: every process's prompt texts of the step, by group id (prompt skipping records groups by them).
    """

    prompts: list[Prompt]
    embeds: PromptEmbeddings
    prompt_index: torch.Tensor
    group_ids: torch.Tensor
    seeds: torch.Tensor
    initial_seeds: torch.Tensor | None
    step_texts: list[str] = dataclasses.field(default_factory=list)


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


def score_chunks(prompt_index: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Row indices ``[n_i]`` of consecutive chunks of whole prompt groups, in order.

    A chunk ends after the first group that brings the rows so far to a multiple of ``batch_size`` (or at the end),
    so the sampler's and the VAE's batches of ``batch_size`` rows are the same as over the whole step: in bf16 a
    different batch shape changes the results. G = 8, batch 32: chunks of 4 groups; G = 24, batch 4: 1 group;
    G = 4, batch 5: 5 groups.

    Args:
        prompt_index: ``[B]`` each rollout's prompt, each group's rows contiguous.
        batch_size: rollouts per transformer call (``sample_batch_size``).
    """
    index = prompt_index.cpu()
    group_ends = (torch.nonzero(index[1:] != index[:-1]).flatten() + 1).tolist() + [len(index)]
    chunks, start = [], 0
    for end in group_ends:
        if end > start and (end % batch_size == 0 or end == len(index)):  # (an empty index: no chunk)
            chunks.append(torch.arange(start, end))
            start = end
    return chunks


def trained_steps(sampling: SamplingConfig, seed: int, step: int, rows: int, stream: int = 0) -> torch.Tensor:
    """``[rows, K]`` denoising steps each rollout trains on; the last step (T - 1) never is.

    ``all_but_last``: 0..T-2. ``window``: ``[start, start + size)``, at ``step``'s position when it slides.
    ``random``: a fresh sorted random ``train_fraction`` of 0..T-2 per rollout, seeded by ``(seed, step, stream)``
    (stream: the process index, so processes draw different subsets). ``train_first_step: false`` leaves step 0
    (sigma = 1) out of each.
    """
    s = sampling
    first = 0 if s.train_first_step else 1
    trainable = s.num_steps - 1 - first
    if s.train_steps == "all_but_last":
        return torch.arange(first, s.num_steps - 1).expand(rows, -1)
    if s.train_steps == "window":
        return torch.tensor([k for k in s.window_at(step) if k >= first]).expand(rows, -1)
    count = max(1, int(s.train_fraction * trainable))  # floor, as Flow-GRPO's and DanceGRPO's timestep_fraction
    # the last 1: NumPy pads a seed list with zeros, so [seed, step, 3, 0] would be prompt skipping's [seed, step,
    # 3] and [seed, step, 3, 2] the micro-batch order of inner epoch 3: other streams, same numbers
    rng = np.random.default_rng([seed, step, 3, stream, 1])
    picks = np.sort(np.stack([rng.permutation(trainable)[:count] + first for _ in range(rows)]), axis=1)
    return torch.from_numpy(picks)
