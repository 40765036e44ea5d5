"""The whole trainer loop on a FLUX.1-dev-architecture transformer: steps with pruning, a checkpoint and a resume,
per-phase times and peak memory, under DDP (one process), ZeRO-2 and ZeRO-3 on one GPU.

The pipeline is FLUX.1-dev's transformer with random weights (bf16) beside a tiny VAE and one-layer text encoders
whose widths match it (T5 4096, CLIP pooled 768), saved once to ``--work``; every mode then runs the real entry
script (``launch/grpo_flux.py``, through ``accelerate launch`` for DeepSpeed) on the shapes prompts: ``--steps``
GRPO steps of 2 prompts x 8 rollouts, half of each group kept at step 4 by ``--predictor`` (default the attention
probe, freshly initialised: random weights cost what trained ones do, and no probe is trained for this model; or
``preview``, ``lookahead``), a checkpoint at step ``--steps - 2``, then a resume
from it to the end, compared with the uninterrupted run's LoRA. 1024 image tokens (256 px through the tiny VAE's
4x downsampling) and 512 text tokens.

    python bench/gpu_full_loop.py                    # on a GPU: writes bench/gpu_full_loop.json + RESULTS section
    # where one command may run 10 minutes at most (each mode loads the 24 GB transformer twice): a mode per call,
    # the pipeline kept in --work between them, the results written where the machine hands files back
    python bench/gpu_full_loop.py --modes ddp --work /tmp/loop --out $OUT/ddp.json --results ''
    python bench/gpu_full_loop.py --smoke            # CPU, tiny transformer, DDP (--modes: also ZeRO, in bf16): the tests

Times are the trainer's own ``time/<phase>_s`` (mean over the steps after the first), memory its ``memory/*``.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file
from transformers import T5Config, T5EncoderModel

from bench.gpu_flux_dev import FLUX_DEV, TINY, default_dtype
from bench.probe_quality import add_to_section
from rewards.shapes import vocabulary
from rl.config_help import HelpFormatter
from rl.metrics_log import read_metrics
from rl.tiny_flux import TinyFluxConfig, build_tiny_flux_pipeline

ROOT = Path(__file__).resolve().parents[1]
RESULTS_SECTION = "GPU: the full trainer loop on a FLUX.1-dev-architecture transformer (bench/gpu_full_loop.py)"
MODES = {  # accelerate launch options of each mode on one process ([]: plain python)
    "ddp": [],
    "zero2": ["--config_file", str(ROOT / "configs/accelerate/deepspeed_zero2.yaml"), "--num_processes", "1"],
    "zero3": ["--config_file", str(ROOT / "configs/accelerate/deepspeed_zero3.yaml"), "--num_processes", "1"],
}
PHASES = ("prompts", "sample", "predict", "decode", "reward", "score_wait", "train", "checkpoint")


def build_pipeline_folder(folder: Path, transformer_config: dict, text_length: int, dtype: torch.dtype) -> None:
    """Save a FluxPipeline: ``transformer_config`` with random weights, a tiny VAE, one-layer text encoders as wide
    as the transformer reads (CLIP's hidden size is the pooled width, T5's the token width)."""
    pooled, width = transformer_config["pooled_projection_dim"], transformer_config["joint_attention_dim"]
    pipeline = build_tiny_flux_pipeline(
        vocabulary(), TinyFluxConfig(text_length=text_length, text_dim=pooled, text_layers=1)
    )
    small = pipeline.text_encoder_2.config
    pipeline.text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=small.vocab_size, d_model=width, d_kv=64, d_ff=256, num_layers=1, num_heads=4,
                 relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ).eval()  # fmt: skip
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device), default_dtype(dtype):  # each layer's own initialiser, in place (seconds for 12B)
        pipeline.transformer = FluxTransformer2DModel(**transformer_config).eval()
    pipeline.to(dtype=dtype).save_pretrained(folder)


def run_args(
    pipeline: Path, output: Path, steps: int, smoke: bool, predictor: str = "probe", precision: str = "bf16"
) -> list[str]:
    size = ["--height", "64", "--width", "64", "--max_sequence_length", "16", "--num_steps", "6"] if smoke else [
        "--height", "256", "--width", "256", "--max_sequence_length", "512", "--num_steps", "10"]  # fmt: skip
    return [
        "--config", str(ROOT / "configs" / "tiny_shapes.yaml"), "--pretrained", str(pipeline), *size,
        "--mixed_precision", precision, "--lora_rank", "64", "--lora_alpha", "128",
        "--prompts_per_step", "2", "--group_size", "8", "--sample_batch_size", "8", "--train_batch_size", "4",
        "--prune_policy", "variance", "--prune_keep_fraction", "0.5", "--predictor", predictor, "--capture_step", "4",
        "--probe_path", "init" if predictor == "probe" else "", "--max_steps", str(steps), "--max_minutes", "0", "--save_every", str(steps - 2),
        "--eval_every", "0", "--eval_before_training", "false", "--final_eval_num_prompts", "2",
        "--final_eval_images_per_prompt", "1", "--wandb_mode", "disabled", "--progress_bar", "false",
        "--output_dir", str(output),
    ]  # fmt: skip


def launch(mode: str, args: list[str]) -> None:
    if MODES[mode]:
        accelerate = str(Path(sys.executable).with_name("accelerate"))
        command = [accelerate, "launch", *MODES[mode], str(ROOT / "launch" / "grpo_flux.py"), *args]
    else:
        command = [sys.executable, str(ROOT / "launch" / "grpo_flux.py"), *args]
    done = subprocess.run(command, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{mode} failed:\n{(done.stdout + done.stderr)[-4000:]}")


def lora(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "lora" / "pytorch_lora_weights.safetensors")


def run_mode(mode: str, pipeline: Path, work: Path, steps: int, smoke: bool, predictor: str) -> dict:
    """The uninterrupted run, then a resume from its checkpoint at step ``steps - 2`` (a branch into its own folder:
    the run's folder holds the later checkpoints); times, memory, equality."""
    output, branch = work / mode, work / f"{mode}-resumed"
    shutil.rmtree(output, ignore_errors=True)
    shutil.rmtree(branch, ignore_errors=True)
    # the smoke runs DeepSpeed in bf16 as the GPU does (its bf16 LoRA copy, the fp32 masters the trainer reads);
    # DDP in fp32, whose CPU bf16 autocast would only slow it
    precision = "bf16" if not smoke or MODES[mode] else "no"
    args = run_args(pipeline, output, steps, smoke, predictor, precision)
    launch(mode, args)
    whole = lora(output)
    records = [r for r in read_metrics(output / "metrics.jsonl") if "time/step_s" in r]
    checkpoint = output / "checkpoints" / f"step-{steps - 2:08d}"
    launch(mode, [*args, "--resume_from", str(checkpoint), "--output_dir", str(branch)])
    resumed = lora(branch)
    after_first = records[1:] or records
    return {
        "steps": len(records),
        "step_s": statistics.mean(r["time/step_s"] for r in after_first),
        "phase_s": {p: statistics.mean(r.get(f"time/{p}_s", 0.0) for r in after_first) for p in PHASES},
        "memory_mib": {k.split("/")[1]: max(r[k] for r in records) for k in records[-1] if k.startswith("memory/")},
        "survivor_frac": statistics.mean(r.get("prune/survivor_frac", 1.0) for r in records),
        "resume_max_abs_diff": max(float((whole[k] - resumed[k]).abs().max()) for k in whole),
    }


def report_lines(result: dict, command: str) -> list[str]:
    lines = [
        f"### {result['date'][:10]} on {result['device']}: `{command}`",
        "",
        f"{result['steps']} GRPO steps (2 prompts x 8 rollouts, half kept at step 4 by the {result['predictor']}), "
        "then a resume "
        f"from step {result['steps'] - 2}; seconds per step after the first; peak memory of the process.",
        "",
        "| mode | step s | " + " | ".join(f"{p} s" for p in PHASES) + " | peak GiB | resume max abs diff |",
        "|---|---|" + "---|" * len(PHASES) + "---|---|",
    ]
    for mode, m in result["modes"].items():
        phases = " | ".join(f"{m['phase_s'][p]:.2f}" for p in PHASES)
        peak = m["memory_mib"].get("peak_mib", float("nan")) / 1024
        lines.append(f"| {mode} | {m['step_s']:.2f} | {phases} | {peak:.1f} | {m['resume_max_abs_diff']:.2e} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny transformer (seconds per mode)")
    parser.add_argument("--steps", type=int, default=5, help="GRPO steps; the checkpoint is at steps - 2")
    parser.add_argument(
        "--modes", default=None, help="comma-separated, of: " + ", ".join(MODES) + " (default: all; --smoke: ddp)"
    )
    parser.add_argument("--predictor", default="probe", choices=("probe", "preview", "lookahead"), help="what prunes")
    parser.add_argument(
        "--work", default=None, help="folder of the pipeline and the runs (default: /tmp/gpu_full_loop[_smoke])"
    )
    parser.add_argument("--out", default="bench/gpu_full_loop.json", help="JSON output")
    parser.add_argument("--results", default="bench/RESULTS.md", help="Markdown file of the section ('': none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.steps < 3:
        raise SystemExit("--steps must be at least 3 (the checkpoint is at steps - 2)")
    work = Path(args.work or ("/tmp/gpu_full_loop_smoke" if args.smoke else "/tmp/gpu_full_loop"))
    pipeline = work / "pipeline"
    config, length = (TINY, 16) if args.smoke else (FLUX_DEV, 512)
    built = {"transformer": config, "text_length": length, "dtype": "float32" if args.smoke else "bfloat16"}
    built = json.loads(json.dumps(built))  # as read back (tuples become lists)
    record = work / "pipeline_built.json"  # a smoke pipeline must never be timed as FLUX.1-dev, nor the reverse
    if not (pipeline / "model_index.json").is_file() or not record.is_file() or json.loads(record.read_text()) != built:
        shutil.rmtree(pipeline, ignore_errors=True)
        build_pipeline_folder(pipeline, config, length, torch.float32 if args.smoke else torch.bfloat16)
        record.write_text(json.dumps(built))
        gc.collect()  # the 12B transformer built here must not stay cached in this process while the runs train
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    modes = (args.modes or ("ddp" if args.smoke else ",".join(MODES))).split(",")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device, "steps": args.steps}
    result["predictor"] = args.predictor
    result["modes"] = {}
    for mode in modes:
        result["modes"][mode] = run_mode(mode, pipeline, work, args.steps, args.smoke, args.predictor)
        print(mode, json.dumps(result["modes"][mode]), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1))  # after each mode: a time limit keeps the done ones
    if args.results:
        add_to_section(args.results, RESULTS_SECTION, report_lines(result, "python bench/gpu_full_loop.py"))
    return result


if __name__ == "__main__":
    main()
