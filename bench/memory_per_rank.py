"""Memory per process under DDP, ZeRO-2, ZeRO-3 and FSDP: measured on the tiny model, projected for FLUX.1-dev.

Measured: one GRPO step of the shipped tiny model on two CPU processes under each launch config; the trainer's
``memory/*`` metrics (rl/memory.py: what one process stores of the frozen weights, the LoRA and the optimizer
state, and its peak resident memory). ZeRO-3 runs with every parameter partitioned (DeepSpeed keeps parameters
under 100k elements whole by default, which on the tiny model is all of them).

Projected: FLUX.1-dev's model state per GPU at 1, 2, 4 and 8 GPUs from parameter counts (the transformer and its
rank-64 LoRA as bench/gpu_flux_dev.py counted them on a GPU; the largest block and the frozen encoders counted from
their architectures on the meta device): bf16 base, fp32 LoRA, fp32 gradients and AdamW moments; ZeRO-2 splits the
gradients and moments, ZeRO-3 and FSDP split everything and gather one block at a time (two buffers: the block
running and the one prefetched). The text encoders and the VAE are loaded whole on every process. Activations are
not projected: bench/gpu_flux_dev.py measured a batch-1 training step at 1024 image tokens on an H200.

    python bench/memory_per_rank.py              # 4 two-process launches: a few minutes
    python bench/memory_per_rank.py --skip_measure   # the projection only, in seconds

Writes ``--out`` (JSON) and a section of ``--results``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import torch
import yaml

from bench.probe_quality import add_to_section
from rl.config_help import HelpFormatter
from rl.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS_SECTION = "Memory per process: DDP, ZeRO-2, ZeRO-3, FSDP (bench/memory_per_rank.py)"
GIB = 2**30
MODES = ("ddp", "zero2", "zero3", "fsdp")
GPU_COUNTS = (1, 2, 4, 8)
# one small step on 2 processes: 2 prompts x 4 rollouts, no evaluation
STEP = ["--max_steps", "1", "--max_minutes", "0", "--prompts_per_step", "2", "--group_size", "4",
        "--sample_batch_size", "8", "--train_batch_size", "8", "--eval_before_training", "false", "--eval_every", "0",
        "--final_eval_num_prompts", "2", "--final_eval_images_per_prompt", "1", "--save_lora", "false",
        "--wandb_mode", "disabled", "--progress_bar", "false", "--mixed_precision", "no"]  # fmt: skip


@dataclasses.dataclass(frozen=True)
class ModelCounts:
    """Parameter counts of a model to project: the sharded transformer, its LoRA, its largest block (the unit
    FSDP and ZeRO-3 gather) and the frozen parts every process holds whole (text encoders, VAE)."""

    transformer: int
    lora: int
    largest_block: int
    whole_on_every_rank: int


def projection(counts: ModelCounts, gpus: int) -> dict[str, dict[str, float]]:
    """Model state per GPU in GiB for each mode: bf16 frozen weights (2 bytes), fp32 LoRA, gradients and AdamW's
    two moments (4 + 4 + 8 bytes)."""
    base, lora, encoders = 2 * counts.transformer, counts.lora, 2 * counts.whole_on_every_rank
    gathered = 2 * (2 * counts.largest_block) if gpus > 1 else 0  # the running block and the prefetched one
    per_mode = {
        "ddp": (base, 16 * lora),
        "zero2": (base, 4 * lora + 12 * lora / gpus),
        "zero3": (base / gpus + gathered, 16 * lora / gpus),
        "fsdp": (base / gpus + gathered, 16 * lora / gpus),
    }
    return {
        mode: {
            "transformer_gib": frozen / GIB,
            "lora_and_optimizer_gib": trained / GIB,
            "encoders_gib": encoders / GIB,
            "total_gib": (frozen + trained + encoders) / GIB,
        }
        for mode, (frozen, trained) in per_mode.items()
    }


def flux_dev_counts() -> ModelCounts:
    """FLUX.1-dev's counts: transformer and LoRA from bench/gpu_flux_dev.json, the rest built on the meta device."""
    from diffusers import AutoencoderKL
    from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    measured = json.loads((ROOT / "bench" / "gpu_flux_dev.json").read_text())
    with torch.device("meta"):
        blocks = [FluxTransformerBlock(3072, 24, 128), FluxSingleTransformerBlock(3072, 24, 128)]
        t5 = T5EncoderModel(T5Config(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                     feed_forward_proj="gated-gelu", vocab_size=32128))  # fmt: skip
        clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, projection_dim=768))  # fmt: skip
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
            layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return ModelCounts(
        transformer=measured["transformer_params"],
        lora=measured["lora_params"],
        largest_block=max(count(block) for block in blocks),
        whole_on_every_rank=count(t5) + count(clip) + count(vae),
    )


def zero3_partition_all_config(folder: Path, processes: int) -> Path:
    """An accelerate launch config for ZeRO-3 on CPU processes with every parameter partitioned."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    ds.update(
        dict.fromkeys(("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"), "auto")
    )
    (folder / "ds.json").write_text(json.dumps(ds))
    config = {
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"deepspeed_config_file": str(folder / "ds.json"), "zero3_init_flag": False},
        "num_machines": 1, "num_processes": processes, "machine_rank": 0, "rdzv_backend": "static",
        "same_network": True, "use_cpu": False,
    }  # fmt: skip
    (folder / "accelerate.yaml").write_text(yaml.safe_dump(config))
    return folder / "accelerate.yaml"


def launch_config(mode: str, folder: Path) -> list[str]:
    """``accelerate launch`` options of a two-process CPU run in ``mode``."""
    configs = ROOT / "configs" / "accelerate"
    two = ["--num_processes", "2"]
    if mode == "ddp":
        return ["--config_file", str(configs / "cpu_2proc.yaml")]
    if mode == "zero2":
        return ["--config_file", str(configs / "deepspeed_zero2.yaml"), *two, "--mixed_precision", "no"]
    if mode == "zero3":
        return ["--config_file", str(zero3_partition_all_config(folder / "zero3_config", 2))]
    return ["--config_file", str(configs / "fsdp.yaml"), *two, "--mixed_precision", "no"]


def measure(mode: str, folder: Path, port: int) -> dict[str, float]:
    """One step of the tiny model on two CPU processes in ``mode``; its ``memory/*`` metrics."""
    output = folder / mode
    command = [str(Path(sys.executable).with_name("accelerate")), "launch", *launch_config(mode, folder),
               "--main_process_port", str(port), str(ROOT / "launch" / "grpo_flux.py"),
               "--config", str(ROOT / "configs" / "tiny_shapes.yaml"), *STEP, "--output_dir", str(output)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")  # two CPU processes also on a machine with a GPU
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{mode} run failed:\n{(done.stdout + done.stderr)[-3000:]}")
    record = next(r for r in read_metrics(output / "metrics.jsonl") if "memory/peak_mib" in r)
    return {key.split("/")[1]: value for key, value in record.items() if key.startswith("memory/")}


def frozen_parameters(result: dict) -> float:
    """The transformer's parameter count, from the largest (unsharded) frozen weights measured: fp32, 4 bytes."""
    return max(m["frozen_mib"] for m in result["measured"].values()) * 2**20 / 4


def report_lines(result: dict, command: str) -> list[str]:
    lines = [f"### {result['date'][:10]}: `{command}`", ""]
    if result.get("measured"):
        lines += [
            f"Measured: the shipped tiny model ({frozen_parameters(result) / 1e6:.2f}M-parameter transformer, LoRA "
            "rank 16), one GRPO step on 2 CPU processes; per process, the largest of the two:",
            "",
            "| mode | frozen weights MiB | LoRA MiB | optimizer state MiB | peak resident MiB |",
            "|---|---|---|---|---|",
        ]
        for mode, m in result["measured"].items():
            lines.append(
                f"| {mode} | {m['frozen_mib']:.2f} | {m['lora_mib']:.3f} | {m['optimizer_mib']:.3f} | {m['peak_mib']:.0f} |"
            )
        lines += ["", "The peak resident memory is mostly the Python, torch and library code of each process.", ""]
    counts = result["flux_dev_counts"]
    lines += [
        f"Projected for FLUX.1-dev (transformer {counts['transformer'] / 1e9:.2f}B parameters, LoRA rank 64 "
        f"{counts['lora'] / 1e6:.0f}M, largest block {counts['largest_block'] / 1e6:.0f}M, T5-XXL + CLIP-L + VAE "
        f"{counts['whole_on_every_rank'] / 1e9:.2f}B whole on every GPU): model state per GPU in GiB, bf16 weights, "
        "fp32 LoRA + gradients + AdamW. Activations come on top: a batch-1 training step at 1024 image tokens "
        "peaked 11 GiB above the weights on an H200 (bench/gpu_flux_dev.py).",
        "",
        "| mode | " + " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in GPU_COUNTS) + " |",
        "|---|" + "---|" * len(GPU_COUNTS),
    ]
    for mode in MODES:
        cells = [f"{result['projection'][str(g)][mode]['total_gib']:.1f}" for g in GPU_COUNTS]
        lines.append(f"| {mode} | " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--skip_measure", action="store_true", help="the FLUX.1-dev projection only, no launches")
    parser.add_argument("--port", type=int, default=29641, help="first main-process port of the launches")
    parser.add_argument("--out", default="bench/memory_per_rank.json", help="JSON output")
    parser.add_argument("--results", default="bench/RESULTS.md", help="Markdown file of the section ('': none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    counts = flux_dev_counts()
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "flux_dev_counts": dataclasses.asdict(counts),
        "projection": {str(g): projection(counts, g) for g in GPU_COUNTS},
        "measured": {},
    }
    if not args.skip_measure:
        with tempfile.TemporaryDirectory() as folder:
            for i, mode in enumerate(MODES):
                result["measured"][mode] = measure(mode, Path(folder), args.port + i)
                print(mode, result["measured"][mode], flush=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    if args.results:
        command = "python bench/memory_per_rank.py" + (" --skip_measure" if args.skip_measure else "")
        add_to_section(args.results, RESULTS_SECTION, report_lines(result, command))
    return result


if __name__ == "__main__":
    main()
