"""Checkpoints: atomic layout, kill-and-resume continues the run exactly, the LoRA export loads in plain diffusers."""

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from rl.checkpoint import (
    CheckpointWriteError,
    checkpoint_damage,
    checkpoint_name,
    effective_resume_from,
    list_checkpoints,
    load_checkpoint,
    make_output_dir,
    must_clear_output_dir,
    resolve_resume,
    save_checkpoint,
)
from rl.inference import generate, load
from rl.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "grpo_flux.py"


def tiny_run_args(pipeline_dir, output_dir, *extra):
    """4 GRPO steps of the fixture (32 px, 4 denoising steps, 2 prompts x 4 rollouts), a checkpoint every 2."""
    return [
        "--config", str(ROOT / "configs" / "tiny_shapes.yaml"),
        "--pretrained", str(pipeline_dir), "--height", "32", "--width", "32", "--num_steps", "4",
        "--lora_rank", "4", "--lora_alpha", "8", "--prompts_per_step", "2", "--group_size", "4",
        "--sample_batch_size", "8", "--train_batch_size", "4", "--max_steps", "4", "--max_minutes", "0",
        "--eval_every", "2", "--eval_num_prompts", "2", "--final_eval_num_prompts", "2", "--learning_rate", "1e-3",
        "--reward", "jpeg_compressibility", "--save_every", "2", "--output_dir", str(output_dir),
        "--wandb_mode", "disabled", "--progress_bar", "false", "--mixed_precision", "no", *extra,
    ]  # fmt: skip


def start(args) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 0, output[-3000:]


def comparable(records):
    """Logged values that must match between runs: everything but timings and the process's peak memory (its
    resident set on a CPU, which differs between two processes of the same run)."""
    skip = ("wall_s", "time/", "perf/", "memory/peak_mib")
    return [{k: v for k, v in r.items() if not k.startswith(skip)} for r in records]


@pytest.fixture
def pipeline_dir(tiny_flux_pipeline, tmp_path):
    tiny_flux_pipeline.save_pretrained(tmp_path / "pipeline")
    return tmp_path / "pipeline"


def test_resolve_resume_skips_interrupted_saves(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-00000002", "step-00000010", ".tmp-step-00000012"):
        (root / name).mkdir(parents=True)
        (root / name / "trainer_state.pt").write_bytes(b"")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000010"]
    assert resolve_resume("latest", tmp_path) == root / "step-00000010"  # numeric order; never the .tmp one
    assert resolve_resume("latest", tmp_path / "fresh") is None  # nothing yet: start fresh
    assert resolve_resume(None, tmp_path) is None
    assert resolve_resume(str(root / "step-00000002"), tmp_path) == root / "step-00000002"
    with pytest.raises(
        FileNotFoundError, match=r"resume_from='nowhere' is not a checkpoint folder \(it does not exist\)"
    ):
        resolve_resume("nowhere", tmp_path)


@pytest.mark.parametrize(
    "failure, message",
    [
        (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "a write failed"),
        (RuntimeError("basic_ios::clear: iostream error"), "a write failed"),
    ],  # torch.save on a full disk raises the last two (seen on a full tmpfs): its writer loses the errno
)
def test_a_full_disk_keeps_the_earlier_checkpoints_and_says_so(tmp_path, monkeypatch, failure, message):
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))  # what save_state writes

    def save(step):
        return save_checkpoint(accelerator, tmp_path, step, {"step": step}, {}, export_lora=lambda path: path.mkdir())

    earlier = save(1)

    def full_disk(*args, **kwargs):
        raise failure

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError, match=rf"step-00000002: {message}.*earlier checkpoints in .* intact"):
        save(2)
    assert list_checkpoints(tmp_path) == [earlier] and checkpoint_damage(earlier) == []
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))  # the partial one is gone, its space freed
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: 1 / 0)  # a bug, not a write: keeps its traceback
    with pytest.raises(ZeroDivisionError):
        save(2)


def test_sigkill_and_resume_matches_the_uninterrupted_run(pipeline_dir, tmp_path):
    straight = start(tiny_run_args(pipeline_dir, tmp_path / "straight"))
    killed_dir = tmp_path / "killed"
    killed = start(tiny_run_args(pipeline_dir, killed_dir))
    deadline = time.time() + 240
    while not (killed_dir / "checkpoints" / "step-00000002").is_dir():  # appears complete (atomic rename)
        assert killed.poll() is None and time.time() < deadline, "the run ended before its step-2 checkpoint"
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (killed_dir / "lora").exists()  # it really died mid-run
    resumed = start(tiny_run_args(pipeline_dir, killed_dir, "--resume_from", "latest"))
    finish(straight)
    finish(resumed)

    # identical logged rewards, policy statistics and evaluations, step by step (no duplicates of steps the
    # killed run logged after its checkpoint)
    a, b = read_metrics(tmp_path / "straight" / "metrics.jsonl"), read_metrics(killed_dir / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert comparable(a) == comparable(b)
    assert sum("reward/total/mean" in r for r in b) == 4
    assert b[-1]["wall_s"] >= max(r["wall_s"] for r in b[:-1])  # the wall clock carries on across the resume
    # identical LoRA weights: live (accelerate state) and exported (EMA) ones
    for name in ("model.safetensors", "lora/pytorch_lora_weights.safetensors"):
        x = load_file(tmp_path / "straight" / "checkpoints" / "step-00000004" / name)
        y = load_file(killed_dir / "checkpoints" / "step-00000004" / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        assert any("lora_B" in k and x[k].abs().max() > 0 for k in x)  # it trained
    saved = load_file(killed_dir / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all("lora_" in k for k in saved)  # the checkpoint holds the LoRA, not the frozen base


def test_exported_lora_reproduces_the_trainers_samples_in_plain_diffusers(pipeline_dir, tmp_path, launch_script):
    trainer = launch_script("grpo_flux").main(
        tiny_run_args(
            pipeline_dir,
            tmp_path / "run",
            "--max_steps",
            "2",
            "--eval_before_training",
            "false",
            "--init_lora_weights",
            "false",
        )
    )
    # the trainer's own deterministic samples (EMA weights, as exported) of two prompts x two seeds
    prompts, seeds = ["a red circle", "two blue squares"], [3, 7]
    sampler = trainer.evaluator.sampler
    with torch.no_grad(), trainer.ema.average_parameters():
        from rl.sampler import encode_prompts

        embeds = encode_prompts(trainer.pipeline, prompts, 16)
        index = torch.arange(2).repeat_interleave(2)
        done = sampler.advance(sampler.start(index, torch.tensor(seeds * 2)), embeds, sampler.num_steps)
        own = sampler.decode(done.latents)

    sample = launch_script("sample")
    out = sample.main(
        ["--pretrained", str(pipeline_dir), "--lora", str(tmp_path / "run" / "lora"), "--prompt", prompts[0],
         "--prompt", prompts[1], "--seeds", "3", "7", "--num_steps", "4", "--height", "32", "--width", "32",
         "--out", str(tmp_path / "samples")]
    )  # fmt: skip
    assert (out / "grid.png").is_file() and (out / "001_7.png").is_file()
    fresh = load(str(pipeline_dir), str(tmp_path / "run" / "lora"))
    plain = generate(fresh, prompts, seeds, num_steps=4, height=32, width=32, max_sequence_length=16)
    assert (plain - own).abs().max() <= 1e-4
    base = generate(load(str(pipeline_dir), None), prompts, seeds, 4, 32, 32, max_sequence_length=16)
    assert (base - own).abs().max() > 1e-3  # the LoRA matters: the check above is not vacuous
    # the checkpoint's copy of the export is the same file content
    x = load_file(tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors")
    y = load_file(tmp_path / "run" / "checkpoints" / "step-00000002" / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(x[k], y[k]) for k in x)


class _Payload:
    """Runs a shell command when unpickled (what a crafted checkpoint would hide)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_a_crafted_state_file_is_refused_without_running_code(tmp_path):
    from rl.checkpoint import load_state_file

    marker = tmp_path / "pwned"
    crafted = tmp_path / "trainer_state.pt"
    torch.save({"state": {"step": 3}, "evil": _Payload(marker)}, crafted)
    with pytest.raises(ValueError, match="trainer_state.pt holds objects other than tensors") as refused:
        load_state_file(crafted)
    assert not marker.exists()
    assert "system)" in str(refused.value)  # names what it asks for (posix.system / nt.system)
    assert "weights_only" not in str(refused.value)  # and never advises loading it unsafely
    plain = tmp_path / "plain.pt"
    torch.save({"state": {"step": 3}, "ema": [torch.ones(2)], "meta": ("a", 1.0)}, plain)
    assert load_state_file(plain)["state"]["step"] == 3


def test_every_pickled_file_is_checked_before_a_library_loads_it(tmp_path):
    """DeepSpeed loads its own checkpoint files with ``weights_only=False``: a crafted optimizer-state file (or RNG
    state) is refused by name before accelerate or DeepSpeed reads anything, while the records DeepSpeed and
    accelerate really write (a loss scaler, the ZeRO stage, fragment addresses, numpy RNG arrays) load."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    from rl.checkpoint import load_checkpoint, refuse_code

    folder = tmp_path / "step-00000002"
    (folder / "pytorch_model").mkdir(parents=True)
    torch.save({"state": {"step": 2}}, folder / "trainer_state.pt")
    torch.save({"random_state": np.random.RandomState(0).get_state(), "torch_manual_seed": torch.get_rng_state()},
               folder / "random_states_0.pkl")  # fmt: skip
    optimizer_file = folder / "pytorch_model" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1), "zero_stage": ZeroStageEnum.gradients,
                "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}]}}, optimizer_file)  # fmt: skip
    refuse_code(folder)  # what the libraries write passes

    class Untouched:  # the checkpoint must be refused before any library is asked to load it
        def load_state(self, *args, **kwargs):
            raise AssertionError("a library loaded the crafted checkpoint")

    marker = tmp_path / "pwned"
    for crafted in (optimizer_file, folder / "random_states_0.pkl"):
        original = crafted.read_bytes()
        torch.save({"optimizer_state_dict": {"x": _Payload(marker)}}, crafted)
        with pytest.raises(ValueError, match=f"{crafted.name} holds objects other than tensors") as refused:
            load_checkpoint(Untouched(), folder)
        assert str(crafted) in str(refused.value) and "system)" in str(refused.value)
        crafted.write_bytes(original)
    assert not marker.exists()
    # a linked folder would hide its files from the check while DeepSpeed still read them
    hidden = tmp_path / "elsewhere"
    (folder / "pytorch_model").rename(hidden)
    (folder / "pytorch_model").symlink_to(hidden, target_is_directory=True)
    with pytest.raises(ValueError, match="pytorch_model is a link"):
        load_checkpoint(Untouched(), folder)


def test_sigterm_checkpoints_and_the_same_command_resumes_then_reports_the_finished_run(pipeline_dir, tmp_path):
    """Preemption: SIGTERM mid-run writes a checkpoint and exits saying how to go on; the shipped config's own
    command (it sets resume_from: latest) then finishes the run, and once more reports it finished without redoing
    anything (no save_every: the signal and the trained end alone saved it)."""
    run = tmp_path / "run"
    command = tiny_run_args(pipeline_dir, run, "--save_every", "0", "--max_steps", "12", "--eval_every", "0")
    process = start(command)
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").is_file() or '"train/step": 1' not in (run / "metrics.jsonl").read_text():
        assert process.poll() is None and time.time() < deadline, "the run ended before its first step"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=240)
    assert process.returncode == 1 and "stopped by SIGTERM after step" in output
    assert output.rstrip().endswith("continue with the same command")  # no flag to add: the config resumes
    saved = list_checkpoints(run)
    assert len(saved) == 1 and not (run / "lora").exists()  # a checkpoint, not a finished run
    stopped_at = int(saved[0].name.split("-")[1])
    assert stopped_at < 12
    finish(start(command))
    steps = [r["train/step"] for r in read_metrics(run / "metrics.jsonl") if "train/step" in r]
    assert steps == list(range(1, 13))
    assert list_checkpoints(run)[-1].name == "step-00000012"  # the trained end, before the final evaluation
    summary, log = (run / "summary.json").read_text(), (run / "metrics.jsonl").read_text()
    again = start(command)
    output, _ = again.communicate(timeout=240)
    assert again.returncode == 0 and "finished at step 12 (summary.json): nothing to do" in output
    assert (run / "summary.json").read_text() == summary
    assert (run / "metrics.jsonl").read_text() == log  # the final evaluation's records included


def test_a_damaged_latest_checkpoint_is_named_and_the_previous_one_used(tmp_path, caplog):
    from rl.checkpoint import write_manifest

    root = tmp_path / "checkpoints"
    for step in (1, 2):
        folder = root / f"step-{step:08d}"
        (folder / "lora").mkdir(parents=True)
        torch.save({"state": {"step": step}}, folder / "trainer_state.pt")
        (folder / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"x" * 100)
        write_manifest(folder)
    latest = root / "step-00000002"
    assert resolve_resume("latest", tmp_path) == latest
    (latest / "lora" / "pytorch_lora_weights.safetensors").write_bytes(b"x" * 60)  # truncated
    assert resolve_resume("latest", tmp_path) == root / "step-00000001"
    assert "lora/pytorch_lora_weights.safetensors has 60 bytes, not 100" in caplog.text
    with pytest.raises(ValueError, match="step-00000002 is damaged"):
        resolve_resume(str(latest), tmp_path)
    (root / "step-00000001" / "trainer_state.pt").unlink()
    # nothing intact is not "none yet": a fresh start would set the run aside and restart it silently
    with pytest.raises(ValueError, match=r"every checkpoint in .*checkpoints is damaged .*--overwrite_output_dir true"):
        resolve_resume("latest", tmp_path)
    assert resolve_resume("latest", tmp_path / "elsewhere") is None  # no checkpoint yet: a fresh start


def test_a_checkpoint_without_a_manifest_that_cannot_be_read_is_named(tmp_path):
    """A checkpoint with no manifest (written before manifests, or the file removed) is taken as it is; a
    truncated file of it is then a one-line error naming the checkpoint (and the file, where known), not a
    library's traceback."""
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    folder = save_checkpoint(accelerator, tmp_path, 1, {"step": 1}, {}, export_lora=lambda path: path.mkdir())
    (folder / "manifest.json").unlink()
    assert load_checkpoint(accelerator, folder, model)[0] == {"step": 1}
    state = folder / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(ValueError, match=r"trainer_state.pt of checkpoint .*step-00000001 cannot be read \(it has no "
                       r"manifest.json, so its files were not checked\): .*Resume from another checkpoint"):  # fmt: skip
        load_checkpoint(accelerator, folder, model)
    state.unlink()
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"^checkpoint .*step-00000001 cannot be read \(it has no manifest.json"):
        load_checkpoint(accelerator, folder, model)


def test_save_total_limit_after_a_fallback_keeps_the_intact_checkpoints(tmp_path, caplog):
    """A resume fell back from a damaged step 3 to step 1; the run's next save (a time-triggered one at step 2)
    with save_total_limit 1 must keep itself, not the damaged later folder."""
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(2, 2))

    def save(step, keep):
        return save_checkpoint(
            accelerator, tmp_path, step, {"step": step}, {}, export_lora=lambda path: path.mkdir(), keep=keep
        )

    first, damaged = save(1, 0), save(3, 0)
    (damaged / "trainer_state.pt").write_bytes(b"cut")
    assert resolve_resume("latest", tmp_path) == first
    second = save(2, keep=1)
    assert list_checkpoints(tmp_path) == [second, damaged]  # step 1 went (older), the damaged later one waits
    assert resolve_resume("latest", tmp_path) == second
    third = save(3, keep=2)  # the run reaches the damaged step: replaced whole
    assert list_checkpoints(tmp_path) == [second, third] and checkpoint_damage(third) == []
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [second.name, third.name]


def test_an_output_dir_that_is_a_file_or_cannot_be_made_is_named_with_the_fix(tmp_path):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(NotADirectoryError, match=r"notes.txt is a file, not a folder: set --output_dir"):
        make_output_dir(a_file)
    assert a_file.read_text() == "mine"  # untouched
    with pytest.raises(PermissionError, match=r"cannot create output_dir .*notes.txt/run .*--output_dir"):
        make_output_dir(a_file / "run")
    make_output_dir(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_a_model_that_is_not_there_names_the_option_and_what_it_takes(tmp_path):
    from rl.config import ModelConfig, RunConfig
    from rl.trainer import load_pipeline

    for missing in (tmp_path / "none", tmp_path):  # no folder; a folder without model_index.json
        config = RunConfig(model=ModelConfig(pretrained=str(missing)))
        with pytest.raises(FileNotFoundError, match=r"pretrained='.*'.*Set --pretrained to a FluxPipeline folder"):
            load_pipeline(config, torch.device("cpu"))


def test_what_a_run_may_do_with_a_folder_holding_one(tmp_path):
    def checkpoint(folder: Path, step: int) -> str:
        path = folder / "checkpoints" / checkpoint_name(step)
        path.mkdir(parents=True)
        (path / "trainer_state.pt").write_bytes(b"")
        return str(path)

    run = tmp_path / "run"
    step1, step2 = checkpoint(run, 1), checkpoint(run, 2)
    assert not must_clear_output_dir(run, "latest", overwrite=False)  # continue the folder's own run
    assert not must_clear_output_dir(tmp_path / "new", step1, overwrite=False)  # a branch into a new folder
    # an explicit overwrite wins over the shipped configs' resume_from: latest; never over a named checkpoint in it
    assert must_clear_output_dir(run, "latest", overwrite=True)
    with pytest.raises(FileExistsError, match="overwrite_output_dir would clear .*run, which holds the checkpoint"):
        must_clear_output_dir(run, step2, overwrite=True)
    # a resume_from that is no checkpoint is named before anything could be cleared
    with pytest.raises(FileNotFoundError, match=r"step-00000002/lora' is not a checkpoint folder"):
        must_clear_output_dir(run, step2 + "/lora", overwrite=True)
    # going back to step 1 while step 2 stays for 'latest' beside a log cut back below it
    with pytest.raises(
        FileExistsError, match=r"goes back to step-00000001, but .* later checkpoints \(step-00000002\)"
    ):
        must_clear_output_dir(run, step1, overwrite=False)
    shutil.rmtree(step2)
    assert not must_clear_output_dir(run, step1, overwrite=False)  # the newest: as 'latest'
    # the folder's own checkpoints also through a symlinked checkpoints/ (a scratch disk)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "checkpoints").symlink_to(run / "checkpoints")
    assert not must_clear_output_dir(linked, str(linked / "checkpoints" / checkpoint_name(1)), overwrite=False)
    # a branch into a folder holding another run needs the folder cleared, as a fresh run does
    other = tmp_path / "other"
    checkpoint(other, 5)
    with pytest.raises(FileExistsError, match="holds another run .* this is a branch of another run"):
        must_clear_output_dir(other, step1, overwrite=False)
    assert must_clear_output_dir(other, step1, overwrite=True)
    assert must_clear_output_dir(other, None, overwrite=True)
    assert not must_clear_output_dir(tmp_path / "new", None, False)


def test_the_command_that_started_a_branch_continues_it(tmp_path):
    origin = tmp_path / "run" / "checkpoints" / checkpoint_name(3)
    origin.mkdir(parents=True)
    (origin / "trainer_state.pt").write_bytes(b"")
    branch = tmp_path / "branch"
    branch.mkdir()
    (branch / "config.yaml").write_text(f"resume_from: {origin}\n")
    (branch / "metrics.jsonl").write_text('{"train/step": 4}\n')  # it logged a step, then was preempted
    assert effective_resume_from(branch, str(origin)) == str(origin)  # no checkpoint of its own: branch again
    assert not must_clear_output_dir(branch, str(origin), overwrite=False)  # from its own start: not another run
    (branch / "checkpoints" / checkpoint_name(5)).mkdir(parents=True)
    assert effective_resume_from(branch, str(origin)) == "latest"  # its newest checkpoint
    assert effective_resume_from(tmp_path / "elsewhere", str(origin)) == str(origin)  # a new branch
    # the same command with --overwrite_output_dir: cleared, and the branch starts again from its origin (with
    # 'latest' it would start from nothing while config.yaml names the origin)
    assert effective_resume_from(branch, str(origin), overwrite=True) == str(origin)
    assert must_clear_output_dir(branch, str(origin), overwrite=True)
    assert resolve_resume(str(origin), branch) == origin


def test_a_checkpoint_without_its_config_is_not_resumed_unchecked(tmp_path):
    from rl.resume_policy import check_resumed_config

    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"  # neither it nor its run holds a config.yaml
    checkpoint.mkdir(parents=True)
    config = {"seed": 7, "group_size": 2}
    with pytest.raises(ValueError, match=r"has no config.yaml .*--allow_config_change true"):
        check_resumed_config(tmp_path / "run", checkpoint, config, allow_change=False, record=False)
    assert check_resumed_config(tmp_path / "run", checkpoint, config, allow_change=True, record=False) == {}
