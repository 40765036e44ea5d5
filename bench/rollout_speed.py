"""Rollout-phase speed of probe-pruned vs unpruned GRPO, against the analytic limit; capture + probe overhead; memory.

One GRPO rollout phase = P prompts x G rollouts denoised, VAE-decoded and scored by the real reward. Measured
side by side in one process, interleaved (ABAB, first round dropped as warm-up), medians of ``--repeats`` (and
medians of per-round ratios, ``paired_*``, which load drifting between rounds affects less):

- ``unpruned``: every rollout to step T, decode all, reward all.
- ``pruned``: every rollout to capture step k with the probe's recorder, features + probe prediction, ``topk``
  survivors (``round(r G)`` per group), survivors re-batched to T, decode and reward survivors only.
- ``early`` / ``early_capture``: every rollout to step k without / with the recorder (capture cost = difference).

The analytic limit (docs/design.md section 5) of the pruned phase's denoising cost is ``k/T + r (1 - k/T)`` of the
unpruned one (0.6 at k=2, T=10, r=0.5: a 1.67x speedup); decode and reward scale with r alone, so the whole
phase may beat it slightly, while capture and probe inference push the other way. Peak memory of the early phase
with and without capture: CUDA peak allocation on a GPU; on the CPU, the peak RSS of a fresh subprocess each
(coarse: the loaded libraries dominate it), plus the exact size of what the capture keeps (maps and x0).

    python bench/rollout_speed.py                                   # shipped tiny model, random-init probe
    python bench/rollout_speed.py --probe assets/probe/<file>.pt    # a trained probe (same cost, real picks)

Writes ``--out`` (JSON) and a row in the "Rollout speed" section of ``bench/RESULTS.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import torch
from diffusers import FluxPipeline

from bench.probe_quality import add_to_section
from probe import Probe
from rewards.compose import build_reward_set
from rl.config import RunConfig
from rl.config_help import ConfigParser
from rl.data import load_prompt_source
from rl.predictors.probe_cnn import init_probe_for
from rl.prune_policies import keep_count
from rl.pruning import select_survivors
from rl.sampler import FluxSampler, encode_prompts

RESULTS_SECTION = "Rollout speed, pruned vs unpruned (bench/rollout_speed.py)"


@dataclasses.dataclass
class SpeedArgs:
    pipeline: str = dataclasses.field(default="assets/tiny-flux-shapes", metadata={"help": "FluxPipeline folder"})
    probe: str = dataclasses.field(default="init", metadata={"help": "probe file, or 'init' (random-init probe)"})
    capture_step: int = dataclasses.field(default=2, metadata={"help": "k (1-based)"})
    num_steps: int = dataclasses.field(default=10, metadata={"help": "T"})
    keep_fraction: float = dataclasses.field(default=0.5, metadata={"help": "r"})
    prompts: int = dataclasses.field(default=16, metadata={"help": "prompts per phase (shapes:train)"})
    group_size: int = dataclasses.field(default=8, metadata={"help": "G"})
    batch_size: int = dataclasses.field(default=32, metadata={"help": "rollouts per transformer call"})
    resolution: int = dataclasses.field(default=64, metadata={"help": "image size in pixels"})
    max_sequence_length: int = dataclasses.field(default=16, metadata={"help": "T5 tokens"})
    noise_level: float = dataclasses.field(default=0.9, metadata={"help": "SDE noise level"})
    reward: str = dataclasses.field(default="shapes", metadata={"help": "reward spec"})
    repeats: int = dataclasses.field(default=3, metadata={"help": "timed rounds after one warm-up round"})
    threads: int = dataclasses.field(default=1, metadata={"help": "torch CPU threads"})
    memory: bool = dataclasses.field(default=True, metadata={"help": "also measure peak memory with/without capture"})
    memory_only: str = dataclasses.field(default="", metadata={"help": "internal: 'plain' or 'capture' subprocess"})
    out: str = dataclasses.field(default="bench/rollout_speed.json", metadata={"help": "JSON output"})
    results: str = dataclasses.field(default="bench/RESULTS.md", metadata={"help": "Markdown results file"})


class Setup:
    """Pipeline, sampler, probe, reward and one phase's prompts, built once."""

    def __init__(self, args: SpeedArgs) -> None:
        self.args = args
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.pipeline = FluxPipeline.from_pretrained(args.pipeline).to(self.device)
        self.pipeline.set_progress_bar_config(disable=True)
        size = args.resolution
        self.sampler = FluxSampler(self.pipeline, args.num_steps, args.noise_level, 3.5, size, size, args.batch_size)
        config = RunConfig()
        config.model.pretrained, config.model.max_sequence_length = args.pipeline, args.max_sequence_length
        config.pruning.capture_step, config.reward.reward = args.capture_step, args.reward
        if args.probe == "init":
            self.probe = init_probe_for(self.sampler, config)
        else:
            self.probe = Probe.load(args.probe, self.pipeline.transformer, args.capture_step, args.num_steps)
        self.probe.to(self.device)
        self.reward_set = build_reward_set(args.reward)
        prompts = load_prompt_source("shapes:train").batch(0, args.prompts, seed=0)
        self.prompt_index = torch.arange(args.prompts).repeat_interleave(args.group_size)
        self.texts = [prompts[i].text for i in self.prompt_index.tolist()]
        self.metadata = [prompts[i].metadata for i in self.prompt_index.tolist()]
        self.embeds = encode_prompts(self.pipeline, [p.text for p in prompts], args.max_sequence_length)
        self.embeds = self.embeds.to(self.device)
        self.start = self.sampler.start(self.prompt_index, torch.arange(len(self.prompt_index)), self.device)

    def sync(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def score(self, latents: torch.Tensor, rows: torch.Tensor, times: dict) -> None:
        t = self.sync()
        images = self.sampler.decode(latents)
        times["decode"] = self.sync() - t
        t = self.sync()
        self.reward_set(images, [self.texts[i] for i in rows.tolist()], [self.metadata[i] for i in rows.tolist()])
        times["reward"] = self.sync() - t

    def unpruned(self) -> dict[str, float]:
        times: dict[str, float] = {}
        t = self.sync()
        done = self.sampler.advance(self.start, self.embeds, self.args.num_steps)
        times["denoise"] = self.sync() - t
        self.score(done.latents, torch.arange(len(done)), times)
        return times

    def pruned(self) -> dict[str, float]:
        args, sampler = self.args, self.sampler
        times: dict[str, float] = {}
        recorder = self.probe.recorder(sampler)
        t = self.sync()
        early = sampler.advance(self.start, self.embeds, args.capture_step, observer=recorder)
        times["denoise_early"] = self.sync() - t
        t = self.sync()
        capture = recorder.result(early)
        self.capture_bytes = sum(t.numel() * t.element_size() for t in (capture.attention, capture.x0) if t is not None)
        features = self.probe.features(capture, self.embeds.token_mask[early.prompt_index])
        predicted = self.probe.predict(features, capture.sigma, early.prompt_index).cpu()
        selection = select_survivors(predicted, early.prompt_index.cpu(), "topk", args.keep_fraction)
        times["probe"] = self.sync() - t
        t = self.sync()
        done = sampler.advance(early.select(selection.survivors), self.embeds, args.num_steps)
        times["denoise_late"] = self.sync() - t
        self.score(done.latents, selection.survivors, times)
        return times

    def early(self, capture: bool) -> dict[str, float]:
        recorder = self.probe.recorder(self.sampler) if capture else None
        t = self.sync()
        early = self.sampler.advance(self.start, self.embeds, self.args.capture_step, observer=recorder)
        if recorder is not None:
            recorder.result(early)
        return {"denoise": self.sync() - t}


def _status_kib(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1])


def early_phase_peak_rss(setup: Setup, capture: bool) -> int:
    """Peak resident memory (bytes) during the early phase, above the resident memory before it.

    Linux: the high-water mark is reset first (``/proc/self/clear_refs``), so loading the model does not count.
    Elsewhere: the process's lifetime peak ``ru_maxrss`` (model loading included).
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_kib("VmRSS")
        setup.early(capture=capture)
        return (_status_kib("VmHWM") - before) * 1024
    except OSError:
        setup.early(capture=capture)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory(args: SpeedArgs) -> dict:
    """Peak memory of the early phase (to step k) without and with capture."""
    if torch.cuda.is_available():
        setup = Setup(args)
        peaks = {}
        for mode in ("plain", "capture"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            setup.early(capture=mode == "capture")
            peaks[mode] = torch.cuda.max_memory_allocated() - base
        return {"kind": "cuda peak allocated above the loaded model (bytes)", **peaks}
    peaks = {}
    for mode in ("plain", "capture"):  # a fresh process each: CPU peak RSS only grows within a process
        command = [sys.executable, __file__, "--memory_only", mode, "--pipeline", args.pipeline, "--probe", args.probe]
        command += ["--capture_step", str(args.capture_step), "--prompts", str(args.prompts)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        peaks[mode] = json.loads(output.strip().splitlines()[-1])["peak_rss_bytes"]
    return {"kind": "CPU peak RSS above the pre-phase RSS, fresh process per variant (bytes)", **peaks}


def run(args: SpeedArgs) -> dict:
    setup = Setup(args)
    rounds: dict[str, list[dict]] = {"unpruned": [], "pruned": [], "early": [], "early_capture": []}
    for repeat in range(args.repeats + 1):  # round 0 is warm-up and dropped
        order = ["unpruned", "pruned", "early", "early_capture"]
        order = order if repeat % 2 == 0 else order[::-1]
        for name in order:
            times = setup.unpruned() if name == "unpruned" else setup.pruned() if name == "pruned" else None
            times = times or setup.early(capture=name == "early_capture")
            if repeat:
                rounds[name].append(times)
    setup.reward_set.close()
    median = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]} for name, runs in rounds.items()}
    total = {name: sum(parts.values()) for name, parts in median.items()}
    # per-round ratios (variants of one round ran back to back): robust to load drifting between rounds
    totals = {name: [sum(r.values()) for r in runs] for name, runs in rounds.items()}
    paired_fraction = statistics.median(p / u for p, u in zip(totals["pruned"], totals["unpruned"]))
    paired_capture = statistics.median(
        (c - e) / u for c, e, u in zip(totals["early_capture"], totals["early"], totals["unpruned"])
    )
    k, steps, r = args.capture_step, args.num_steps, args.keep_fraction
    kept = keep_count(args.group_size, r)
    analytic = k / steps + (kept / args.group_size) * (1 - k / steps)
    capture_s = max(0.0, total["early_capture"] - total["early"])
    pruned_denoise = median["pruned"]["denoise_early"] + median["pruned"]["denoise_late"]
    unpruned = median["unpruned"]
    # the limit of the whole phase: denoising scales by the analytic fraction, decode and reward by r
    phase_limit = analytic * unpruned["denoise"] + (kept / args.group_size) * (unpruned["decode"] + unpruned["reward"])
    phase_limit /= total["unpruned"]
    overhead_s = capture_s + median["pruned"]["probe"]
    result = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": str(setup.device),
        "threads": args.threads,
        "pipeline": args.pipeline,
        "probe": args.probe,
        "rollouts": len(setup.prompt_index),
        "capture_step": k,
        "num_steps": steps,
        "keep_fraction": kept / args.group_size,
        "seconds": median,
        "total_s": total,
        "measured_fraction": total["pruned"] / total["unpruned"],
        "analytic_fraction": analytic,
        "measured_denoise_fraction": pruned_denoise / unpruned["denoise"],
        "phase_limit_fraction": phase_limit,
        "measured_speedup": total["unpruned"] / total["pruned"],
        "paired_fraction": paired_fraction,
        "paired_capture_fraction_of_unpruned_phase": paired_capture,
        "analytic_speedup": 1 / analytic,
        "speedup_vs_limit": (total["unpruned"] / total["pruned"]) * analytic,
        "capture_s": capture_s,
        "overhead_s": overhead_s,
        "overhead_fraction_of_unpruned_phase": overhead_s / total["unpruned"],
        "overhead_fraction_of_pruned_phase": overhead_s / total["pruned"],
        "capture_bytes": setup.capture_bytes,
    }
    if args.memory:
        result["memory"] = measure_memory(args)
    return result


def write_results(args: SpeedArgs, result: dict) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    memory = result.get("memory")
    memory_text = f"{memory['plain'] / 2**20:.1f} / {memory['capture'] / 2**20:.1f} MiB" if memory else "-"
    memory_text += f" (captured maps + x0: {result['capture_bytes'] / 2**20:.2f} MiB)"
    command = " ".join(["python", *sys.argv])
    lines = [
        "",
        f"`{command}` ({result['date']}, {result['device']}, {result['threads']} thread(s), probe: {result['probe']})",
        "",
        "| rollouts | k / T | r | unpruned s | pruned s | denoise fraction: measured / analytic k/T + r(1-k/T) "
        "| phase fraction: measured / limit (decode + reward at r) | speedup: measured / analytic "
        "| capture + probe s (% of unpruned phase) | early-phase peak memory plain / capture |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {result['rollouts']} | {result['capture_step']} / {result['num_steps']} | {result['keep_fraction']:.2f} "
        f"| {result['total_s']['unpruned']:.2f} | {result['total_s']['pruned']:.2f} "
        f"| {result['measured_denoise_fraction']:.3f} / {result['analytic_fraction']:.3f} "
        f"| {result['measured_fraction']:.3f} / {result['phase_limit_fraction']:.3f} "
        f"| {result['measured_speedup']:.3f}x / {result['analytic_speedup']:.3f}x "
        f"| {result['overhead_s']:.3f} ({100 * result['overhead_fraction_of_unpruned_phase']:.2f}%) | {memory_text} |",
    ]
    add_to_section(args.results, RESULTS_SECTION, lines)


def main() -> None:
    (args,) = ConfigParser((SpeedArgs,), description=__doc__).parse_args_and_config()
    torch.set_num_threads(args.threads)
    if args.memory_only:
        print(json.dumps({"peak_rss_bytes": early_phase_peak_rss(Setup(args), args.memory_only == "capture")}))
        return
    result = run(args)
    write_results(args, result)
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=1))


if __name__ == "__main__":
    main()
