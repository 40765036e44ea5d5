"""The trainer's persistent side: the run folder, checkpoints, resume, the summary and the stop on a failed step.

A mixin of :class:`rl.trainer.GRPOTrainer` (docs/design.md section 8): it reads the trainer's accelerator, model,
optimizer, EMA, pruner, objective and prompt history, and keeps the loop in ``rl/trainer.py`` to the training
itself. The file formats and their checks live in ``rl/checkpoint.py``, ``rl/resume_policy.py`` and
``rl/run_summary.py``; this module only calls them at the right moments.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path

import yaml
from accelerate.utils import broadcast_object_list

from rl.checkpoint import (
    effective_resume_from,
    is_own_checkpoint,
    load_checkpoint,
    make_output_dir,
    must_clear_output_dir,
    resolve_resume,
    save_checkpoint,
)
from rl.distributed import PeerFailedError
from rl.lora import save_lora
from rl.metrics_log import MetricsAccumulator
from rl.resume_policy import check_restart, check_resumed_config, schedule_moved
from rl.run_files import CONFIG, METRICS, SUMMARY, set_aside
from rl.run_lock import OutputDirInUseError, clear_output_dir, lock_output_dir
from rl.run_summary import finished_summary, held_out_summary, write_summary
from rl.train_state import TrainState

logger = logging.getLogger("rl.trainer")

# what can stop a run at its folder, each a user error with its fix in the message (raised alike on every process)
FOLDER_REFUSALS = (
    OutputDirInUseError,
    FileExistsError,
    FileNotFoundError,
    NotADirectoryError,
    PermissionError,
    ValueError,
)


class TrainerPersistence:
    """Saving, resuming and summarising a :class:`rl.trainer.GRPOTrainer` run."""

    def prepare_output_dir(self) -> Path | None:
        """Make (or, with ``overwrite_output_dir``, clear) the run folder and check a resume against it; returns the
        checkpoint to resume (None: a fresh run). A fresh run or a branch writes its config.yaml now.

        The main process decides, holding the folder's lock (a live run's folder is never judged mid-checkpoint),
        and every process raises its verdict, so all stop together also where the folder is not shared.
        """
        cfg = self.config
        self.output_dir = Path(cfg.logging.output_dir)
        resume_from = effective_resume_from(
            self.output_dir, cfg.checkpoint.resume_from, cfg.logging.overwrite_output_dir
        )
        verdict = [("", "")]  # (the refusal's type, its message); none: go on
        if self.accelerator.is_main_process:
            try:
                make_output_dir(self.output_dir)
                lock_output_dir(self.output_dir)  # before anything is cleared or written
                if must_clear_output_dir(self.output_dir, resume_from, cfg.logging.overwrite_output_dir):
                    kept = clear_output_dir(self.output_dir)
                    logger.warning(
                        "overwrite_output_dir: cleared the run in %s%s, a fresh run starts there (a command that "
                        "relaunches a preemptible job must leave the flag out, or each relaunch clears the run)",
                        self.output_dir,
                        f" (kept what is not the run's: {', '.join(kept)})" if kept else "",
                    )
            except FOLDER_REFUSALS as error:
                verdict = [(type(error).__name__, str(error))]
            except OSError as error:  # a read-only filesystem, a busy network folder: named, and every process stops
                verdict = [("PermissionError", self.unwritable_output_dir(error))]
        self.share_folder_verdict(verdict)
        # once: resolving verifies the checkpoint's manifest (hashing every file), and three places need it
        resume_path = resolve_resume(resume_from, self.output_dir)
        if resume_path is not None:  # changes what the run is: an error; safe ones: logged (rl/resume_policy.py)
            changes = check_resumed_config(
                self.output_dir,
                resume_path,
                cfg.flat(),
                cfg.checkpoint.allow_config_change,
                self.accelerator.is_main_process,
            )
            for key, (old, value) in changes.items():
                self.info("resume changes %s: %r -> %r", key, old, value)
            moved = schedule_moved(changes, cfg.training.lr_schedule)
            if moved and self.accelerator.is_main_process:
                logger.warning(moved)
        own = resume_path is not None and is_own_checkpoint(resume_path, self.output_dir)
        verdict, finished = [("", "")], [None]
        if self.accelerator.is_main_process and not own:  # a fresh run, or a branch (started or started again)
            try:
                if resume_path is None and resume_from == "latest":  # the folder's run, with no checkpoint yet
                    finished[0] = check_restart(self.output_dir, cfg.flat(), cfg.checkpoint.allow_config_change)
                if finished[0] is None:
                    (self.output_dir / CONFIG).write_text(yaml.safe_dump(cfg.flat(), sort_keys=False))
            except (FileExistsError, ValueError) as error:  # named: the others wait for the verdict, not a hang
                verdict = [(type(error).__name__, str(error))]
            except OSError as error:  # a full disk: the others would otherwise wait for it at their first collective
                verdict = [("PermissionError", self.unwritable_output_dir(error))]
        self.share_folder_verdict(verdict)
        if self.accelerator.num_processes > 1:
            broadcast_object_list(finished)  # the main process's reading: every process reports or trains alike
        self.finished_without_checkpoint = finished[0]
        return resume_path

    def unwritable_output_dir(self, error: OSError) -> str:
        return f"cannot prepare output_dir {self.output_dir} ({error}): set --output_dir to a folder you can write to"

    def share_folder_verdict(self, verdict: list[tuple[str, str]]) -> None:
        """Every process raises the main process's verdict on the folder ((refusal type, message); empty: go on)."""
        if self.accelerator.num_processes > 1:
            broadcast_object_list(verdict)  # every process stops, not only the main one
        kind, message = verdict[0]
        if kind:
            raise {error.__name__: error for error in FOLDER_REFUSALS}[kind](message)

    def save(self, directory: Path) -> None:
        """Export the LoRA (EMA weights when enabled and ``save_ema``) in diffusers format; every process waits."""
        self.export_lora(directory)
        self.accelerator.wait_for_everyone()
        self.info("saved LoRA to %s", directory)

    def export_lora(self, directory: Path) -> None:
        """:meth:`save` without the wait: inside a checkpoint the processes agree on success afterwards instead."""
        use_ema = self.ema is not None and self.config.checkpoint.save_ema
        # the EMA's fp32 values themselves; else every process reads the LoRA whole (gathered when sharded)
        lora_state = self.ema.averaged_state_dict() if use_ema else self.lora.state_dict()
        save_lora(self.accelerator.unwrap_model(self.model), directory, self.accelerator.is_main_process, lora_state)

    def checkpoint_due(self) -> bool:
        """Every ``save_every`` steps, or ``save_every_minutes`` after the last save (agreed over processes)."""
        c = self.config.checkpoint
        by_steps = bool(c.save_every) and self.state.step % c.save_every == 0
        by_time = c.save_every_minutes > 0 and time.time() - self.last_save >= 60 * c.save_every_minutes
        return self.global_count(int(by_steps or by_time)) > 0

    def save_checkpoint(self) -> Path:
        """Write a full checkpoint of this step (rl/checkpoint.py: atomic, with the diffusers LoRA export)."""
        self.last_save, self.saved_step = time.time(), self.state.step
        with self.phase("checkpoint"):
            path = save_checkpoint(
                self.accelerator,
                self.output_dir,
                self.state.step,
                trainer_state=self.state_dict(),
                rank_state={
                    "metrics": self.metrics.state(),
                    "elapsed_s": time.time() - self.log.started,  # the log's clock (wall_s)
                    "budget_elapsed_s": time.time() - self.started,  # max_minutes' clock: from the launch
                },
                export_lora=self.export_lora,
                keep=self.config.checkpoint.save_total_limit,
                model=self.model,
                optimizer=self.optimizer,
                config=self.config.flat(),
            )
        return path

    def resume(self, path: Path | None) -> None:
        """Continue from checkpoint ``path`` (what ``resume_from`` resolved to; None: start fresh): weights,
        optimizer, EMA, probe, RNG, step (= data position), pending metrics and the wall clock; the metrics file is
        cut back to that step."""
        if path is None:
            if self.finished_without_checkpoint is not None:  # reported as it stands (train), log and summary kept
                return
            if self.config.checkpoint.resume_from:
                self.info("resume_from=%s: no checkpoint yet, starting fresh", self.config.checkpoint.resume_from)
                log, summary = self.output_dir / METRICS, self.output_dir / SUMMARY
                stamp = time.strftime("%Y%m%d-%H%M%S")
                if self.accelerator.is_main_process and log.is_file() and log.stat().st_size > 0:
                    kept = log.with_name(set_aside(METRICS, stamp))
                    shutil.copyfile(log, kept)  # the run it cannot resume is restarted, its log kept
                    logger.warning(
                        "no checkpoint to resume in %s: its earlier log is kept as %s", self.output_dir, kept
                    )
                if self.accelerator.is_main_process and summary.is_file():  # else a later resume of the new run
                    summary.rename(summary.with_name(set_aside(SUMMARY, stamp)))  # would report the old one
            self.log.resume(step=-1, elapsed_s=0.0)  # a fresh run in a used output_dir must not append to its log
            return
        trainer_state, rank_state = load_checkpoint(self.accelerator, path, self.model, self.optimizer)
        self.load_state_dict(trainer_state)
        self.metrics.load_state(rank_state.get("metrics", MetricsAccumulator().state()))
        # max_minutes budgets the whole run, each launch's setup included, not each resumed piece
        self.started -= rank_state.get("budget_elapsed_s", rank_state.get("elapsed_s", 0.0))
        finished = finished_summary(self.output_dir, self.state.step) is not None  # its final eval is not redone
        self.log.resume(self.state.step, rank_state.get("elapsed_s", 0.0), finished)
        self.saved_step = self.state.step
        self.info("resumed from %s at step %d", path, self.state.step)

    def load_finished_summary(self, summary: dict | None = None) -> bool:
        """Whether ``output_dir`` holds this run finished at or after the resumed step; if so its summary and final
        evaluation are loaded from ``summary.json`` (or taken as given: ``summary``, read once for every process)."""
        summary = summary or finished_summary(self.output_dir, self.state.step)
        if summary is None:
            return False
        self.summary, self.final_eval = summary, summary["final"]
        self.info(
            "%s holds this run, finished at step %d (summary.json): nothing to do. A new run: another output_dir "
            "(--output_dir) or --overwrite_output_dir true --resume_from ''",
            self.output_dir,
            summary["steps"],
        )
        return True

    def write_summary(self) -> dict:
        """Write ``<output_dir>/summary.json`` (rl/run_summary.py): base vs final held-out scores."""
        e = self.config.eval
        self.summary = held_out_summary(
            self.state.step,
            self.state.images_seen,
            (time.time() - self.started) / 60,
            e.eval_prompts,
            len(self.eval_prompts.eval_subset(e.final_eval_num_prompts)),
            e.final_images_per_prompt,
            self.base_eval,
            self.final_eval,
        )
        if self.accelerator.is_main_process:
            write_summary(self.output_dir, self.summary)
        return self.summary

    def state_dict(self) -> dict:
        """Trainer state beyond accelerate's (model, optimizer): counters, the EMA and the base evaluation."""
        return {
            "state": dataclasses.asdict(self.state),
            "ema": self.ema.state_dict() if self.ema else None,
            "base_eval": self.base_eval,
            "base_eval_setting": self.base_eval_setting,
            "pruning": self.pruner.state_dict() if self.pruner is not None else None,
            "objective": self.objective.state_dict(),
            "prompt_history": self.prompt_history.state_dict() if self.prompt_history is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        self.state = TrainState(**state["state"])
        self.base_eval = state.get("base_eval", {})
        self.base_eval_setting = state.get("base_eval_setting")  # None: a checkpoint from before it was kept
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        if self.pruner is not None and state.get("pruning") is not None:
            self.pruner.load_state_dict(state["pruning"])
        self.objective.load_state_dict(state.get("objective", {}))
        if self.prompt_history is not None and state.get("prompt_history") is not None:
            self.prompt_history.load_state_dict(state["prompt_history"])

    def stop_if_the_step_failed(
        self,
        failure: Exception | None,
        step_start: tuple[TrainState, dict] | None = None,
        what: str | None = None,
    ) -> None:
        """Every process calls it: if the step failed on any (a reward that stops the run), all checkpoint the steps
        done, then the failed ones raise their error and the others say which process failed. ``step_start``: the
        counters and pending metrics at the step's start, so the checkpoint holds none of the failed step's work,
        which the resumed run does again (else its calls and images would count twice). ``what`` failed, for the
        others' message (default: the step)."""
        failed = self.global_count(int(failure is not None))
        if not failed:
            return
        if step_start is not None:
            self.state = step_start[0]
            self.metrics.rewind(step_start[1])
        failing = what or f"step {self.state.step + 1}"
        self.info(
            "%s failed on %d process(es): checkpointing the %d steps done first", failing, failed, self.state.step
        )
        self.save_checkpoint()
        if failure is not None:
            raise failure
        raise PeerFailedError(
            f"{failing} failed on another process (its message says why); the {self.state.step} steps done are "
            f"checkpointed in {self.output_dir / 'checkpoints'}: fix the cause, then continue with {self.relaunch}"
        )

    @property
    def relaunch(self) -> str:
        """How a user continues this run from its newest checkpoint."""
        command = "the same command"
        if self.config.logging.overwrite_output_dir:  # it would clear the run
            command += " without --overwrite_output_dir"
        return command + ("" if self.config.checkpoint.resume_from else " plus --resume_from latest")
