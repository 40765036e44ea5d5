"""GRPO step time with a slow reward, scored after sampling or beside it (``reward_overlap``).

The real trainer (``GRPOTrainer.train``, evaluation off) on the shipped tiny model under ``--run_config``, with the
reward made slow two ways:

- ``slow``: the built-in ``slow`` reward, the shapes checker after ``--seconds_per_image`` of sleep per image (a
  stand-in for a judge elsewhere: the wait holds no local CPU);
- ``remote``: the same reward behind ``launch/reward_server.py`` on loopback (its own process; the client encodes
  PNGs and waits on HTTP).

Each (reward, overlap) runs ``--steps`` GRPO steps; the first (warm-up) is dropped and the trainer's own per-step
metrics of the rest are averaged: sampling (``time/sample_s``), reward (``time/decode_s + time/reward_s``: decoding
and scoring, wherever they ran), the rollout phase as the step sees it (``time/sample_s + time/score_wait_s``: the
main thread sampling or waiting for scores) and the step (``time/step_s``, which adds prompts and training). Without
overlap the rollout phase is sampling + reward; overlap can bring it down to ``max(sampling, reward)``, or with n
chunks to ``max + min / n`` (the first chunk's sampling or the last one's scoring has nothing beside it). The
bounds come from the run without overlap (with overlap the decode also competes with the transformer for cores).

    python bench/reward_overlap.py                 # configs/tiny_shapes.yaml's step, 1 torch thread: a few minutes
    python bench/reward_overlap.py --smoke true    # seconds: what the test suite runs

Writes ``--out`` (JSON) and a section of ``--results`` (``bench/RESULTS.md``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import torch
from accelerate.state import AcceleratorState, GradientState

from bench.probe_quality import add_to_section
from rl.batches import score_chunks
from rl.config import RunConfig
from rl.config_help import ConfigParser
from rl.config_parse import parse_config
from rl.metrics_log import read_metrics
from rl.trainer import GRPOTrainer

ROOT = Path(__file__).resolve().parents[1]
RESULTS_SECTION = "Reward overlap: scoring beside sampling (bench/reward_overlap.py)"
REWARDS = ("slow", "remote")
# what --smoke shrinks the step to: 2 prompts x 4 rollouts in 2 chunks, 4 denoising steps (the window's 3 trained)
SMOKE = ["--prompts_per_step", "2", "--group_size", "4", "--sample_batch_size", "4", "--train_batch_size", "8",
         "--num_steps", "4"]  # fmt: skip


@dataclasses.dataclass
class OverlapArgs:
    run_config: str = dataclasses.field(
        default="configs/tiny_shapes.yaml", metadata={"help": "run config: the model, sampler and step measured"}
    )
    rewards: list[str] = dataclasses.field(
        default_factory=lambda: list(REWARDS),
        metadata={"help": "slow rewards to measure: 'slow' (in process) and/or 'remote' (behind a loopback server)"},
    )
    seconds_per_image: float = dataclasses.field(default=0.05, metadata={"help": "the slow reward's sleep per image"})
    steps: int = dataclasses.field(default=3, metadata={"help": "GRPO steps per run; the first is dropped (warm-up)"})
    reward_workers: int = dataclasses.field(default=1, metadata={"help": "threads of the trainer's reward pool"})
    threads: int = dataclasses.field(default=1, metadata={"help": "torch CPU threads"})
    smoke: bool = dataclasses.field(
        default=False, metadata={"help": "2 prompts x 4 rollouts, 4 denoising steps, 10 ms per image: seconds"}
    )
    out: str = dataclasses.field(default="bench/reward_overlap.json", metadata={"help": "JSON output"})
    results: str = dataclasses.field(default="bench/RESULTS.md", metadata={"help": "Markdown results file"})


@contextlib.contextmanager
def reward_server(seconds_per_image: float, threads: int) -> Iterator[str]:
    """``launch/reward_server.py`` serving the ``slow`` reward on a free loopback port; yields its URL."""
    command = [sys.executable, str(ROOT / "launch" / "reward_server.py"), "--reward", "slow", "--port", "0",
               "--reward_kwargs", json.dumps({"seconds_per_image": seconds_per_image}), "--log_level", "WARNING"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    try:
        line = process.stdout.readline()  # "serving slow on http://127.0.0.1:<port>"
        if not line.startswith("serving slow on "):
            raise RuntimeError(f"the reward server did not start: {line!r}")
        yield line.split()[-1]
    finally:
        process.terminate()
        process.wait(timeout=30)


def run_config(args: OverlapArgs, reward: str, overlap: bool, url: str, output_dir: Path) -> RunConfig:
    """The run config of one measurement: ``--config`` with the slow reward, evaluation and saving off."""
    kwargs = {"remote": {"url": url}} if reward == "remote" else {"slow": {"seconds_per_image": args.seconds_per_image}}
    overrides = [
        "--reward", reward, "--reward_kwargs", json.dumps(kwargs), "--reward_workers", str(args.reward_workers),
        "--reward_overlap", str(overlap).lower(), "--max_steps", str(args.steps), "--max_minutes", "0",
        "--eval_before_training", "false", "--eval_every", "0", "--final_eval_num_prompts", "1",
        "--final_eval_images_per_prompt", "1", "--save_lora", "false", "--log_every", "1", "--wandb_mode", "disabled",
        "--progress_bar", "false", "--output_dir", str(output_dir), "--overwrite_output_dir", "true",
        *(SMOKE if args.smoke else []),
    ]  # fmt: skip
    return parse_config(["--config", args.run_config, *overrides])


def measure(config: RunConfig) -> dict[str, float]:
    """Train ``config`` and return the mean of each phase's seconds over its steps after the first."""
    AcceleratorState._reset_state(reset_partial_state=True)  # one accelerator per run, in one process
    GradientState._reset_state()
    trainer = GRPOTrainer(config)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()
    records = [r for r in read_metrics(Path(config.logging.output_dir) / "metrics.jsonl") if "time/step_s" in r]
    kept = records[1:]
    mean = lambda key: statistics.fmean(r.get(key, 0.0) for r in kept)  # noqa: E731
    sample, wait = mean("time/sample_s"), mean("time/score_wait_s")
    return {
        "steps": len(kept),
        "sample_s": sample,
        "reward_s": mean("time/decode_s") + mean("time/reward_s"),
        "score_wait_s": wait,
        "rollout_s": sample + wait,
        "step_s": mean("time/step_s"),
    }


def summarise(off: dict[str, float], on: dict[str, float], chunks: int) -> dict[str, float]:
    """The rollout phase with overlap against its bounds, all from the run without overlap's sampling and reward."""
    sampling, reward = off["sample_s"], off["reward_s"]
    return {
        "sampling_s": sampling,
        "reward_s": reward,
        "rollout_off_s": off["rollout_s"],
        "rollout_on_s": on["rollout_s"],
        "bound_max_s": max(sampling, reward),
        "bound_chunks_s": max(sampling, reward) + min(sampling, reward) / chunks,
        "bound_sum_s": sampling + reward,
        "hidden_frac": (off["rollout_s"] - on["rollout_s"]) / max(min(sampling, reward), 1e-9),
        "step_off_s": off["step_s"],
        "step_on_s": on["step_s"],
        "speedup": off["step_s"] / on["step_s"],
    }


def write_results(args: OverlapArgs, report: dict) -> None:
    Path(args.out).write_text(json.dumps(report, indent=1))
    machine, shape = report["machine"], report["shape"]
    lines = [
        "",
        f"### {report['date']}: `{report['command']}`",
        "",
        f"{machine['cores']} CPU cores (1-minute load average {machine['load_start']:.1f} at the start, "
        f"{machine['load_end']:.1f} at the end), {machine['torch_threads']} torch thread(s), torch "
        f"{machine['torch']}. Step: {shape['rollouts']} rollouts ({shape['prompts']} prompts x {shape['group_size']}) "
        f"of {shape['num_steps']} denoising steps in {shape['chunks']} chunks, reward_workers {args.reward_workers}, "
        f"{args.seconds_per_image * 1000:g} ms per image; means of {args.steps - 1} step(s) after a warm-up one.",
        "",
        "| reward | sampling S s | reward R s (decode + score) | rollout phase s, no overlap | rollout phase s, "
        "overlap | max(S, R) | max + min/n | S + R | hidden | step s, no overlap / overlap |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for reward, s in report["summary"].items():
        lines.append(
            f"| {reward} | {s['sampling_s']:.2f} | {s['reward_s']:.2f} | {s['rollout_off_s']:.2f} | "
            f"**{s['rollout_on_s']:.2f}** | {s['bound_max_s']:.2f} | {s['bound_chunks_s']:.2f} | "
            f"{s['bound_sum_s']:.2f} | {s['hidden_frac']:.0%} | {s['step_off_s']:.2f} / {s['step_on_s']:.2f} "
            f"({s['speedup']:.2f}x) |"
        )
    lines += [
        "",
        "The rollout phase is what the main thread spends sampling or waiting for scores (time/sample_s + "
        "time/score_wait_s); the step adds prompts and training. S, R and the bounds come from the run without "
        "overlap. 'hidden': the share of min(S, R) that overlap took off the rollout phase.",
    ]
    add_to_section(args.results, RESULTS_SECTION, lines)


def main(argv: list[str] | None = None) -> dict:
    (args,) = ConfigParser((OverlapArgs,), description=__doc__).parse_args_and_config(argv)
    unknown = set(args.rewards) - set(REWARDS)
    if unknown:
        raise SystemExit(f"--rewards takes {REWARDS}, got {sorted(unknown)}")
    if args.smoke:
        args.seconds_per_image = min(args.seconds_per_image, 0.01)
        args.steps = min(args.steps, 2)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    runs, summary = [], {}
    with tempfile.TemporaryDirectory() as work, contextlib.ExitStack() as stack:
        for reward in args.rewards:
            url = stack.enter_context(reward_server(args.seconds_per_image, args.threads)) if reward == "remote" else ""
            rows = {}
            for overlap in (False, True):
                config = run_config(args, reward, overlap, url, Path(work) / f"{reward}-{overlap}")
                rows[overlap] = {"reward": reward, "overlap": overlap, **measure(config)}
                runs.append(rows[overlap])
                print(json.dumps(rows[overlap]), flush=True)
            s = config.sampling
            index = torch.arange(s.prompts_per_step).repeat_interleave(s.group_size)
            chunks = len(score_chunks(index, s.sample_batch_size))
            summary[reward] = summarise(rows[False], rows[True], chunks)
    report = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python bench/reward_overlap.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "cores": os.cpu_count(),
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
        "shape": {
            "prompts": s.prompts_per_step,
            "group_size": s.group_size,
            "rollouts": len(index),
            "num_steps": s.num_steps,
            "chunks": chunks,
        },
        "args": dataclasses.asdict(args),
        "runs": runs,
        "summary": summary,
    }
    write_results(args, report)
    print(json.dumps(summary, indent=1))
    return report


if __name__ == "__main__":
    main()
