"""Seconds for one batch of plain ``FluxPipeline`` sampling on the shipped tiny model (the foundation's budget).

    python bench/sampling_speed.py                 # 10 steps, batch 16, 1 and 2 torch threads
Writes ``bench/sampling_speed.json``; medians of ``--repeats`` runs after one warm-up (prompt encoding,
10 transformer calls and the VAE decode all included).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import rl  # noqa: F401  (first: rl/__init__.py filters library import notices before diffusers loads)

# isort: split
import torch
from diffusers import FluxPipeline

from rl.config_help import HelpFormatter


def seconds_per_batch(pipe: FluxPipeline, batch: int, steps: int, repeats: int) -> float:
    prompts = ["a red circle left of a blue square"] * batch
    times = []
    for repeat in range(repeats + 1):
        start = time.perf_counter()
        pipe(prompts, height=64, width=64, num_inference_steps=steps, max_sequence_length=16, output_type="np",
             generator=torch.Generator().manual_seed(repeat))  # fmt: skip
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--pipeline", default="assets/tiny-flux-shapes", help="FluxPipeline folder")
    parser.add_argument("--batch", type=int, default=16, help="images per pipeline call")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to time")
    parser.add_argument("--out", default="bench/sampling_speed.json", help="JSON output")
    args = parser.parse_args()
    pipe = FluxPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        results[str(threads)] = seconds_per_batch(pipe, args.batch, args.steps, args.repeats)
        print(f"{args.steps} steps, batch {args.batch}, {threads} thread(s): {results[str(threads)]:.3f} s")
    Path(args.out).write_text(json.dumps({"args": vars(args), "seconds_by_threads": results}, indent=1))


if __name__ == "__main__":
    main()
