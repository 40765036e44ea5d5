"""What a resumed run may change: the config it resumes with against the one its checkpoint was trained with.

Budgets, evaluation cadence, logging and checkpointing may change (:data:`RESUME_SAFE_KEYS`); any other key
changes what the run is, so resuming with another value is an error unless ``allow_config_change`` says
otherwise. A checkpoint holds the config it was trained with (``config.yaml``; an older one without it is
compared with its run folder's), so after an allowed change the next resume is held to the changed values. Each
resume appends its changes to ``config_history.jsonl``; the run's ``config.yaml`` stays as it started.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from rl.config import RunConfig
from rl.run_files import CONFIG, CONFIG_HISTORY, set_aside
from rl.run_summary import finished_summary

# Keys a resumed run may change: budgets, evaluation cadence, logging and checkpointing. Any other key changes
# what the run is (model, data, reward, sampler, objective, optimiser, LoRA, pruning), so resuming with another
# value is refused unless --allow_config_change says otherwise (check_resumed_config). A key added later must default
# to the behaviour before it: a run that started without it resumes at that default (resume_changes).
RESUME_SAFE_KEYS = frozenset(
    {"max_steps", "max_minutes", "max_flux_compute", "max_images_denoised", "reward_workers", "reward_overlap", "reward_timeout_s", "eval_every",
     "eval_num_prompts", "eval_images_per_prompt", "final_eval_num_prompts", "final_eval_images_per_prompt",
     "eval_before_training", "log_every", "wandb_mode", "wandb_project", "run_name", "progress_bar", "output_dir", "overwrite_output_dir",
     "save_every", "save_every_minutes", "save_total_limit", "resume_from", "save_lora", "save_ema", "allow_config_change",
     "distributed_timeout_s"}
)  # fmt: skip


# Of those, the keys that change nothing a run computes (logging, checkpoint cadence, how rewards are scheduled:
# results stay bit-identical): an ablation keeps a finished run when only these differ (result_changes).
RESULT_NEUTRAL_KEYS = frozenset(
    {"reward_workers", "reward_overlap", "reward_timeout_s", "log_every", "wandb_mode", "wandb_project", "run_name", "progress_bar",
     "output_dir", "overwrite_output_dir", "save_every", "save_every_minutes", "save_total_limit", "resume_from",
     "save_lora", "allow_config_change", "distributed_timeout_s"}
)  # fmt: skip


def resume_changes(
    old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None
) -> tuple[dict, dict]:
    """``(safe, unsafe)``: ``key -> (old, new)`` of every key whose value differs between two flat configs.

    A key the old config lacks (the run started before the key existed) is unchanged while the new value is the
    key's default in ``defaults``: a key is added with the default that keeps the behaviour it did not have.
    """
    defaults = defaults or {}
    changed = {
        k: (old.get(k), new.get(k))
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k) and not (k not in old and k in defaults and new.get(k) == defaults[k])
    }
    safe = {k: v for k, v in changed.items() if k in RESUME_SAFE_KEYS}
    return safe, {k: v for k, v in changed.items() if k not in RESUME_SAFE_KEYS}


def check_resumed_config(
    output_dir: Path, checkpoint: Path, config: dict[str, Any], allow_change: bool, record: bool
) -> dict:
    """Compare ``config`` (flat) with the one ``checkpoint`` was trained with; ``key -> (old, new)`` of every change.

    Args:
        output_dir: the run folder the resumed run writes to (its history is appended there).
        checkpoint: the checkpoint resumed from (of this folder's run, or of another one: a branch).
        config: the resuming run's flat config.
        allow_change: accept changes of keys outside :data:`RESUME_SAFE_KEYS`.
        record: append the changes to ``config_history.jsonl`` (the main process does).

    Raises:
        ValueError: changes outside :data:`RESUME_SAFE_KEYS` without ``allow_change``, each with its old and new value;
            no config to compare with, without ``allow_change``.
    """
    trained = checkpoint / CONFIG if (checkpoint / CONFIG).is_file() else checkpoint.parent.parent / CONFIG
    if not trained.is_file() and not allow_change:
        raise ValueError(
            f"resuming {checkpoint}, which has no {CONFIG} (nor has its run folder), so this config cannot be checked "
            "against the one it was trained with: put the run's config.yaml back, or pass --allow_config_change true "
            "to resume with this one as given"
        )
    safe, unsafe = changes_from(trained, config)
    if unsafe and not allow_change:
        listed = "; ".join(f"{k}: {old!r} -> {value!r}" for k, (old, value) in unsafe.items())
        raise ValueError(
            f"resuming {checkpoint} with a config that changes what the run is ({listed}). Resume with the run's own "
            "values, start a new output_dir, or pass --allow_config_change true."
        )
    changes = {**safe, **unsafe}
    if record:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "changes": {k: list(v) for k, v in changes.items()}}
        with (output_dir / CONFIG_HISTORY).open("a") as history:
            history.write(json.dumps(entry) + "\n")
    return changes


def check_restart(output_dir: Path, config: dict[str, Any], allow_change: bool) -> dict | None:
    """Under ``resume_from: latest``, the run in ``output_dir`` has no checkpoint (it stopped before its first save,
    or saves none) and starts again from step 0. Returns its summary if it finished already with this config (its
    summary.json stands and nothing that changes results differs): it is reported instead of trained again.
    Otherwise a config.yaml that differs is copied aside (``config.before-<time>.yaml``) before the restart
    overwrites it.

    Raises:
        FileExistsError: ``config`` changes what the folder's run is (outside :data:`RESUME_SAFE_KEYS`) without
            ``allow_change``: restarting would mix two runs' logs and files in one folder.
        ValueError: the folder's config.yaml or summary.json is damaged (named).
    """
    safe, unsafe = changes_to_run(output_dir, config)
    if unsafe and not allow_change:
        listed = "; ".join(f"{k}: {old!r} -> {value!r}" for k, (old, value) in unsafe.items())
        raise FileExistsError(
            f"output_dir {output_dir} holds a run with no checkpoint to resume, and this config changes what that "
            f"run is ({listed}): restarting it would mix two runs in one folder. Relaunch with the run's own values, "
            "start elsewhere with --output_dir <new folder>, or clear it with --overwrite_output_dir true."
        )
    known = (output_dir / CONFIG).is_file()  # without it the summary may be any run's
    summary = finished_summary(output_dir, 0) if known else None
    if summary is not None and not changing_results({**safe, **unsafe}):
        return summary
    if safe or unsafe:  # a copy: the folder keeps a config.yaml whatever stops the restart before it writes its own
        original = output_dir / CONFIG
        shutil.copyfile(original, original.with_name(set_aside(CONFIG, time.strftime("%Y%m%d-%H%M%S"))))
    return None


def schedule_moved(changes: dict[str, tuple[Any, Any]], lr_schedule: str) -> str | None:
    """A warning when a resume's new ``max_steps`` moves the end of a decaying learning-rate schedule (the rate
    decays to 0 at ``max_steps``, so it jumps at the resumed step and the run matches no uninterrupted one of
    either length); None otherwise."""
    if "max_steps" not in changes or lr_schedule == "constant":
        return None
    old, new = changes["max_steps"]
    return (
        f"max_steps {old} -> {new} moves the end of the {lr_schedule} learning-rate schedule: from the resumed step "
        f"the rate follows a decay to 0 at step {new}, so this run equals no uninterrupted run"
    )


def changes_to_run(output_dir: Path, config: dict[str, Any]) -> tuple[dict, dict]:
    """:func:`resume_changes` between the run in ``output_dir`` (its config.yaml; none: no changes) and ``config``
    (flat)."""
    return changes_from(output_dir / CONFIG, config)


def changes_from(original: Path, config: dict[str, Any]) -> tuple[dict, dict]:
    """:func:`resume_changes` between the flat config in file ``original`` (none: no changes) and ``config``."""
    if not original.is_file():
        return {}, {}
    try:
        recorded = yaml.safe_load(original.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(
            f"{original}, the config the run was started with, is damaged ({type(error).__name__}): restore it, or "
            "delete it to go on with this config unchecked"
        ) from None
    if not isinstance(recorded, dict):
        raise ValueError(f"{original}, the config the run was started with, holds no mapping: restore it")
    new = yaml.safe_load(yaml.safe_dump(config))  # the same normalisation as the file's
    defaults = yaml.safe_load(yaml.safe_dump(RunConfig().flat()))  # a key added since the run began: its default
    return resume_changes(recorded, new, defaults)


def result_changes(output_dir: Path, config: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``key -> (old, new)`` of every change between the run in ``output_dir`` and ``config`` that can change its
    results (any key outside :data:`RESULT_NEUTRAL_KEYS`, budgets included)."""
    safe, unsafe = changes_to_run(output_dir, config)
    return changing_results({**safe, **unsafe})


def changing_results(changes: dict[str, tuple[Any, Any]]) -> dict[str, tuple[Any, Any]]:
    """Those of ``changes`` that can change a run's results (keys outside :data:`RESULT_NEUTRAL_KEYS`)."""
    return {k: v for k, v in changes.items() if k not in RESULT_NEUTRAL_KEYS}
