"""A run's ``summary.json``: its held-out score before and after training, and whether the run is finished.

Written by the main process at the trained end; a relaunch of a finished run reads it back instead of
training or evaluating again (tests/rl/test_checkpoint.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rl.run_files import SUMMARY


def held_out_summary(
    steps: int,
    images_seen: int,
    minutes: float,
    eval_prompts: str,
    eval_num_prompts: int,
    images_per_prompt: int,
    base: dict[str, float],
    final: dict[str, float],
) -> dict:
    """Base vs final held-out scores (same prompts, seeds and sampler); ``delta`` holds ``final - base`` of every
    mean (e.g. ``total/mean``: the reward's held-out gain)."""
    return {
        "steps": steps,
        "images_seen": images_seen,
        "minutes": round(minutes, 3),
        "eval_prompts": eval_prompts,
        "eval_num_prompts": eval_num_prompts,
        "eval_images_per_prompt": images_per_prompt,
        "base": base,
        "final": final,
        "delta": {k: final[k] - base[k] for k in final if k in base and k.endswith("/mean")},
    }


def write_summary(output_dir: Path, summary: dict) -> None:
    """Write ``summary.json`` whole or not at all (it marks the run finished: a half-written one must not)."""
    path = output_dir / SUMMARY
    tmp = path.with_name(f".{SUMMARY}.tmp")
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, path)


def finished_summary(output_dir: Path, step: int) -> dict | None:
    """The summary of the run in ``output_dir`` if it finished at or after ``step`` (a run that was written before
    its trained end was checkpointed resumes from an earlier step and is not finished), else None."""
    path = output_dir / SUMMARY
    try:
        summary = json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{path} is damaged ({error}): delete it, and the run finishes again from its newest checkpoint (or "
            "restarts, having none)"
        ) from None
    return summary if isinstance(summary, dict) and summary.get("steps", -1) >= step else None
