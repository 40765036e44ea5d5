"""Checkpoints that resume a run exactly, written atomically, each with a diffusers-format LoRA export.

Layout of ``<output_dir>/checkpoints/step-<8 digits>/``::

    model.safetensors, optimizer.bin, random_states_<rank>.pkl   accelerate's save_state: the LoRA only (not the
                                                                frozen base), AdamW, every process's RNG states
    pytorch_model/                                             instead of the two files above under DeepSpeed
    model.safetensors, optimizer.pt                            under FSDP: the LoRA and AdamW gathered whole
    trainer_state.pt                                           GRPOTrainer.state_dict(): counters (= data
                                                                position), EMA, probe and online buffer, extras
    rank_<rank>.pt                                             per-process state: metrics accumulated since the
                                                                last log, wall-clock time so far
    lora/pytorch_lora_weights.safetensors                      the LoRA (EMA weights when enabled), loadable with
                                                                FluxPipeline.load_lora_weights
    manifest.json                                              every other file's size and SHA-256, written last:
                                                                resume verifies it (:func:`checkpoint_damage`)

Atomicity: everything is written to ``checkpoints/.tmp-step-<n>`` and renamed to ``step-<n>`` only when every
process has finished writing (a rename within one filesystem is atomic), so a ``step-*`` folder is always
complete and "latest" (the highest-numbered one) is never a half-written checkpoint; a crash mid-save leaves a
``.tmp-*`` folder that the next save removes. A failed write (a full disk) removes its ``.tmp-*`` folder and
raises :class:`CheckpointWriteError`. With several nodes, ``output_dir`` must be on a shared filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.checkpointing import load_accelerator_state, save_accelerator_state
from accelerate.utils import SAFE_WEIGHTS_NAME
from accelerate.utils.other import TORCH_SAFE_GLOBALS
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from rl.distributed import is_deepspeed, is_fsdp
from rl.run_files import CHECKPOINTS, CONFIG, LORA, METRICS, SUMMARY

logger = logging.getLogger(__name__)

TRAINER_STATE = "trainer_state.pt"
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``.tmp-*`` folders of interrupted saves excluded)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    """Record every file of a checkpoint folder (relative path -> size and SHA-256) in ``manifest.json``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    entries = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (folder / MANIFEST).write_text(json.dumps(entries, indent=1))


def checkpoint_damage(folder: Path) -> list[str]:
    """What is wrong with a checkpoint against its manifest (missing, resized or changed files); [] if intact.

    Checkpoints written before manifests existed have none and are taken as they are.
    """
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return []
    try:
        entries = json.loads(manifest.read_text())
    except json.JSONDecodeError:
        return [f"{MANIFEST} is not JSON"]
    problems = []
    for name, expected in entries.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != expected["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, not {expected['size']}")
        elif _sha256(path) != expected["sha256"]:
            problems.append(f"{name} changed (SHA-256 differs)")
    return problems


def resolve_resume(resume_from: str | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder ``resume_from`` names: ``"latest"`` (None when the run has none yet, so one command
    both starts and resumes a preemptible job) or a path to a ``step-*`` folder. None/empty: no resume.

    Raises:
        FileNotFoundError: a path that is not a checkpoint folder (named in the message).
        ValueError: the checkpoint named is damaged, or with ``latest`` every checkpoint of the run is.
    """
    if not resume_from:
        return None
    if resume_from == "latest":  # the newest intact one: a damaged latest is named and skipped
        checkpoints = list_checkpoints(output_dir)
        for path in reversed(checkpoints):
            damage = checkpoint_damage(path)
            if not damage:
                return path
            logger.warning("checkpoint %s is damaged (%s): trying the one before it", path, "; ".join(damage))
        if checkpoints:  # not "none yet": starting afresh would set the run aside without a word
            raise ValueError(
                f"every checkpoint in {Path(output_dir) / CHECKPOINTS} is damaged (each is named above): restore one "
                "(a copy, a backup) or start the run again with --overwrite_output_dir true"
            )
        return None
    path = checkpoint_folder(resume_from, output_dir)
    damage = checkpoint_damage(path)
    if damage:
        raise ValueError(f"checkpoint {path} is damaged ({'; '.join(damage)}): resume from another one or 'latest'")
    return path


def checkpoint_folder(resume_from: str, output_dir: str | Path) -> Path:
    """``resume_from`` as a checkpoint folder.

    Raises:
        FileNotFoundError: it is not one (no trainer state in it), naming it and what to pass.
    """
    path = Path(resume_from)
    if not (path / TRAINER_STATE).is_file():
        problem = f"no {TRAINER_STATE} in it" if path.exists() else "it does not exist"
        raise FileNotFoundError(
            f"resume_from={resume_from!r} is not a checkpoint folder ({problem}); pass 'latest' or "
            f"a {Path(output_dir) / CHECKPOINTS / 'step-XXXXXXXX'} folder"
        )
    return path


def branch_origin(output_dir: str | Path) -> Path | None:
    """The checkpoint of another folder this folder's run branched from (its ``config.yaml``'s ``resume_from``),
    resolved; None for a run started fresh."""
    config = Path(output_dir) / CONFIG
    origin = (yaml.safe_load(config.read_text()) or {}).get("resume_from") if config.is_file() else None
    return None if origin in (None, "", "latest") else Path(origin).resolve()


def effective_resume_from(output_dir: str | Path, resume_from: str | None, overwrite: bool = False) -> str | None:
    """What a run resumes: ``resume_from``, except that the command which branched this folder from another
    run's checkpoint, run again (a preemptible job's relaunch), continues the branch from its newest checkpoint.
    With ``overwrite`` the command means what it says: the folder is cleared and the branch starts again from
    ``resume_from`` (as ``latest`` with ``overwrite`` starts afresh), never from nothing."""
    if overwrite:
        return resume_from
    again = bool(resume_from) and resume_from != "latest" and branch_origin(output_dir) == Path(resume_from).resolve()
    return "latest" if again and list_checkpoints(output_dir) else resume_from


def is_own_checkpoint(path: Path, output_dir: str | Path) -> bool:
    """Whether checkpoint ``path`` is one of ``output_dir``'s own (also through a symlinked ``checkpoints/``)."""
    return path.resolve().parent == (Path(output_dir) / CHECKPOINTS).resolve()


def _step_number(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def holds_a_run(output_dir: str | Path) -> bool:
    """Whether ``output_dir`` holds a run's work: logged steps, a summary or checkpoints."""
    output_dir = Path(output_dir)
    log = output_dir / METRICS
    return (
        (log.is_file() and log.stat().st_size > 0)
        or (output_dir / SUMMARY).is_file()
        or bool(list_checkpoints(output_dir))
    )


def must_clear_output_dir(output_dir: str | Path, resume_from: str | None, overwrite: bool) -> bool:
    """Whether a run must clear ``output_dir`` first (it holds another run and ``overwrite`` says so).

    Continuing the folder's own run (``latest``, or one of its checkpoints) keeps it: its log is cut back to the
    checkpoint's step and goes on; ``overwrite`` with ``latest`` clears it instead (the flag is explicit,
    ``latest`` the shipped configs' default), so the run starts afresh. A checkpoint of another folder starts a
    branch, which like a fresh run needs a folder holding no run (or ``overwrite``), unless it is the checkpoint
    this folder's run branched from (the same command again, before the branch's first checkpoint). Called with
    :func:`effective_resume_from`'s answer, by the main process holding the folder's lock.

    Raises:
        FileExistsError: a fresh run or a branch in a folder holding another run, naming the folder and the three
            ways on; ``overwrite`` with a checkpoint inside the folder (it would clear what it resumes); a resume
            from one of the folder's checkpoints while later ones exist (they would stay for ``latest`` beside a
            log cut back below them), naming them.
        FileNotFoundError: ``resume_from`` names no checkpoint folder (before anything is cleared).
    """
    output_dir = Path(output_dir)
    named = checkpoint_folder(resume_from, output_dir).resolve() if resume_from and resume_from != "latest" else None
    if not holds_a_run(output_dir):
        return False
    if resume_from == "latest":  # an explicit overwrite wins over the shipped configs' latest: cleared, a fresh run
        return overwrite
    if named is not None and overwrite and output_dir.resolve() in named.parents:
        raise FileExistsError(
            f"overwrite_output_dir would clear {output_dir}, which holds the checkpoint resume_from={resume_from!r} "
            "continues: drop --overwrite_output_dir to continue it, or branch from it into a new --output_dir"
        )
    if named is not None and is_own_checkpoint(named, output_dir):
        step = _step_number(named)
        later = [path.name for path in list_checkpoints(output_dir) if step is None or _step_number(path) > step]
        if later:
            raise FileExistsError(
                f"resume_from={resume_from!r} goes back to {named.name}, but {output_dir} holds later checkpoints "
                f"({', '.join(later)}): a run from {named.name} would cut the log back below them and leave them for "
                "'latest'. Continue the newest with --resume_from latest, branch from this one into a new "
                "--output_dir, or delete the later checkpoints first."
            )
        return False
    if named is not None and named == branch_origin(output_dir) and not overwrite:
        return False  # the branch's own start again: its log is cut back to the branch point
    if not overwrite:
        started = "a branch of another run" if resume_from else "a fresh run"
        raise FileExistsError(
            f"output_dir {output_dir} holds another run (metrics.jsonl, summary.json or checkpoints/), and this is "
            f"{started}. Continue the folder's own run with --resume_from latest, start elsewhere with "
            "--output_dir <new folder>, or clear it first with --overwrite_output_dir true."
        )
    return True


def make_output_dir(output_dir: Path) -> None:
    """Create the run folder (the main process does).

    Raises:
        NotADirectoryError: ``output_dir`` is a file.
        PermissionError: it cannot be created (no permission, a read-only filesystem), naming it.
    """
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(
            f"output_dir {output_dir} is a file, not a folder: set --output_dir to a folder (created when missing)"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PermissionError(
            f"cannot create output_dir {output_dir} ({error.strerror or error}): set --output_dir to a folder you "
            "can write to"
        ) from error


def register_lora_only_hooks(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """Make ``save_state`` / ``load_state`` store only the trainable (LoRA) weights of ``model``, not the frozen base.

    FLUX.1-dev's base is 24 GB in bf16 and never changes, so a checkpoint holds only what training changed;
    loading checks that every trainable weight is in the file (strictly: nothing silently stays at its init).
    Under DeepSpeed the engine saves itself (with ``exclude_frozen_parameters``, see :func:`save_checkpoint`).
    """
    # names as accelerate saves them: of the unwrapped model (a DDP wrapper would prefix every name "module.")
    trainable = {name for name, param in accelerator.unwrap_model(model).named_parameters() if param.requires_grad}

    def save_hook(models, weights, output_dir):
        for i, state in enumerate(weights):
            weights[i] = {k: v for k, v in state.items() if k in trainable}

    def load_hook(models, input_dir):
        if not models:  # DeepSpeed loaded its engine already
            return
        (only,) = models
        path = Path(input_dir) / SAFE_WEIGHTS_NAME
        state = load_file(path)
        missing, unexpected = accelerator.unwrap_model(only).load_state_dict(state, strict=False)
        if unexpected or trainable - set(state):
            raise ValueError(
                f"{path} does not match the model's LoRA: unexpected keys {sorted(unexpected)[:3]}, missing "
                f"trainable keys {sorted(trainable - set(state))[:3]} (same lora_rank / lora_target_modules?)"
            )
        models.clear()  # loaded here; accelerate must not look for the full model

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (a full disk, a quota); the run's earlier checkpoints are untouched."""


# How torch.save's C++ writer reports a failed write (a full disk), without an errno: "[enforce fail at
# inline_container.cc:672] . unexpected pos 576 vs 534", "PytorchStreamWriter failed writing file data/0: file write
# failed", or at the end of the file "basic_ios::clear: iostream error".
_TORCH_WRITE_FAILURES = ("inline_container", "PytorchStreamWriter", "iostream error")


def _is_write_failure(error: Exception) -> bool:
    """Whether ``error`` is a failed write: an ``OSError``, or torch's or safetensors' writer failing."""
    text = str(error)
    return (
        isinstance(error, OSError)
        or (isinstance(error, RuntimeError) and any(marker in text for marker in _TORCH_WRITE_FAILURES))
        or (isinstance(error, SafetensorError) and "Error while serializing" in text)
    )


def _write_error(error: Exception, final: Path) -> CheckpointWriteError:
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error)
    other_os_error = isinstance(error, OSError) and not full  # a permission, a missing mount: its errno says which
    what = "the disk is full" if full else "a write failed" if other_os_error else "a write failed, as on a full disk"
    fix = "Fix that" if other_os_error else "Free disk space (or lower save_total_limit)"
    existing = next(folder for folder in final.parents if folder.exists())  # checkpoints/ may not be made yet
    free = shutil.disk_usage(existing).free / 2**20
    return CheckpointWriteError(
        f"could not write checkpoint {final}: {what} ({type(error).__name__}: {(str(error) or '?').splitlines()[0]}; "
        f"{free:.0f} MiB free now). The partial checkpoint was removed and the earlier checkpoints in "
        f"{final.parent} are intact. {fix} or use an output_dir elsewhere, then continue with --resume_from latest."
    )


def _agree(accelerator: Accelerator, failure: Exception | None, final: Path, tmp: Path) -> None:
    """Raise on every process if any failed the phase just run (a collective: every process calls it)."""
    failed = [accelerator.process_index] if failure is not None else []
    if accelerator.num_processes > 1:
        flags = accelerator.gather(torch.tensor([int(failure is not None)], device=accelerator.device))
        failed = flags.nonzero().flatten().tolist()
    if not failed:
        return
    shutil.rmtree(tmp, ignore_errors=True)  # never used (not renamed), but it holds the disk space
    if failure is None:
        raise CheckpointWriteError(
            f"could not write checkpoint {final}: process {', '.join(map(str, failed))} failed (its own message says "
            f"why). The partial checkpoint was removed and the earlier checkpoints in {final.parent} are intact."
        )
    if _is_write_failure(failure):
        raise _write_error(failure, final) from failure
    raise failure


class _DeferredWrites:
    """DeepSpeed's checkpoint engine with its writes' failures remembered instead of raised (the first one)."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.failure: Exception | None = None

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def _guard(self, write: Callable, *args, **kwargs):
        try:
            return write(*args, **kwargs)
        except Exception as error:  # a full disk on this process: the others still wait in the save's collectives
            self.failure = self.failure or error
            return None

    def makedirs(self, *args, **kwargs):
        return self._guard(self.inner.makedirs, *args, **kwargs)

    def save(self, *args, **kwargs):
        return self._guard(self.inner.save, *args, **kwargs)

    def commit(self, *args, **kwargs):
        return self._guard(self.inner.commit, *args, **kwargs)

    def raise_first(self) -> None:
        if self.failure is not None:
            raise self.failure


@contextlib.contextmanager
def deferred_write_failures(engine) -> Iterator[_DeferredWrites]:
    """Within the block, ``engine``'s (a ``DeepSpeedEngine``'s) checkpoint writes never raise: a failed one is
    kept for :meth:`_DeferredWrites.raise_first`. DeepSpeed's ``save_checkpoint`` ends in a barrier; a process
    whose write raised would leave it early and the others would wait there until ``distributed_timeout_s``."""
    deferred = _DeferredWrites(engine.checkpoint_engine)
    engine.checkpoint_engine = deferred
    try:
        yield deferred
    finally:
        engine.checkpoint_engine = deferred.inner


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    trainer_state: dict,
    rank_state: dict,
    export_lora: Callable[[Path], None],
    keep: int = 0,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    config: dict | None = None,
) -> Path:
    """Write a checkpoint atomically (a collective call: every process makes it). Returns its folder.

    Args:
        accelerator: the run's accelerator (its prepared model and optimizer are saved).
        output_dir: the run folder; the checkpoint goes to ``<output_dir>/checkpoints/step-<step>``.
        step: the GRPO step just completed.
        trainer_state: process-independent state (``GRPOTrainer.state_dict()``), written by the main process.
        rank_state: this process's own state, written by every process.
        export_lora: called by every process with the ``lora`` folder to write the diffusers export into, in a phase
            of its own that every process enters only once all wrote the rest: it may gather (FSDP, ZeRO-3), and
            its collectives come before any write of its own that can fail.
        keep: keep only this one and the ``keep - 1`` newest before it (0: all).
        model, optimizer: the prepared ones; needed under FSDP (:func:`save_fsdp_state`).
        config: the run's flat config as it trained to this step (``config.yaml``: what a resume from here is
            compared with, also after a resume that was allowed to change it).

    Raises:
        CheckpointWriteError: a write failed (a full disk, a quota); the partial folder is removed and the earlier
            checkpoints are untouched. Every process raises, the ones that did not fail naming those that did:
            the processes agree on success after each phase instead of waiting at a barrier (DeepSpeed's own
            collective save holds a failed write until it is through: :func:`deferred_write_failures`).
    """
    root = Path(output_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{final.name}"

    def prepare() -> None:
        if accelerator.is_main_process:
            for stale in root.glob(".tmp-*"):  # interrupted saves
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)

    def write() -> None:
        if is_fsdp(accelerator):
            save_fsdp_state(accelerator, model, optimizer, tmp)
        elif is_deepspeed(accelerator):
            # DeepSpeed's save is collective (barriers, ZeRO-3 gathers): a write failing inside it is held until
            # the save is through on every process, then raised, so the agreement below sees it at once
            with deferred_write_failures(model) as deferred:
                accelerator.save_state(str(tmp), exclude_frozen_parameters=True, save_latest=False)
            deferred.raise_first()
        else:
            accelerator.save_state(str(tmp))
        torch.save(rank_state, tmp / f"rank_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            torch.save(trainer_state, tmp / TRAINER_STATE)
            if config is not None:
                (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))

    def export() -> None:  # its own phase: under FSDP and ZeRO-3 the export gathers the LoRA (a collective), which a
        export_lora(tmp / LORA)  # process whose own write failed must not skip while the others wait in it

    def seal() -> None:
        if accelerator.is_main_process:
            write_manifest(tmp)  # last: a checkpoint whose files no longer match it is damaged

    for phase in (prepare, write, export, seal):
        failure = None
        try:
            phase()
        except Exception as error:  # every process must reach the agreement below, the failed one included
            failure = error
        _agree(accelerator, failure, final, tmp)
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again after a resume: replace it, never half of it
            old = root / f".tmp-old-{final.name}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
        if keep > 0:
            # only ones older than this save go: a later one is a damaged latest that a resume fell back from
            # (it counts as newer, so deleting by rank would keep it and delete the intact ones), replaced when
            # the run reaches its step
            older = [path for path in list_checkpoints(output_dir) if _step_number(path) < step]
            for stale in older[: max(len(older) - (keep - 1), 0)]:  # renamed first: a kill mid-delete leaves no
                gone = root / f".tmp-stale-{stale.name}"  # husk that passes for a checkpoint (prepare() removes it)
                stale.rename(gone)
                shutil.rmtree(gone)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(
    accelerator: Accelerator,
    path: str | Path,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> tuple[dict, dict]:
    """Restore accelerate's state (LoRA, optimizer, RNG) from ``path``; return ``(trainer_state, rank_state)``.

    A process without a saved per-process state (the run resumes on more processes) starts it empty.
    ``model``, ``optimizer``: the prepared ones; needed under FSDP (:func:`load_fsdp_state`).
    """
    path = Path(path)
    refuse_code(path)  # before any library reads a file of it: DeepSpeed's loader would run what a pickle asks
    try:
        if is_fsdp(accelerator):
            load_fsdp_state(accelerator, model, optimizer, path)
        else:
            extra = {"load_module_strict": False} if is_deepspeed(accelerator) else {}
            accelerator.load_state(str(path), **extra)
        trainer_state = load_state_file(path / TRAINER_STATE)
        rank_file = path / f"rank_{accelerator.process_index}.pt"
        rank_state = load_state_file(rank_file) if rank_file.is_file() else {}
    except Exception as error:
        if unchecked(path, error):
            raise unreadable(path, error) from error
        raise
    return trainer_state, rank_state


def unchecked(folder: Path, error: Exception) -> bool:
    """Whether ``error`` loading checkpoint ``folder`` may be a damaged file: the folder has no manifest (its files
    were never checked) and the error is not the machine's (out of memory). Verified files fail for other reasons,
    which keep their own error."""
    return not (folder / MANIFEST).is_file() and not isinstance(error, torch.OutOfMemoryError)


def unreadable(folder: Path, error: Exception, name: str | None = None) -> ValueError:
    """The error naming checkpoint ``folder`` (file ``name`` of it, when known) that an unchecked file failed."""
    what = f"{name} of checkpoint {folder}" if name else f"checkpoint {folder}"
    return ValueError(
        f"{what} cannot be read (it has no {MANIFEST}, so its files were not checked): {type(error).__name__}: "
        f"{error}. Resume from another checkpoint (--resume_from <its folder>)"
    )


def refuse_code(folder: Path) -> None:
    """Load every pickled file of checkpoint ``folder`` as :func:`load_state_file` does (memory-mapped), so a file
    that asks for anything beyond tensors, plain values and :func:`library_globals` is refused, named, before a
    library reads it: DeepSpeed loads its own files with ``weights_only=False``, which would run what they ask.

    The trainer writes no links, and a linked folder would hide its files from this walk: a link is refused too.

    Raises:
        ValueError: naming the first such file (or link) and what it asks for.
    """
    allowed = library_globals(deepspeed=(folder / "pytorch_model").is_dir())
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise ValueError(
                f"{path} is a link, which this trainer never writes into a checkpoint (it was tampered with); "
                "refusing to load it. Resume from another checkpoint."
            )
        if path.suffix in PICKLED and path.is_file():
            try:
                load_state_file(path, allowed, mmap=zipfile.is_zipfile(path))
            except ValueError:  # what it asks for, named by load_state_file
                raise
            except Exception as error:  # truncated or not a torch file: named here, not by the library
                if unchecked(folder, error):
                    raise unreadable(folder, error, str(path.relative_to(folder))) from error
                raise


PICKLED = (".pt", ".pkl", ".bin")  # torch.save's files (accelerate's and DeepSpeed's names); tensors: safetensors


def library_globals(deepspeed: bool) -> list:
    """What the libraries' own checkpoint files hold besides tensors: numpy's RNG-state arrays (the list
    accelerate's loader allows, with the dtypes older accelerate releases left out of it) and, with ``deepspeed``,
    the records of DeepSpeed's optimizer state (classes and an enum whose construction runs nothing else; read off
    ZeRO-2 and ZeRO-3 checkpoints)."""
    allowed = [*TORCH_SAFE_GLOBALS, np.dtype, type(np.dtype(np.uint32))]
    if deepspeed:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [fragment_address, ZeroStageEnum, LossScaler, DynamicLossScaler]
    return allowed


def load_state_file(path: Path, allowed: list | tuple = (), mmap: bool = False) -> dict:
    """A trainer or per-process state file, loaded with ``weights_only=True``: tensors and plain containers (and
    the classes ``allowed``) only, so a crafted checkpoint cannot run code when a run resumes from it.

    Raises:
        ValueError: the file holds anything else (named, with the reason); it was not written by this trainer.
    """
    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # name what the file asks for, not torch's advice to load it unsafely
        blocked = re.search(r"GLOBAL (\S+)", str(error))
        asks = f" (it asks for {blocked.group(1)})" if blocked else ""
        raise ValueError(
            f"{path} holds objects other than tensors and plain values{asks}, so it was not written by this trainer "
            "(or was tampered with); refusing to load it. Resume from another checkpoint."
        ) from None


FSDP_OPTIMIZER = "optimizer.pt"


def _fsdp_options(**kwargs) -> StateDictOptions:
    # whole tensors (gathered from every process's slice), the trainable ones only: the LoRA, never the base
    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kwargs)


def save_fsdp_state(accelerator: Accelerator, model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Under FSDP: the LoRA and its optimizer state gathered whole (the main process writes them) and every
    process's RNG states; the frozen base, which accelerate's FSDP saving would write in full, is left out.

    A collective call. The files do not depend on the number of processes.
    """
    options = _fsdp_options(cpu_offload=True)  # whole tensors on the main process only, on the CPU
    lora = get_model_state_dict(model, options=options)
    moments = get_optimizer_state_dict(model, _inner(optimizer), options=options)
    if accelerator.is_main_process:
        save_file({k: v.contiguous() for k, v in lora.items()}, folder / SAFE_WEIGHTS_NAME)
        torch.save(moments, folder / FSDP_OPTIMIZER)
    save_accelerator_state(str(folder), [], [], [], [], accelerator.process_index, accelerator.step)  # RNG only


def load_fsdp_state(accelerator: Accelerator, model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Restore what :func:`save_fsdp_state` wrote: every process reads the whole tensors and keeps its slices."""
    lora = load_file(folder / SAFE_WEIGHTS_NAME)
    options = _fsdp_options(strict=False)  # strict would ask for the frozen base too
    result = set_model_state_dict(model, lora, options=options)
    missing = [key for key in result.missing_keys if key in _trainable_names(model)]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"{folder / SAFE_WEIGHTS_NAME} does not match the model's LoRA: unexpected keys "
            f"{sorted(result.unexpected_keys)[:3]}, missing trainable keys {missing[:3]} (same lora_rank?)"
        )
    moments = load_state_file(folder / FSDP_OPTIMIZER)
    set_optimizer_state_dict(model, _inner(optimizer), moments, options=_fsdp_options())
    load_accelerator_state(str(folder), [], [], [], [], accelerator.process_index)


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper (the state-dict helpers match its parameters to the model)."""
    return getattr(optimizer, "optimizer", optimizer)


def _trainable_names(model: torch.nn.Module) -> set[str]:
    return {name for name, param in model.named_parameters() if param.requires_grad}
