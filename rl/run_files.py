"""The names of what a run writes into its ``output_dir``: one list, so clearing a run (``overwrite_output_dir``)
deletes exactly what the run's writers create and nothing of the user's beside it."""

from __future__ import annotations

from pathlib import Path

METRICS = "metrics.jsonl"  # rl/metrics_log.py
SUMMARY = "summary.json"  # rl/run_summary.py
CONFIG = "config.yaml"  # the run's config, in the run folder (as started) and in each checkpoint (as trained)
CONFIG_HISTORY = "config_history.jsonl"  # each resume's changes (rl/resume_policy.py)
CHECKPOINTS = "checkpoints"  # rl/checkpoint.py
LORA = "lora"  # the final diffusers-format LoRA
SAMPLES = "samples"  # logged image grids (rl/metrics_log.py)
WANDB = "wandb"  # wandb's offline runs


def set_aside(name: str, stamp: str) -> str:
    """The name a restart keeps an earlier run's file under: ``metrics.jsonl`` -> ``metrics.before-<stamp>.jsonl``."""
    path = Path(name)
    return f"{path.stem}.before-{stamp}{path.suffix}"


# the last two: what a crash in the middle of rewriting the log or the summary leaves
RUN_ENTRIES = (CHECKPOINTS, LORA, SAMPLES, WANDB, METRICS, SUMMARY, CONFIG, CONFIG_HISTORY,
               set_aside(METRICS, "*"), set_aside(SUMMARY, "*"), set_aside(CONFIG, "*"),
               "metrics.jsonl.tmp", f".{SUMMARY}.tmp")  # fmt: skip
