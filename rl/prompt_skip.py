"""Skipping prompts whose latest groups had no reward spread, before they are rolled out (GRESO, arXiv 2506.02177).

A group whose rewards are all equal has zero advantages everywhere: its rollouts cost a full sampling and teach
nothing. GRESO observes that a prompt whose groups were flat tends to stay flat (an easy prompt solved every time,
a hard one never), so it skips such prompts before sampling, yet not always: one left in now and then shows when it
has become learnable. Here a prompt whose last ``prompt_skip_after`` groups in a row were flat is skipped with
probability ``1 - prompt_skip_explore``; its slot goes to a further draw from the same source, so every step still
trains ``prompts_per_step`` prompts. With binary rewards (GenEval, OCR exact match) many groups are flat; with a
graded reward few are (the shapes world's: 5% of groups in a ``make train`` run).

The history is a function of the run's past groups, which every process records alike (from the globally gathered
flat flags), and the draws are seeded by ``(seed, step)``, so a resumed run (the history is in its checkpoint)
picks the same prompts as an uninterrupted one. Under pruning a group's flatness is read on its trained survivors,
so the policies that keep the predicted best (``topk``, ``threshold``), whose survivors of a mixed group can all
score alike, are refused with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from rl.data import Prompt, PromptSource

if TYPE_CHECKING:
    from rl.batches import ScoredRollouts

FLAT_SPREAD = 1e-6  # max - min of a group's rewards at or below this: no contrast (advantages ~0)
DRAW_ROUNDS = 8  # further draws tried per step before skippable prompts are taken anyway


class FlatPromptHistory:
    """Per prompt text, how many of its latest groups in a row were flat, and the draws that skip on it.

    Args:
        after: consecutive flat groups after which a prompt becomes skippable (>= 1).
        explore: the probability a skippable prompt is drawn anyway (in [0, 1]).
    """

    def __init__(self, after: int, explore: float) -> None:
        if after < 1 or not 0.0 <= explore <= 1.0:
            raise ValueError(
                f"prompt_skip_after must be >= 1 and prompt_skip_explore in [0, 1], got {after}, {explore}"
            )
        self.after, self.explore = after, explore
        self.streaks: dict[str, int] = {}

    def record(self, texts: Sequence[str], flat: Sequence[bool]) -> None:
        """One finished group per text: a flat one lengthens its prompt's streak, any other ends it."""
        for text, is_flat in zip(texts, flat, strict=True):
            if is_flat:
                self.streaks[text] = self.streaks.get(text, 0) + 1
            else:
                self.streaks.pop(text, None)

    def record_step(self, accelerator: Any, step_texts: Sequence[str], scored: ScoredRollouts) -> float:
        """Record every process's groups of a step (a collective call: each process passes its own ``scored``,
        group ids indexing ``step_texts``); returns the share of the step's groups that were flat."""
        flat = flat_groups(scored.rewards.float().cpu().numpy(), scored.group_ids.cpu().numpy(),
                           scored.valid.cpu().numpy())  # fmt: skip
        known = torch.zeros(2, len(step_texts), device=accelerator.device)  # [seen, flat] per group
        for group, is_flat in flat.items():
            known[0, group], known[1, group] = 1.0, float(is_flat)
        if accelerator.num_processes > 1:  # each group lives on one process: the sum is its own value
            known = accelerator.reduce(known, "sum")
        known = known.cpu()
        seen = torch.nonzero(known[0]).flatten().tolist()
        self.record([step_texts[g] for g in seen], [bool(known[1, g]) for g in seen])
        return float(known[1].sum()) / max(len(seen), 1)

    def skippable(self, text: str) -> bool:
        return self.streaks.get(text, 0) >= self.after

    def draw(self, source: PromptSource, step: int, n: int, seed: int) -> tuple[list[Prompt], int]:
        """The ``n`` prompts of ``step`` and how many draws were skipped (not trained this step).

        Candidates come in rounds: the step's own batch first (what a run without skipping trains), then further
        batches of the source, of which only prompts not yet drawn this step count; each skippable candidate is
        kept with probability ``explore``. After :data:`DRAW_ROUNDS` rounds the skipped ones fill what is still
        missing, in draw order.
        """
        rng = np.random.default_rng([seed, step, 3])
        kept: list[Prompt] = []
        skipped: list[Prompt] = []
        seen: set[str] = set()
        for round_index in range(DRAW_ROUNDS):
            for prompt in source.batch(step, n, seed + round_index * 7919):  # round 0: the step's own batch
                if len(kept) == n:
                    break
                if round_index and prompt.text in seen:  # a refill brings new prompts, not a second try
                    continue
                seen.add(prompt.text)
                if self.skippable(prompt.text) and rng.random() >= self.explore:
                    skipped.append(prompt)
                else:
                    kept.append(prompt)
            if len(kept) == n:
                break
        filled = n - len(kept)
        return kept + skipped[:filled], len(skipped) - filled

    def state_dict(self) -> dict:
        return {"streaks": dict(self.streaks)}

    def load_state_dict(self, state: dict) -> None:
        self.streaks = {str(text): int(count) for text, count in state["streaks"].items()}


def flat_groups(rewards: np.ndarray, group_ids: np.ndarray, valid: np.ndarray) -> dict[int, bool]:
    """Per group id with at least two valid, finite rewards: whether they are all equal (within
    :data:`FLAT_SPREAD`). Groups with fewer say nothing about the prompt and are left out (pruned rollouts that
    ``prune_train_early`` trains carry NaN rewards)."""
    flat = {}
    known = valid & np.isfinite(rewards)
    for group in np.unique(group_ids):
        values = rewards[(group_ids == group) & known]
        if len(values) >= 2:
            flat[int(group)] = bool(values.max() - values.min() <= FLAT_SPREAD)
    return flat
