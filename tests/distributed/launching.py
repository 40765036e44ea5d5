"""Starting the real entry script on several CPU processes (tests/distributed/worker.py) and reading its dumps."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("worker.py")
ACCELERATE = Path(sys.executable).with_name("accelerate")
CPU_2PROC = str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(pipeline_dir: Path, output_dir: Path) -> list[str]:
    """2 GRPO steps of the fixture, 2 prompts x 4 rollouts per step (one whole group per process of two)."""
    return [
        "--config", str(ROOT / "configs" / "tiny_shapes.yaml"), "--pretrained", str(pipeline_dir),
        "--height", "32", "--width", "32", "--num_steps", "4", "--lora_rank", "4", "--lora_alpha", "8",
        "--prompts_per_step", "2", "--group_size", "4", "--sample_batch_size", "8", "--train_batch_size", "4",
        "--max_steps", "2", "--max_minutes", "0", "--eval_every", "0", "--eval_before_training", "false",
        "--eval_num_prompts", "2", "--final_eval_num_prompts", "3", "--learning_rate", "1e-3",
        "--reward", "jpeg_compressibility", "--save_lora", "false", "--output_dir", str(output_dir),
        "--wandb_mode", "disabled", "--progress_bar", "false", "--mixed_precision", "no",
    ]  # fmt: skip


def half_flat_reward(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> dict[str, torch.Tensor]:
    """A test reward (``--reward launching:half_flat_reward``): 0.5 for every prompt of even length, so each of
    its groups is flat; the image's mean brightness for the others."""
    flat = torch.tensor([len(prompt) % 2 == 0 for prompt in prompts])
    return {"score": torch.where(flat, torch.full((len(prompts),), 0.5), images.float().mean(dim=(1, 2, 3)).cpu())}


def launch(
    dump: Path, args: list[str], *launcher: str, port: int | None = None, env: dict[str, str] | None = None
) -> subprocess.Popen:
    """Start ``worker.py`` under ``accelerate launch <launcher...>`` (or plain python without a launcher).

    ``port``: the main process's port (every node of one run names the same); default a free one. ``env``: extra
    environment variables (``FAIL_CHECKPOINT_RANK``: see worker.py).
    """
    dump.mkdir(parents=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled", **(env or {}))
    if launcher:
        command = [str(ACCELERATE), "launch", *launcher, "--main_process_port", str(port or free_port()), str(WORKER)]
    else:
        command = [sys.executable, str(WORKER)]
    return subprocess.Popen(
        [*command, str(dump), "--", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(process: subprocess.Popen, timeout: float = 600) -> str:
    """Wait for a successful exit; returns the process's output."""
    # generous: the first DeepSpeed launch on a machine compiles its CPU communication op (40 s to minutes)
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


def ranks(dump: Path) -> list[list[torch.Tensor]]:
    """Every rank's LoRA parameters (``rank<i>.pt``), rank order."""
    return [torch.load(path) for path in sorted(dump.glob("rank*.pt"))]


def trained(dump: Path) -> list[list[dict]]:
    """Every rank's per-step record of its groups and trained rollouts (``rank<i>.json``), rank order."""
    return [json.loads(path.read_text()) for path in sorted(dump.glob("rank*.json"))]
