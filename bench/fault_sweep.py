"""Faults and bad inputs tried as a user would, each classified by what the user sees and what is lost.

Every trainer case runs the real entry script (``launch/grpo_flux.py``) as a subprocess on the shipped tiny model
at tiny sizes, after an optional preparation (a finished run to resume or damage, a malformed file), and is judged:

- ``clear error``: exit status 2, an ``error:`` message naming the expected thing, no traceback;
- ``handled``: exit 0 and the check of the case holds (a resume that skips a damaged checkpoint, a reward failure
  that drops a group, ...);
- ``unclear error``: it stopped, but with a traceback or without naming the thing;
- ``silent misbehaviour``: it ran on when it should not have, or its check failed;
- ``work lost``: the case's check found finished steps missing.

The reward server and client cases (``bench/server_faults.py``: hostile requests against
``launch/reward_server.py``, broken servers against the remote client) follow, judged the same way.

    python bench/fault_sweep.py            # about 10 minutes on 2 cores
    python bench/fault_sweep.py --only yaml_duplicate_key,resume_changed_group

Writes ``--out`` (JSON) and a section of ``--results``. The same faults are held by tests (named per case).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
from bench.probe_quality import add_to_section
from bench.server_faults import NET_CASES, net_sweep
from rewards.shapes import all_prompts
from rl.checkpoint import checkpoint_damage, list_checkpoints
from rl.config_help import HelpFormatter
from rl.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS_SECTION = "Fault sweep: bad inputs, kills and damaged files (bench/fault_sweep.py)"
TINY = ["--config", str(ROOT / "configs" / "tiny_shapes.yaml"), "--num_steps", "4", "--prompts_per_step", "2",
        "--group_size", "4", "--sample_batch_size", "8", "--train_batch_size", "8", "--max_steps", "2",
        "--max_minutes", "0", "--eval_every", "0", "--eval_before_training", "false", "--final_eval_num_prompts", "2",
        "--final_eval_images_per_prompt", "1", "--save_lora", "false", "--wandb_mode", "disabled",
        "--progress_bar", "false", "--save_every", "1"]  # fmt: skip

# a prompt with the metadata the shapes reward scores by (a JSONL record is the prompt plus its metadata)
SHAPES_PROMPT = all_prompts("train")[0]
SHAPES_LINE = json.dumps({"prompt": SHAPES_PROMPT.prompt, **SHAPES_PROMPT.to_dict()}) + "\n"


@dataclasses.dataclass
class Case:
    """One fault: ``prepare(folder)`` returns the extra arguments; ``expect`` is the text the error must name
    (a clear error expected) or None (the run must finish and ``check(folder)`` hold); ``test`` holds it in CI."""

    name: str
    fault: str
    prepare: Callable[[Path], list[str]]
    expect: str | None
    test: str
    check: Callable[[Path], bool] | None = None  # with ``expect`` too: what the error must not have lost or done
    elsewhere: bool = False  # launched from the case folder instead of the current one (the repository root)
    cleanup: Callable[[Path], None] | None = None  # before the case folder is removed
    failed_check: str = "silent misbehaviour"  # the outcome when ``check`` fails: "work lost" where it counts steps
    warns: str | None = None  # with ``expect`` None: a run that must finish must also say this (a loud warning)


class CaseNotRun(Exception):
    """``prepare`` cannot set the fault up on this machine (the reason is reported instead of an outcome)."""


def command_and_env(args: list[str], folder: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The entry script's command line at tiny sizes, and its environment (``folder`` on PYTHONPATH: a case's
    own reward module)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env.pop("GRPO_DEBUG", None)
    if folder is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT), env.get("PYTHONPATH", "")])
    base = TINY[2:] if "--config" in args else TINY  # a case's own config file replaces the tiny one
    return [sys.executable, str(ROOT / "launch" / "grpo_flux.py"), *base, *args], env


def run(
    args: list[str], folder: Path | None = None, timeout: float = 600, cwd: Path | None = None
) -> subprocess.CompletedProcess:
    if folder is not None and "--output_dir" not in args:  # never the shipped config's runs/ in the repository:
        args = [*args, "--output_dir", str(folder / "run")]  # a case that trains would leave a run a later one resumes
    command, env = command_and_env(args, folder)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def finished_run(folder: Path) -> Path:
    """A finished 2-step run with a checkpoint per step: what the resume cases start from."""
    output = folder / "run"
    done = run(["--output_dir", str(output)])
    if done.returncode:
        raise RuntimeError(f"the base run failed:\n{done.stderr[-3000:]}")
    return output


OTHER_LOG = '{"step": 1, "reward/total/mean": 0.5}\n'


def _branch_into_used(folder: Path) -> list[str]:
    """Another run's checkpoint, and a folder holding a run of its own to branch into."""
    step1 = finished_run(folder) / "checkpoints" / "step-00000001"
    (folder / "other").mkdir()
    (folder / "other" / "metrics.jsonl").write_text(OTHER_LOG)
    return ["--output_dir", str(folder / "other"), "--resume_from", str(step1)]


def steps_logged(output: Path) -> list[int]:
    return sorted({r["step"] for r in read_metrics(output / "metrics.jsonl") if "reward/total/mean" in r})


def _write(folder: Path, name: str, text: str | bytes) -> Path:
    path = folder / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _overwrite_beside_notes(folder: Path) -> list[str]:
    output = finished_run(folder)
    (output / "notes.txt").write_text("mine")
    return ["--output_dir", str(output), "--overwrite_output_dir", "true", "--resume_from", ""]


def _notes_kept_and_run_redone(folder: Path) -> bool:
    notes = folder / "run" / "notes.txt"
    return notes.is_file() and notes.read_text() == "mine" and steps_logged(folder / "run") == [1, 2]


def _resume_to_3(output: Path) -> list[str]:
    """Resume the finished 2-step run in ``output`` for one more step."""
    return ["--output_dir", str(output), "--resume_from", "latest", "--max_steps", "3"]


def _damage_latest(folder: Path, file: str) -> list[str]:
    output = finished_run(folder)
    latest = output / "checkpoints" / "step-00000002" / file
    latest.write_bytes(latest.read_bytes()[: max(1, latest.stat().st_size // 2)])
    return _resume_to_3(output)


def _written_before_new_keys(folder: Path) -> list[str]:
    """A finished run whose config.yaml predates keys this version has (as after an upgrade), resumed."""
    output = finished_run(folder)
    config = yaml.safe_load((output / "config.yaml").read_text())
    for key in ("preview_steps", "prompt_skip_after", "prompt_skip_explore"):
        del config[key]
    (output / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return _resume_to_3(output)


def _malicious_state(folder: Path) -> list[str]:
    import torch

    output = finished_run(folder)

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {folder / 'pwned'}",))

    for step in ("step-00000001", "step-00000002"):  # no intact checkpoint to fall back to
        checkpoint = output / "checkpoints" / step
        torch.save({"state": Payload()}, checkpoint / "trainer_state.pt")
        (checkpoint / "manifest.json").unlink()  # so only loading can refuse it
    return _resume_to_3(output)


def _damage_every_checkpoint(folder: Path) -> list[str]:
    output = finished_run(folder)
    for checkpoint in (output / "checkpoints").glob("step-*"):
        weights = checkpoint / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    return _resume_to_3(output)


def _run_left_as_it_was(folder: Path) -> bool:
    """Nothing intact to resume is an error, not a restart: the run's log and checkpoints stay as they were."""
    run = folder / "run"
    return steps_logged(run) == [1, 2] and not list(run.glob("metrics.before-*")) and len(list_checkpoints(run)) == 2


def _partial_metrics_line(folder: Path) -> list[str]:
    output = finished_run(folder)
    with (output / "metrics.jsonl").open("a") as log:
        log.write('{"step": 3, "reward/to')
    return _resume_to_3(output)


def _relaunch_finished(folder: Path) -> list[str]:
    """The shipped config resumes its output_dir: run again, a finished run is reported, not redone."""
    output = finished_run(folder)
    shutil.copyfile(output / "summary.json", folder / "summary.before.json")
    return ["--output_dir", str(output)]


def _not_redone(folder: Path) -> bool:
    return (folder / "run" / "summary.json").read_bytes() == (folder / "summary.before.json").read_bytes()


def _resumed_to_3(folder: Path) -> bool:
    return steps_logged(folder / "run") == [1, 2, 3]


# a user's reward module, each function a way a reward can go wrong (the case folder is on PYTHONPATH)
SWEEP_REWARDS = """
import torch


def raises(images, prompts, metadata):
    raise RuntimeError("the judge model ran out of memory")


def nan(images, prompts, metadata):
    return {"score": torch.full((len(images),), float("nan"))}


def nan_first(images, prompts, metadata):  # one NaN per batch: drop_group drops that image's group
    scores = torch.rand(len(images))
    scores[0] = float("nan")
    return {"score": scores}


def short(images, prompts, metadata):
    return {"score": torch.zeros(len(images) - 1)}


def bare_tensor(images, prompts, metadata):
    return torch.zeros(len(images))


def hangs(images, prompts, metadata):  # a deadlocked judge: the call never returns
    import threading

    threading.Event().wait()
"""


def _reward(name: str, *extra: str) -> Callable[[Path], list[str]]:
    def prepare(folder: Path) -> list[str]:
        _write(folder, "sweep_rewards.py", SWEEP_REWARDS)
        return ["--reward", f"sweep_rewards:{name}", "--output_dir", str(folder / "run"), *extra]

    return prepare


def _dropped_and_finished(folder: Path) -> bool:
    records = [r for r in read_metrics(folder / "run" / "metrics.jsonl") if "reward/dropped" in r]
    return steps_logged(folder / "run") == [1, 2] and all(r["reward/dropped"] > 0 for r in records)


def _interrupted(
    sig: signal.Signals, at: str = "checkpoints/step-00000001", twice: bool = False
) -> Callable[[Path], list[str]]:
    """A 4-step run stopped by ``sig`` once ``<run>/<at>`` appears (the first checkpoint; a ``.tmp-*`` name: inside a
    checkpoint's write; ``config.yaml``: in setup, before the loop), ``twice``: the signal again 50 ms later; the
    case is the same command again."""

    def prepare(folder: Path) -> list[str]:
        args = ["--output_dir", str(folder / "run"), "--max_steps", "4"]
        command, env = command_and_env(args)
        first = folder / "run" / at
        with subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as job:
            deadline = time.monotonic() + 600
            while not first.exists() and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.002)  # a checkpoint's write takes a few hundred ms here
            if job.poll() is not None:
                raise CaseNotRun(f"the run ended before {first.name} appeared")
            job.send_signal(sig)
            if twice:
                time.sleep(0.05)
                job.send_signal(sig)
            stderr = job.communicate(timeout=600)[1]
        last = (stderr.strip().splitlines() or [""])[-1]
        (folder / "interrupted.json").write_text(json.dumps({"exit": job.returncode, "last": last, "signal": sig.name}))
        return args

    return prepare


def _every_step_once(folder: Path) -> bool:
    """The relaunch finished the run and the log holds each of its 4 steps exactly once."""
    steps = [r["step"] for r in read_metrics(folder / "run" / "metrics.jsonl") if "reward/total/mean" in r]
    interrupted = json.loads((folder / "interrupted.json").read_text())
    told = interrupted["exit"] == -signal.SIGKILL or any(
        f"{interrupted['signal']} {what}" in interrupted["last"]
        for what in ("after step", "again: stopping now", "outside the training loop")
    )
    return steps == [1, 2, 3, 4] and told


_LIVE_RUNS: dict[Path, subprocess.Popen] = {}  # a case's first launch, still running during its second


def _second_launch(folder: Path) -> list[str]:
    """A long run (the shipped ``resume_from: latest``) past its first checkpoint; the case is the same command
    launched again beside it (a scheduler retrying a job that still runs, or a second terminal)."""
    args = ["--output_dir", str(folder / "run"), "--max_steps", "1000"]
    command, env = command_and_env(args)
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _LIVE_RUNS[folder] = first
    deadline = time.monotonic() + 600
    while not (folder / "run" / "checkpoints" / "step-00000001").is_dir() and first.poll() is None:
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return args


def _first_launch_unmixed(folder: Path) -> bool:
    """The first launch ran on alone: stopped by SIGTERM after the second's refusal, it checkpoints its last step
    and its log holds each of its steps once."""
    first = _LIVE_RUNS.pop(folder)
    if first.poll() is not None:
        return False  # it ended before the second launch: the case tested nothing
    first.send_signal(signal.SIGTERM)
    stderr = first.communicate(timeout=600)[1]
    steps = steps_logged(folder / "run")
    saved = sorted(p.name for p in (folder / "run" / "checkpoints").iterdir())
    return (
        "stopped by SIGTERM" in stderr
        and steps == list(range(1, len(steps) + 1))
        and saved[-1].endswith(f"{len(steps):08d}")
    )


def _stop_first_launch(folder: Path) -> None:
    first = _LIVE_RUNS.pop(folder, None)
    if first is not None:
        first.kill()
        first.communicate()


FULL_DISK_BYTES = 6 * 2**20  # the run's config and log and one checkpoint (about 4 MB here), not a second


def _full_disk(folder: Path) -> list[str]:
    """A run whose output_dir is on a 6 MiB tmpfs: the step-2 checkpoint finds the disk full."""
    disk = folder / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FULL_DISK_BYTES}", "tmpfs", str(disk)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode:
        raise CaseNotRun(f"mounting a small tmpfs needs root: {mounted.stderr.strip()[-120:]}")
    return ["--output_dir", str(disk / "run")]


def _unmount(folder: Path) -> None:
    subprocess.run(["umount", str(folder / "disk")], capture_output=True)


def _first_checkpoint_intact(folder: Path) -> bool:
    first = folder / "disk" / "run" / "checkpoints" / "step-00000001"
    return (first / "manifest.json").is_file() and checkpoint_damage(first) == []


def _latest_checkpoint_intact(folder: Path) -> bool:
    saved = sorted((folder / "run" / "checkpoints").glob("step-*"))
    return bool(saved) and checkpoint_damage(saved[-1]) == []


def _no_checkpoint_run(folder: Path) -> list[str]:
    """A finished run that saved no checkpoint (checkpoints off); the case relaunches it with another seed."""
    output = folder / "run"
    done = run(["--output_dir", str(output), "--save_every", "0", "--save_every_minutes", "0"])
    if done.returncode:
        raise RuntimeError(f"the base run failed:\n{done.stderr[-3000:]}")
    shutil.copyfile(output / "metrics.jsonl", folder / "metrics.before.jsonl")
    return ["--output_dir", str(output), "--save_every", "0", "--save_every_minutes", "0", "--seed", "7"]


def _log_kept(folder: Path) -> bool:
    return (folder / "run" / "metrics.jsonl").read_bytes() == (folder / "metrics.before.jsonl").read_bytes()


def _resume_changed(key: str, value: str) -> Callable[[Path], list[str]]:
    def prepare(folder: Path) -> list[str]:
        return ["--output_dir", str(finished_run(folder)), "--resume_from", "latest", f"--{key}", value]

    return prepare


LOST = "work lost"

CASES = [
    Case("unknown_key", "a misspelt option", lambda f: ["--learning_rat", "1e-4"], "learning_rate",
         "tests/test_configs.py"),
    Case("negative_value", "a negative learning rate on the command line", lambda f: ["--learning_rate", "-1e-4"],
         "learning_rate", "tests/test_configs.py"),
    Case("bad_choice", "an unknown objective", lambda f: ["--policy_objective", "ppo"], "policy_objective",
         "tests/test_configs.py"),
    Case("missing_prompt_file", "a prompt file that does not exist", lambda f: ["--prompts", str(f / "none.txt")],
         "none.txt", "tests/rl/test_data.py"),
    Case("empty_prompt_file", "a prompt file of blank lines",
         lambda f: ["--prompts", str(_write(f, "empty.txt", "\n\n"))], "contains no prompts", "tests/rl/test_data.py"),
    Case("jsonl_without_metadata", "a JSONL prompt file without the shapes world's tags, under the shapes reward",
         lambda f: ["--prompts", str(_write(f, "bare.jsonl", '{"prompt": "a red square"}\n')),
                    "--output_dir", str(f / "run")], "shapes-world metadata", "tests/rewards/test_reward_base.py"),
    Case("jsonl_bad_line", "a JSONL prompt file with a broken third line",
         lambda f: ["--prompts", str(_write(f, "p.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": c}\n'))],
         "p.jsonl:3", "tests/rl/test_data.py"),
    Case("jsonl_bom", "a JSONL prompt file saved with a UTF-8 BOM",
         lambda f: ["--prompts", str(_write(f, "b.jsonl", b"\xef\xbb\xbf" + SHAPES_LINE.encode())),
                    "--output_dir", str(f / "run")], None, "tests/rl/test_data.py",
         lambda f: steps_logged(f / "run") == [1, 2]),
    Case("corrupt_probe", "a probe file of random bytes",
         lambda f: ["--probe_path", str(_write(f, "probe.pt", os.urandom(2048))), "--prune_policy", "variance",
                    "--prune_keep_fraction", "0.5"], "probe.pt", "tests/probe/test_probe_io.py"),
    Case("missing_config", "a config file that does not exist", lambda f: ["--config", str(f / "run.yaml")],
         "run.yaml", "tests/rl/test_paths.py"),
    Case("config_not_a_mapping", "a config file holding a YAML list",
         lambda f: ["--config", str(_write(f, "list.yaml", "- learning_rate: 1.0e-4\n"))], "YAML mapping",
         "tests/rl/test_paths.py"),
    Case("launched_elsewhere", "the shipped config launched from another folder (its model path is relative)",
         lambda f: [], "launch from the repository root", "tests/rl/test_paths.py", elsewhere=True),
    Case("reward_kwargs_not_json", "reward_kwargs that is not JSON", lambda f: ["--reward_kwargs", "{url: x}"],
         "reward_kwargs", "tests/test_configs.py"),
    Case("reward_weights_count", "three reward weights for two rewards",
         lambda f: ["--reward", "shapes,jpeg_compressibility", "--reward_weights", "1", "2", "3"],
         "one weight per component", "tests/test_configs.py"),
    Case("size_off_the_latent_grid", "an image height the latent grid cannot split (70 px)",
         lambda f: ["--height", "70", "--output_dir", str(f / "run")], "multiples of", "tests/rl/test_sampler.py"),
    Case("capture_step_out_of_range", "a pruning capture step past the last denoising step",
         lambda f: ["--prune_policy", "variance", "--predictor", "preview", "--capture_step", "9"], "capture_step=9",
         "tests/test_configs.py"),
    Case("resume_from_not_a_checkpoint", "resume_from naming a folder that is no checkpoint",
         lambda f: ["--resume_from", str(f), "--output_dir", str(f / "run")], "not a checkpoint folder",
         "tests/rl/test_checkpoint.py"),
    Case("yaml_syntax", "a config file with a YAML syntax error",
         lambda f: ["--config", str(_write(f, "bad.yaml", "learning_rate: 1e-4\ngroup_size: [4\n"))], "bad.yaml",
         "tests/test_configs.py"),
    Case("yaml_duplicate_key", "a config file setting a key twice",
         lambda f: ["--config", str(_write(f, "dup.yaml", "learning_rate: 1e-4\nlearning_rate: 1e-3\n"))],
         "learning_rate", "tests/test_configs.py"),
    Case("two_config_files", "--config given twice",
         lambda f: ["--config", str(ROOT / "configs" / "tiny_shapes.yaml"), "--config",
                    str(_write(f, "more.yaml", "max_steps: 2\n"))], "--config is given more than once",
         "tests/test_configs.py"),
    Case("not_a_number", "a word where a number goes", lambda f: ["--group_size", "eight"], "invalid int value",
         "tests/test_configs.py"),
    Case("prompt_file_not_utf8", "a prompt file saved as Latin-1",
         lambda f: ["--prompts", str(_write(f, "p.txt", "a red square\na caf\u00e9 sign\n".encode("latin-1")))],
         "p.txt:2: not UTF-8", "tests/rl/test_data.py"),
    Case("prompt_file_is_a_folder", "a prompt path that is a folder",
         lambda f: (f / "p.txt").mkdir() or ["--prompts", str(f / "p.txt")], "is a folder", "tests/rl/test_data.py"),
    Case("missing_eval_prompts", "an evaluation prompt file that does not exist",
         lambda f: ["--eval_prompts", str(f / "held_out.txt")], "held_out.txt", "tests/rl/test_data.py"),
    Case("missing_probe", "a probe file that does not exist",
         lambda f: ["--probe_path", str(f / "probe.pt"), "--prune_policy", "variance", "--prune_keep_fraction", "0.5"],
         "probe.pt", "tests/launch/test_grpo_smoke.py"),
    Case("reward_plugin_not_importable", "a reward plugin whose module is not on PYTHONPATH",
         lambda f: ["--reward", "my_rewards.judge:Judge"], "cannot import module 'my_rewards.judge'",
         "tests/launch/test_grpo_smoke.py"),
    Case("far_from_native_size", "512 px images from the 64 px tiny model", lambda f: ["--height", "512", "--width",
         "512", "--max_steps", "1"], None, "tests/rl/test_sampler.py", warns="native 64 x 64 px"),
    Case("used_output_dir", "a fresh run (resume_from unset) into a folder holding a run",
         lambda f: ["--output_dir", str(finished_run(f)), "--resume_from", ""], "holds another run",
         "tests/rl/test_trainer.py"),
    Case("relaunch_finished", "the same command again after the run finished", _relaunch_finished, None,
         "tests/rl/test_checkpoint.py", _not_redone, failed_check=LOST),
    Case("resume_changed_group", "a resume with another group size", _resume_changed("group_size", "8"),
         "group_size", "tests/rl/test_trainer.py"),
    Case("resume_changed_seed", "a resume with another seed", _resume_changed("seed", "7"), "seed",
         "tests/rl/test_trainer.py"),
    Case("resume_behind_later_checkpoints", "a resume from step 1 of a run whose folder holds step 2",
         lambda f: ["--output_dir", str(finished_run(f)), "--resume_from", str(f / "run" / "checkpoints" /
                    "step-00000001")], "holds later checkpoints", "tests/rl/test_checkpoint.py",
         check=lambda f: steps_logged(f / "run") == [1, 2], failed_check=LOST),
    Case("branch_into_used_folder", "a branch from another run's checkpoint into a folder holding a run",
         _branch_into_used, "this is a branch of another run", "tests/rl/test_trainer.py",
         check=lambda f: (f / "other" / "metrics.jsonl").read_text() == OTHER_LOG, failed_check=LOST),
    Case("config_without_flag", "a config file given without --config", lambda f: [str(ROOT / "configs" / "tiny_shapes.yaml")],
         "--config", "tests/test_configs.py"),
    Case("key_equals_value", "an override written key=value (other launchers' style)", lambda f: ["max_steps=1"],
         "--max_steps 1", "tests/test_configs.py"),
    Case("overwrite_beside_notes", "--overwrite_output_dir on a folder holding a run and the user's own notes",
         _overwrite_beside_notes, None, "tests/rl/test_run_lock.py", _notes_kept_and_run_redone, failed_check=LOST,
         warns="kept what is not the run's: notes.txt"),
    Case("overwrite_with_bad_resume", "--overwrite_output_dir with a resume_from that is no checkpoint (a typo)",
         lambda f: ["--output_dir", str(finished_run(f)), "--overwrite_output_dir", "true", "--resume_from",
                    str(f / "run" / "checkpoints" / "step-00000002" / "lora")], "not a checkpoint folder",
         "tests/rl/test_checkpoint.py", check=lambda f: steps_logged(f / "run") == [1, 2], failed_check=LOST),
    Case("truncated_weights", "the latest checkpoint's model.safetensors cut in half",
         lambda f: _damage_latest(f, "model.safetensors"), None, "tests/rl/test_checkpoint.py",
         _resumed_to_3, failed_check=LOST),
    Case("truncated_state", "the latest checkpoint's trainer_state.pt cut in half",
         lambda f: _damage_latest(f, "trainer_state.pt"), None, "tests/rl/test_checkpoint.py",
         _resumed_to_3, failed_check=LOST),
    Case("every_checkpoint_damaged", "every checkpoint's model.safetensors cut short, then a resume",
         _damage_every_checkpoint, "every checkpoint in", "tests/rl/test_checkpoint.py", _run_left_as_it_was,
         failed_check=LOST),
    Case("resume_after_upgrade", "a resume of a run whose config.yaml lacks keys added since it started",
         _written_before_new_keys, None, "tests/rl/test_trainer.py", _resumed_to_3, failed_check=LOST),
    Case("prompt_skip_explore_out_of_range", "a prompt skipping probability of 1.5",
         lambda f: ["--prompt_skip_after", "1", "--prompt_skip_explore", "1.5"], "prompt_skip_explore",
         "tests/rl/test_prompt_skip.py"),
    Case("malicious_state", "a checkpoint whose trainer_state.pt runs os.system when unpickled", _malicious_state,
         "trainer_state.pt", "tests/rl/test_checkpoint.py", lambda f: not (f / "pwned").exists()),
    Case("partial_metrics_line", "metrics.jsonl ending in half a line (a crash mid-write)", _partial_metrics_line,
         None, "tests/rl/test_metrics_log.py", _resumed_to_3, failed_check=LOST),
    Case("full_disk", "the output_dir's disk fills during the second checkpoint", _full_disk,
         "could not write checkpoint", "tests/rl/test_checkpoint.py", _first_checkpoint_intact, cleanup=_unmount,
         failed_check=LOST),
    Case("reward_server_down", "a remote reward whose server is not running",
         lambda f: ["--reward", "remote", "--reward_kwargs", '{"remote": {"url": "http://127.0.0.1:9"}}'],
         "127.0.0.1:9", "tests/rewards/test_remote.py"),
    Case("missing_model", "a model folder that does not exist", lambda f: ["--pretrained", str(f / "flux")],
         "--pretrained", "tests/rl/test_checkpoint.py"),
    Case("model_folder_without_index", "a model folder without model_index.json",
         lambda f: ["--pretrained", str(f)], "model_index.json", "tests/rl/test_checkpoint.py"),
    Case("output_dir_is_a_file", "an output_dir that is a file",
         lambda f: ["--output_dir", str(_write(f, "notes.txt", "mine"))], "is a file", "tests/rl/test_checkpoint.py"),
    Case("output_dir_not_creatable", "an output_dir that cannot be created",
         lambda f: ["--output_dir", str(_write(f, "notes.txt", "mine") / "run")], "cannot create output_dir",
         "tests/rl/test_checkpoint.py"),
    Case("unknown_reward", "a reward name that does not exist", lambda f: ["--reward", "pickscor"], "pickscor",
         "tests/rewards/test_reward_base.py"),
    Case("group_of_one", "a group size of 1 (no contrast to learn from)", lambda f: ["--group_size", "1"],
         "group_size", "tests/test_configs.py"),
    Case("probe_other_sampler", "a probe trained under deterministic sampling, loaded by the SDE trainer",
         lambda f: ["--prune_policy", "variance", "--prune_keep_fraction", "0.5", "--predictor", "probe",
                    "--probe_path", str(ROOT / "assets" / "probe" / "tiny-flux-shapes-ode-step4.pt"),
                    "--capture_step", "4", "--num_steps", "10"], "noise_level", "tests/probe/test_sampler_binding.py"),
    Case("reward_raises", "a reward that raises", _reward("raises"), "ran out of memory",
         "tests/rewards/test_compose.py"),
    Case("reward_nan", "a reward returning NaN", _reward("nan"), "non-finite", "tests/rewards/test_compose.py"),
    Case("reward_nan_drop_group", "a reward returning one NaN per batch under reward_failure_policy: drop_group",
         _reward("nan_first", "--reward_failure_policy", "drop_group"), None, "tests/rl/test_trainer.py",
         _dropped_and_finished),
    Case("reward_wrong_shape", "a reward returning one score too few", _reward("short"), "shape (7,)",
         "tests/rewards/test_compose.py"),
    Case("reward_bare_tensor", "a reward returning a tensor, not a dict of named scores", _reward("bare_tensor"),
         "dict of named scores", "tests/rewards/test_compose.py"),
    Case("reward_hangs", "a reward whose call never returns (a deadlocked judge), reward_timeout_s 5",
         _reward("hangs", "--reward_timeout_s", "5"), "gave no answer within reward_timeout_s=5 s",
         "tests/launch/test_grpo_smoke.py", _latest_checkpoint_intact, failed_check=LOST),
    Case("second_launch_same_output_dir", "the same command launched again while the first still runs",
         _second_launch, "in use by another run", "tests/rl/test_run_lock.py", _first_launch_unmixed,
         cleanup=_stop_first_launch, failed_check=LOST),
    # the first update blows the LoRA up: the next step's images are NaN, refused before any reward scores them
    Case("diverging_learning_rate", "a learning rate of 1e12 (the LoRA diverges, its images turn NaN)",
         lambda f: ["--output_dir", str(f / "run"), "--learning_rate", "1e12", "--max_steps", "8"],
         "the policy or the sampler diverged", "tests/rewards/test_compose.py", _latest_checkpoint_intact),
    Case("sigterm_relaunch", "SIGTERM after the first checkpoint, then the same command again",
         _interrupted(signal.SIGTERM), None, "tests/rl/test_checkpoint.py", _every_step_once, failed_check=LOST),
    Case("sigint_relaunch", "Ctrl-C (SIGINT) after the first checkpoint, then the same command again",
         _interrupted(signal.SIGINT), None, "tests/rl/test_stop_signals.py", _every_step_once, failed_check=LOST),
    Case("sigkill_mid_checkpoint", "SIGKILL inside the second checkpoint's write, then the same command again",
         _interrupted(signal.SIGKILL, at="checkpoints/.tmp-step-00000002"), None, "tests/rl/test_checkpoint.py",
         _every_step_once, failed_check=LOST),
    Case("sigterm_twice", "SIGTERM twice (the second 50 ms after the first), then the same command again",
         _interrupted(signal.SIGTERM, twice=True), None, "tests/rl/test_stop_signals.py", _every_step_once,
         failed_check=LOST),
    Case("sigkill_relaunch", "SIGKILL after the first checkpoint, then the same command again",
         _interrupted(signal.SIGKILL), None, "tests/rl/test_checkpoint.py", _every_step_once, failed_check=LOST),
    Case("sigterm_in_setup", "SIGTERM during setup (before the loop), then the same command again",
         _interrupted(signal.SIGTERM, at="config.yaml"), None, "tests/launch/test_grpo_smoke.py", _every_step_once,
         failed_check=LOST),
    Case("restart_as_another_run", "a run that saved no checkpoint, relaunched with another seed",
         _no_checkpoint_run, "changes what that run is", "tests/rl/test_trainer.py", _log_kept, failed_check=LOST),
]  # fmt: skip


def judge(case: Case, done: subprocess.CompletedProcess, folder: Path) -> str:
    traceback = "Traceback (most recent call last)" in done.stderr
    if case.expect is not None:
        if done.returncode == 0:
            return "silent misbehaviour"
        named = case.expect in done.stderr
        one_line = done.returncode == 2 and any(line.startswith("error:") for line in done.stderr.splitlines())
        if case.check is not None and not case.check(folder):
            return case.failed_check
        return "clear error" if named and one_line and not traceback else "unclear error"
    if done.returncode != 0:
        return "unclear error" if traceback else "silent misbehaviour"
    if case.check is not None and not case.check(folder):
        return case.failed_check
    if case.warns is not None and case.warns not in done.stderr:
        return "silent misbehaviour"
    return "handled"


def sweep(cases: list[Case]) -> list[dict]:
    rows = []
    for case in cases:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            try:
                args = case.prepare(folder)
            except CaseNotRun as reason:
                rows.append({"case": case.name, "fault": case.fault, "outcome": "not run", "message": str(reason),
                             "test": case.test, "exit": None})  # fmt: skip
                print(f"{case.name}: not run: {reason}", flush=True)
                continue
            try:
                done = run(args, folder, cwd=folder if case.elsewhere else None)
                outcome = judge(case, done, folder)
            finally:
                if case.cleanup is not None:
                    case.cleanup(folder)
            last = (done.stderr.strip().splitlines() or [""])[-1]
            if case.expect is None:  # what the run warned about, if anything
                warnings = [  # the run's own warnings, not the libraries' import-time notices
                    line
                    for line in done.stderr.splitlines()
                    if ("WARNING" in line or "warning" in line) and not line.startswith("[transformers]")
                ]
                last = warnings[-1] if warnings else "(finished)"
            last = last.replace(str(ROOT), "<repo>")  # the record names no folder of this machine
            rows.append({"case": case.name, "fault": case.fault, "outcome": outcome, "message": last[-300:],
                         "test": case.test, "exit": done.returncode})  # fmt: skip
            print(f"{case.name}: {outcome} (exit {done.returncode}) {last[-160:]}", flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    return rows


def report_lines(rows: list[dict], command: str) -> list[str]:
    counts = Counter(row["outcome"] for row in rows)
    summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.most_common())
    lines = [f"### {datetime.date.today()}: `{command}`", "", f"{len(rows)} faults: {summary}.", "",
             "| fault | outcome | what the user reads (last line) | held by |", "|---|---|---|---|"]  # fmt: skip
    for row in rows:
        message = row["message"].replace("|", "/").replace("\n", " ")
        lines.append(f"| {row['fault']} | {row['outcome']} | {message[:220]} | `{row['test']}` |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated case names (default: all): " +
                        ", ".join(c.name for c in [*CASES, *NET_CASES]))  # fmt: skip
    parser.add_argument("--out", default="bench/fault_sweep.json", help="JSON output")
    parser.add_argument("--results", default="bench/RESULTS.md", help="Markdown file of the section ('': none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    every = [c.name for c in [*CASES, *NET_CASES]]
    names = set(args.only.split(",")) if args.only else set(every)
    unknown = names - set(every)
    if unknown:
        raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {every}")
    rows = sweep([c for c in CASES if c.name in names]) + net_sweep([c for c in NET_CASES if c.name in names])
    Path(args.out).write_text(json.dumps(rows, indent=1))
    if args.results:
        add_to_section(args.results, RESULTS_SECTION, report_lines(rows, "python bench/fault_sweep.py"))
    return rows


if __name__ == "__main__":
    main()
