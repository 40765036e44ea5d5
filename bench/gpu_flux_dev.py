"""The GPU path at FLUX.1-dev size: step time, training-step time, peak memory and capture overhead, random weights.

Builds a ``FluxTransformer2DModel`` with FLUX.1-dev's configuration (19 double + 38 single blocks, 24 heads x 128,
12B parameters) from random weights directly on the device in bf16 (nothing is downloaded), wraps it in a
``FluxPipeline`` without VAE or text encoders (random prompt embeddings stand in for T5 / CLIP), and runs the
trainer's own pieces on it: ``rl.lora.add_lora`` with the run defaults (r 64, alpha 128, ``FLUX_LORA_TARGETS``),
``rl.distributed.build_accelerator`` in bf16, ``rl.sampler.FluxSampler`` SDE rollouts at 512x512 (1024 image
tokens, 512 text tokens), ``probe.capture.ProbeRecorder`` at the capture step, and the trainer's policy-loss
composition (``FluxSampler.step_log_prob`` + ``rl.loss.grpo_loss``, optional KL to the adapter-disabled
reference) with ``accelerator.backward`` and an AdamW step on the LoRA.

Measured in one process (CUDA-synchronised wall clock, peak allocation reset per measurement):

- ``denoise``: every step of one rollout batch (``--sample_batch`` rollouts per transformer call), step 0 being
  the warm-up; the median of the others is the time per denoising step.
- ``capture``: the capture step run from the same states without and with the recorder, interleaved (one
  warm-up round dropped): the difference is the capture overhead at that step.
- ``train``: one training micro-step (forward + backward at one denoising step + optimizer step) per variant of
  ``--train_variants`` (``B``, ``B+kl``, ``B+ckpt``: batch, KL reference forward, gradient checkpointing).

The weights are random, so only costs mean anything (no image quality). The GPU images lack trl, so arguments
are plain argparse, and the Markdown section is written from the JSON afterwards (``--report``)::

    python bench/gpu_flux_dev.py --out /tmp/gpu.json            # on the GPU machine (JSON only)
    python bench/gpu_flux_dev.py --report /tmp/gpu.json         # here: append the section to bench/RESULTS.md
    python bench/gpu_flux_dev.py --tiny --out /tmp/tiny.json    # CPU smoke run of the same code path
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import diffusers
import peft
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from probe.capture import ProbeRecorder
from rl.config import RunConfig
from rl.config_help import HelpFormatter
from rl.config_parse import parse_config
from rl.distributed import build_accelerator
from rl.lora import add_lora, disable_adapter
from rl.loss import grpo_loss
from rl.sampler import FluxSampler, PromptEmbeddings, Rollouts
from rl.sde import kl_to_reference
from rl.tiny_flux import FLUX_DEV_SCHEDULER

FLUX_DEV_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "flux_dev_geneval.yaml"
RESULTS_SECTION = "GPU path: FLUX.1-dev-sized transformer, random weights, bf16"

# black-forest-labs/FLUX.1-dev transformer/config.json (its scheduler: rl.tiny_flux.FLUX_DEV_SCHEDULER)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
# same code path on a CPU in seconds; sum(axes_dims_rope) must equal attention_head_dim (docs/design.md section 10)
TINY = dict(FLUX_DEV, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2)
TINY.update(joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(8, 12, 12))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="2 double + 2 single blocks, 2 heads x 32, 64x64 px")
    parser.add_argument("--resolution", type=int, default=None, help="image side in px (default 512; tiny 64)")
    parser.add_argument("--text_length", type=int, default=None, help="T5 tokens (default 512; tiny 16)")
    parser.add_argument("--sample_batch", type=int, default=4, help="rollouts per transformer call while sampling")
    parser.add_argument("--num_steps", type=int, default=None, help="T (default: the run default)")
    parser.add_argument("--capture_step", type=int, default=None, help="k, 1-based (default: the run default)")
    parser.add_argument("--train_step", type=int, default=1, help="0-based denoising step the training step uses")
    parser.add_argument(
        "--train_variants",
        default="1,2,2+kl,2+ckpt,4+ckpt",
        help="comma-separated training variants: batch, optionally +kl (KL reference forward) and +ckpt "
        "(gradient checkpointing)",
    )
    parser.add_argument(
        "--throughput_batches",
        default="16",
        help="comma-separated larger sampling batches timed last (denoising throughput; the run default is 16)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="bench/gpu_flux_dev.json", help="JSON output (rewritten after each phase)")
    parser.add_argument("--report", default="", help="instead of measuring: write this JSON's section to --results")
    parser.add_argument("--results", default="bench/RESULTS.md", help="Markdown results file")
    parser.add_argument("--report_command", default="", help="with --report: the command line to cite")
    return parser.parse_args(argv)


def parse_variant(text: str) -> dict:
    """``"2+kl+ckpt"`` -> ``{"batch": 2, "kl": True, "checkpointing": True}``.

    Raises:
        ValueError: naming the variant, for an unknown flag or a non-integer batch.
    """
    batch, *flags = text.strip().split("+")
    unknown = set(flags) - {"kl", "ckpt"}
    if unknown or not batch.isdigit() or int(batch) < 1:
        raise ValueError(f"train variant {text!r}: expected BATCH[+kl][+ckpt], e.g. 2+ckpt")
    return {"batch": int(batch), "kl": "kl" in flags, "checkpointing": "ckpt" in flags}


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def build_pipeline(config: dict, device: torch.device) -> FluxPipeline:
    """A FluxPipeline around a randomly initialised transformer built in place on ``device`` in bf16.

    Constructing under the device and dtype defaults runs each layer's own initialiser there (12B parameters in
    seconds on a GPU, no fp32 copy). No VAE or text encoders: the sampler needs neither for denoising and
    scoring (``vae_scale_factor`` falls back to FLUX's 8), and prompt embeddings are random.
    """
    with torch.device(device), default_dtype(torch.bfloat16):
        transformer = FluxTransformer2DModel(**config)
    transformer.requires_grad_(False).eval()  # as rl.trainer.load_pipeline: frozen, eval mode throughout
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
    return FluxPipeline(
        scheduler=scheduler,
        vae=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )


def random_embeddings(
    num_prompts: int, text_length: int, config: dict, device: torch.device, generator: torch.Generator
) -> PromptEmbeddings:
    """Random stand-ins for T5 token embeddings and the CLIP pooled embedding (every token real)."""
    shape = (num_prompts, text_length, config["joint_attention_dim"])
    return PromptEmbeddings(
        prompt_embeds=torch.randn(shape, generator=generator).to(device, torch.bfloat16),
        pooled_embeds=torch.randn(num_prompts, config["pooled_projection_dim"], generator=generator).to(
            device, torch.bfloat16
        ),
        text_ids=torch.zeros(text_length, 3, device=device),
        token_mask=torch.ones(num_prompts, text_length, dtype=torch.bool, device=device),
        prompts=[f"random prompt {i}" for i in range(num_prompts)],
    )


class Clock:
    """Wall-clock and peak-memory measurement of one call, synchronised with the device."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def measure(self, fn: Callable[..., object], *args, **kwargs) -> tuple[float, float | None, object]:
        """``(seconds, peak GiB allocated during the call (None on a CPU), fn(*args, **kwargs))``."""
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = self.sync()
        result = fn(*args, **kwargs)
        seconds = self.sync() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        return seconds, peak, result

    def allocated_gib(self) -> float | None:
        return torch.cuda.memory_allocated() / 2**30 if self.cuda else None


def maximum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        # as rl.trainer.GRPOTrainer.setup: cuDNN's attention backward returns NaN gradients under bf16
        torch.backends.cuda.enable_cudnn_sdp(False)
    defaults = RunConfig()
    s, t = defaults.sampling, defaults.training
    flux_dev = parse_config(["--config", str(FLUX_DEV_CONFIG)])  # FLUX.1-dev's image size, text length, LoRA
    m = flux_dev.model
    model_config = TINY if args.tiny else FLUX_DEV
    resolution = args.resolution or (64 if args.tiny else flux_dev.sampling.height)
    text_length = args.text_length or (16 if args.tiny else m.max_sequence_length)
    num_steps = args.num_steps or s.num_steps
    capture_step = args.capture_step or defaults.pruning.capture_step
    variants = [parse_variant(v) for v in args.train_variants.split(",") if v.strip()]
    clock = Clock(device)
    result: dict = {
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__},
        "model": "tiny" if args.tiny else "FLUX.1-dev",
        "model_config": {k: list(v) if isinstance(v, tuple) else v for k, v in model_config.items()},
        "resolution": resolution,
        "text_length": text_length,
        "num_steps": num_steps,
        "noise_level": s.noise_level,
        "capture_step": capture_step,
        "lora": {"rank": m.lora_rank, "alpha": m.lora_alpha, "targets": list(m.lora_target_modules)},
    }

    def save() -> None:  # after every phase, so a run cut short still returns what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))

    build_s, _, pipeline = clock.measure(build_pipeline, model_config, device)
    transformer = pipeline.transformer
    result["build_s"] = build_s
    result["transformer_params"] = sum(p.numel() for p in transformer.parameters())
    result["weights_gib"] = clock.allocated_gib()
    accelerator = build_accelerator("bf16", 1)
    lora_s, _, lora_params = clock.measure(
        add_lora, transformer, m.lora_rank, m.lora_alpha, m.lora_target_modules, m.init_lora_weights
    )
    for param in lora_params:  # as the trainer: trainable weights stay fp32 under bf16 autocast
        param.data = param.data.float()
    result["lora_s"] = lora_s
    result["lora_params"] = sum(p.numel() for p in lora_params)
    optimizer = torch.optim.AdamW(lora_params, lr=t.learning_rate, weight_decay=t.adam_weight_decay)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    result["weights_and_lora_gib"] = clock.allocated_gib()
    print(f"built {result['transformer_params'] / 1e9:.2f}B params in {build_s:.1f} s (+ LoRA {lora_s:.1f} s)")
    save()

    num_rollouts = max(args.sample_batch, *(v["batch"] for v in variants))
    sampler = FluxSampler(
        pipeline, num_steps, s.noise_level, s.guidance_scale, resolution, resolution, args.sample_batch
    )
    generator = torch.Generator().manual_seed(0)
    embeds = random_embeddings(2, text_length, model_config, device, generator)
    prompt_index = torch.arange(num_rollouts) % 2
    start = sampler.start(prompt_index, torch.arange(num_rollouts), device)
    result["image_tokens"] = sampler.num_tokens

    # denoising: one rollout batch through all T steps, one step per advance call (step 0 warms up)
    rollouts, step_s, step_peak = start, [], []
    with accelerator.autocast():
        for step in range(num_steps):
            seconds, peak, rollouts = clock.measure(sampler.advance, rollouts, embeds, step + 1)
            step_s.append(seconds)
            step_peak.append(peak)
    per_call = statistics.median(step_s[1:]) if num_steps > 1 else step_s[0]
    result["denoise"] = {
        "rollouts": num_rollouts,
        "batch": args.sample_batch,
        "step_s": step_s,
        "median_step_s": per_call,
        "median_step_s_per_image": per_call * args.sample_batch / num_rollouts,
        "rollout_s": sum(step_s),
        "peak_gib": maximum(step_peak),
        "finite": bool(torch.isfinite(rollouts.states).all()),
    }
    print(f"denoise: {per_call:.3f} s per step ({num_rollouts} rollouts, batch {args.sample_batch})")
    save()

    # capture overhead at step k: the same states run to step k without and with the recorder, interleaved
    before = Rollouts(
        rollouts.prompt_index,
        rollouts.seeds,
        rollouts.states[:, :capture_step],
        rollouts.log_probs[:, : capture_step - 1],
    )
    plain_s, plain_peak, capture_s, capture_peak = [], [], [], []
    with accelerator.autocast():
        for _ in range(args.repeats + 1):
            recorder = None  # the previous round's maps would count in the plain peak
            seconds, peak, _ = clock.measure(sampler.advance, before, embeds, capture_step)
            plain_s.append(seconds)
            plain_peak.append(peak)
            recorder = ProbeRecorder.for_sampler(sampler, capture_step, None, text_length)
            seconds, peak, _ = clock.measure(sampler.advance, before, embeds, capture_step, observer=recorder)
            capture_s.append(seconds)
            capture_peak.append(peak)
    capture = recorder.result()
    plain, captured = statistics.median(plain_s[1:]), statistics.median(capture_s[1:])
    result["capture"] = {
        "blocks": list(capture.blocks),
        "maps_shape": list(capture.attention.shape),
        "maps_mib": capture.attention.numel() * capture.attention.element_size() / 2**20,
        "plain_s": plain_s,
        "capture_s": capture_s,
        "median_plain_s": plain,
        "median_capture_s": captured,
        "overhead_s": captured - plain,
        "overhead_fraction": (captured - plain) / plain,
        "plain_peak_gib": maximum(plain_peak[1:]),
        "capture_peak_gib": maximum(capture_peak[1:]),
    }
    print(f"capture at step {capture_step}: {plain:.3f} s plain, {captured:.3f} s with capture")
    save()

    # training micro-steps: the trainer's policy loss (rl.trainer.GRPOTrainer.policy_loss / optimise) per variant
    advantages = torch.randn(num_rollouts, generator=generator).to(device)
    result["train"] = []
    for variant in variants:
        rows = torch.arange(variant["batch"], device=device)
        step = torch.full((variant["batch"],), args.train_step, device=device)
        if variant["checkpointing"]:
            transformer.enable_gradient_checkpointing()
        else:
            transformer.disable_gradient_checkpointing()

        def train_step(rows: torch.Tensor = rows, step: torch.Tensor = step, kl_on: bool = variant["kl"]) -> tuple:
            with accelerator.accumulate(model):
                current = sampler.step_log_prob(rollouts, step, embeds, rows, model=model)
                kl = None
                if kl_on:
                    with torch.no_grad(), disable_adapter(transformer):
                        reference = sampler.step_log_prob(rollouts, step, embeds, rows)
                    kl = kl_to_reference(current.mean, reference.mean, current.sigma_t)
                old = rollouts.log_probs[rows, step]
                kl_beta = 0.04 if kl_on else 0.0  # Flow-GRPO's FLUX value; the cost is the reference forward
                out = grpo_loss(current.log_prob, old, advantages[rows], t.clip_range, kl, kl_beta)
                accelerator.backward(out.loss)
                grad_norm = accelerator.clip_grad_norm_(lora_params, t.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
            return float(out.loss.detach()), float(grad_norm), float(out.ratio_mean)

        entry: dict = dict(variant, step_s=[], peak_gib=None, error=None)
        try:
            peaks = []
            for _ in range(args.repeats + 1):
                seconds, peak, (loss, grad_norm, ratio) = clock.measure(train_step)
                entry["step_s"].append(seconds)
                peaks.append(peak)
            entry.update(
                median_step_s=statistics.median(entry["step_s"][1:]),
                peak_gib=maximum(peaks),
                loss=loss,
                grad_norm=grad_norm,
                ratio_mean=ratio,
            )
            print(f"train {variant}: {entry['median_step_s']:.3f} s, peak {entry['peak_gib']} GiB")
        except torch.OutOfMemoryError as error:  # a variant too large for the card is a result, not a crash
            entry["error"] = f"out of memory: {str(error).splitlines()[0]}"
            optimizer.zero_grad()
            print(f"train {variant}: {entry['error']}")
        result["train"].append(entry)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        save()
    transformer.disable_gradient_checkpointing()

    # denoising throughput at larger sampling batches: the steps after the capture step, from fresh rollouts
    result["throughput"] = []
    for batch in [int(b) for b in args.throughput_batches.split(",") if b.strip()]:
        entry = {"batch": batch, "step_s": [], "peak_gib": None, "error": None}
        wide = FluxSampler(pipeline, num_steps, s.noise_level, s.guidance_scale, resolution, resolution, batch)
        current = wide.start(torch.arange(batch) % 2, torch.arange(batch), device)
        try:
            peaks = []
            with accelerator.autocast():
                for step in range(min(num_steps, args.repeats + 1)):
                    seconds, peak, current = clock.measure(wide.advance, current, embeds, step + 1)
                    entry["step_s"].append(seconds)
                    peaks.append(peak)
            median = statistics.median(entry["step_s"][1:]) if len(entry["step_s"]) > 1 else entry["step_s"][0]
            entry.update(median_step_s=median, peak_gib=maximum(peaks))
            print(f"denoise batch {batch}: {median:.3f} s per step")
        except torch.OutOfMemoryError as error:
            entry["error"] = f"out of memory: {str(error).splitlines()[0]}"
        result["throughput"].append(entry)
        save()
    return result


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} GiB"


def report_lines(result: dict, command: str) -> list[str]:
    d, c = result["denoise"], result["capture"]
    rollout = d["median_step_s"] * result["num_steps"]
    lines = [
        "",
        f"### {result['date']}: `{command or result['command']}`",
        "",
        f"{result['device']}, torch {result['versions']['torch']}, diffusers {result['versions']['diffusers']}, "
        f"peft {result['versions']['peft']}. Model: {result['model']} "
        f"({result['transformer_params'] / 1e9:.2f}B parameters, random weights built on the device in bf16 in "
        f"{result['build_s']:.1f} s; {gib(result['weights_gib'])} of weights), LoRA r {result['lora']['rank']} alpha "
        f"{result['lora']['alpha']:g} on the run's targets ({result['lora_params'] / 1e6:.1f}M fp32 parameters), "
        f"{result['resolution']}x{result['resolution']} px = {result['image_tokens']} image tokens + "
        f"{result['text_length']} text tokens, T = {result['num_steps']}, SDE noise level {result['noise_level']}, "
        "bf16 autocast through accelerate. Medians of the timed repeats after a warm-up.",
        "",
        "| phase | batch | time | peak GPU memory |",
        "|---|---|---|---|",
        f"| denoising step (SDE, no grad) | {d['batch']} | {d['median_step_s']:.3f} s "
        f"({d['median_step_s'] / d['batch'] * 1000:.0f} ms per image) | {gib(d['peak_gib'])} |",
        f"| whole rollout, T = {result['num_steps']} (T x median step; measured incl. warm-up "
        f"{d['rollout_s']:.2f} s) | {d['batch']} | {rollout:.2f} s | {gib(d['peak_gib'])} |",
        f"| capture step {result['capture_step']} without / with capture | {d['batch']} | "
        f"{c['median_plain_s']:.3f} / {c['median_capture_s']:.3f} s | "
        f"{gib(c['plain_peak_gib'])} / {gib(c['capture_peak_gib'])} |",
    ]
    for entry in result["train"]:
        label = "training micro-step (fwd + bwd + AdamW on LoRA)"
        label += " + KL reference" if entry["kl"] else ""
        label += ", gradient checkpointing" if entry["checkpointing"] else ""
        timing = entry["error"] or f"{entry['median_step_s']:.3f} s"
        lines.append(f"| {label} | {entry['batch']} | {timing} | {gib(entry['peak_gib'])} |")
    for entry in result.get("throughput", []):
        timing = entry["error"] or (
            f"{entry['median_step_s']:.3f} s ({entry['median_step_s'] / entry['batch'] * 1000:.0f} ms per image)"
        )
        lines.append(f"| denoising step (SDE, no grad) | {entry['batch']} | {timing} | {gib(entry['peak_gib'])} |")
    lines += [
        "",
        f"Capture overhead at step {result['capture_step']}: {c['overhead_s'] * 1000:+.1f} ms "
        f"({100 * c['overhead_fraction']:+.1f}% of that step; "
        f"{100 * c['overhead_s'] / rollout:+.2f}% of a T-step rollout) for {len(c['blocks'])} blocks "
        f"{c['blocks']}, maps {c['maps_shape']} = {c['maps_mib']:.1f} MiB fp32. Outputs finite: {d['finite']}.",
        "",
        "Training diagnostics (last repeat; LoRA B starts at 0), ratio mean / LoRA grad norm: "
        + ", ".join(
            f"{e['batch']}{'+kl' if e['kl'] else ''}{'+ckpt' if e['checkpointing'] else ''} "
            f"{e['ratio_mean']:.6f} / {e['grad_norm']:.2g}"
            for e in result["train"]
            if not e["error"]
        )
        + ".",
    ]
    return lines


def main() -> None:
    args = parse_args()
    if args.report:
        # bench.probe_quality imports trl, which the GPU images lack: the Markdown is written here, afterwards
        from bench.probe_quality import add_to_section

        result = json.loads(Path(args.report).read_text())
        add_to_section(args.results, RESULTS_SECTION, report_lines(result, args.report_command))
        return
    result = measure(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
