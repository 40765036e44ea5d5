"""Learning-rate schedules as pure functions of the GRPO step (so a resumed run follows the same curve)."""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(schedule: str, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """The multiplier of the base learning rate for GRPO step ``step`` (0-based) of ``total_steps``.

    A linear warm-up from ``1 / (warmup_steps + 1)`` to 1 over the first ``warmup_steps`` steps, then
    ``constant`` (1), ``linear`` (down to 0 at ``total_steps``) or ``cosine`` (half a cosine down to 0 at
    ``total_steps``). The decay reaches 0 only after the last step, so every step trains.

    Raises:
        ValueError: on an unknown schedule.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    if schedule == "linear":
        return max(1.0 - progress, 0.0)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
