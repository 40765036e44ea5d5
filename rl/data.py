"""Prompt sources: where training and evaluation prompts (and each prompt's reward metadata) come from.

A source is named by a string (the ``prompts`` / ``eval_prompts`` config keys):

- ``shapes:train`` / ``shapes:test``: the shapes world's splits (rewards/shapes), each prompt with its
  GenEval-style metadata; training batches are category-balanced (``rewards.shapes.sample_prompts``).
- ``path/to/prompts.txt``: one prompt per line (blank lines skipped), metadata ``{}``.
- ``path/to/prompts.jsonl``: one JSON object per line with a ``"prompt"`` key (GenEval's
  ``evaluation_metadata.jsonl`` layout); the whole object is the prompt's metadata.

Batches are a pure function of ``(seed, step)``, identical on every process, so a run resumes from its step
alone. :func:`shard` splits a batch of prompts between processes; a process always owns whole prompt groups.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from rewards.shapes import all_prompts, parse_category_weights, sample_prompts
from rl.paths import repository_hint


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt and the metadata its reward may need (``{}`` when the source has none)."""

    text: str
    metadata: dict


class PromptSource:
    """A named, finite list of prompts with deterministic training batches and evaluation subsets.

    Args:
        name: the source string it was loaded from (for messages).
        items: every prompt, in a fixed order.
        shapes_split: for ``shapes:<split>`` sources, the split; batches are then category-balanced.
        category_weights: for shapes sources, relative draw weights of categories (``sample_prompts``).

    Raises:
        ValueError: if ``items`` is empty.
    """

    def __init__(
        self,
        name: str,
        items: list[Prompt],
        shapes_split: str | None = None,
        category_weights: Mapping[str, float] | None = None,
    ) -> None:
        if not items:
            raise ValueError(f"prompt source {name!r} contains no prompts")
        self.name = name
        self.items = items
        self.shapes_split = shapes_split
        self.category_weights = category_weights

    def __len__(self) -> int:
        return len(self.items)

    def batch(self, step: int, n: int, seed: int) -> list[Prompt]:
        """The ``n`` training prompts of GRPO step ``step`` (the same on every process).

        Shapes sources draw category-balanced (or ``category_weights``-weighted) prompts with replacement; file
        sources walk through shuffled passes over the file (each pass a fresh permutation), so every prompt is
        seen once per pass.
        """
        if self.shapes_split is not None:
            rng = np.random.default_rng([seed, step])
            specs = sample_prompts(self.shapes_split, n, rng, self.category_weights)
            return [Prompt(spec.prompt, spec.to_dict()) for spec in specs]
        permutations: dict[int, np.ndarray] = {}
        picks = []
        for position in range(step * n, (step + 1) * n):
            epoch, offset = divmod(position, len(self.items))
            if epoch not in permutations:
                permutations[epoch] = np.random.default_rng([seed, epoch]).permutation(len(self.items))
            picks.append(self.items[int(permutations[epoch][offset])])
        return picks

    def eval_subset(self, n: int) -> list[tuple[int, Prompt]]:
        """``(index, prompt)`` of ``n`` evenly spaced prompts (all of them when ``n`` is 0 or too large).

        Indices are positions in the full list, so a subset's images equal the full evaluation's.
        """
        if n <= 0 or n >= len(self.items):
            return list(enumerate(self.items))
        indices = np.linspace(0, len(self.items) - 1, n).round().astype(int)
        return [(int(i), self.items[int(i)]) for i in indices]


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """``(1-based line number, stripped text)`` of every non-blank line; the numbers count the blank ones, so a
    message points at the line an editor shows. ``utf-8-sig`` drops the byte-order mark some editors write first.
    """
    if path.is_dir():
        raise FileNotFoundError(f"prompt file {path} is a folder: point the option at a .txt or .jsonl file in it")
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist{repository_hint(path)}")
    raw = path.read_bytes()
    try:
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[error.start]:02x}); save the prompt file as UTF-8 (e.g. iconv -f "
            "latin1 -t utf-8)"
        ) from error
    return [(number, line.strip()) for number, line in enumerate(lines, 1) if line.strip()]


def load_prompt_source(spec: str, category_weights: str = "") -> PromptSource:
    """Load a prompt source from its name (see the module docstring).

    ``category_weights`` (``"position=2.5 color_attr=2.5"``) weights a shapes source's training draws.

    Raises:
        FileNotFoundError: a missing prompt file (or a folder).
        ValueError: a file that is not UTF-8 (named by file and line), an unknown shapes split, an unsupported file type, a JSONL line that is not JSON or has no
            ``"prompt"`` (named by file and line), or an empty source.
    """
    if spec.startswith("shapes:"):
        split = spec.partition(":")[2]
        if split not in ("train", "test"):
            raise ValueError(f"unknown shapes split in {spec!r}; use 'shapes:train' or 'shapes:test'")
        items = [Prompt(s.prompt, s.to_dict()) for s in all_prompts(split)]
        weights = parse_category_weights(category_weights) if category_weights else None
        return PromptSource(spec, items, shapes_split=split, category_weights=weights)
    path = Path(spec)
    if path.suffix == ".txt":
        return PromptSource(spec, [Prompt(line, {}) for _, line in _read_lines(path)])
    if path.suffix == ".jsonl":
        items = []
        for number, line in _read_lines(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno}); each line of a .jsonl "
                    'prompt file must be one JSON object such as {"prompt": "a red square"}'
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                raise ValueError(
                    f"{path}:{number}: each JSONL line needs a string 'prompt' key, such as "
                    '{"prompt": "a red square"}'
                )
            items.append(Prompt(record["prompt"], record))
        return PromptSource(spec, items)
    raise ValueError(f"prompt source {spec!r}: expected 'shapes:train', 'shapes:test', a .txt or a .jsonl file")


def shard(items: list, process_index: int, num_processes: int) -> list:
    """This process's contiguous share of ``items``: whole items (prompt groups), never split.

    The first ``len(items) % num_processes`` processes own one item more, so every item belongs to exactly one
    process at any process count and a step trains the configured prompts, no more (processes with fewer
    rollouts run zero-weight filler micro-batches, so their collectives still line up).

    Raises:
        ValueError: fewer items than processes (a process would own no prompt group).
    """
    if len(items) < num_processes:
        raise ValueError(
            f"{len(items)} prompts per step over {num_processes} processes: each process owns whole prompt groups, "
            f"so one would have none; set prompts_per_step >= {num_processes}"
        )
    size, extra = divmod(len(items), num_processes)
    start = process_index * size + min(process_index, extra)
    return items[start : start + size + (process_index < extra)]
