"""Metrics: accumulate as sums and counts on every process, reduce across processes, write JSONL (+ wandb).

Keys are namespaced (``reward/<component>/mean``, ``policy/approx_kl``, ``time/<phase>_s``, ...; docs/metrics.md
defines each). Means are reduced as global sums over global counts, never as means of
per-process means. The JSONL file (``<output_dir>/metrics.jsonl``, one object per logged step) is always
written; wandb is optional, offline by default, and never stops a run: any wandb error disables it with a
warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rl.run_files import METRICS, SAMPLES

logger = logging.getLogger(__name__)


class MetricsAccumulator:
    """Per-process sums, counts, minima and maxima between two log calls."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.maxima: dict[str, float] = {}
        self.minima: dict[str, float] = {}

    def add(self, key: str, value: float | torch.Tensor, count: float = 1.0) -> None:
        """Add a mean-type metric: ``value`` is a mean over ``count`` items (reported as the global mean)."""
        self.sums[key] += float(value) * count
        self.counts[key] += count

    def add_values(self, prefix: str, values: torch.Tensor) -> None:
        """``<prefix>/mean`` and ``<prefix>/std`` (population std over every process's values)."""
        values = values.detach().double().flatten()
        self.sums[f"{prefix}/mean"] += values.sum().item()
        self.counts[f"{prefix}/mean"] += len(values)
        self.sums[f"{prefix}/std"] += (values**2).sum().item()
        self.counts[f"{prefix}/std"] += len(values)

    def add_max(self, key: str, value: float | torch.Tensor) -> None:
        self.maxima[key] = max(self.maxima.get(key, -math.inf), float(value))

    def add_min(self, key: str, value: float | torch.Tensor) -> None:
        self.minima[key] = min(self.minima.get(key, math.inf), float(value))

    @property
    def pending(self) -> bool:
        """Whether anything was added since this accumulator was made (a log write starts a new one)."""
        return bool(self.counts or self.maxima or self.minima)

    def state(self) -> dict[str, dict[str, float]]:
        return {
            "sums": dict(self.sums),
            "counts": dict(self.counts),
            "max": dict(self.maxima),
            "min": dict(self.minima),
        }

    def rewind(self, state: dict[str, dict[str, float]]) -> None:
        """Go back to an earlier :meth:`state`: what was added since is dropped (a failed step's metrics)."""
        for values in (self.sums, self.counts, self.maxima, self.minima):
            values.clear()
        self.load_state(state)

    def load_state(self, state: dict[str, dict[str, float]]) -> None:
        """Restore :meth:`state` (a resumed run logs what was accumulated before the checkpoint)."""
        self.sums.update(state["sums"])
        self.counts.update(state["counts"])
        self.maxima.update(state["max"])
        self.minima.update(state["min"])

    def reduce(self, accelerator: Any = None) -> dict[str, float]:
        """Global metrics over every process (a collective call: every process must make it)."""
        states = [self.state()]
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            states = gather_object(states)
        sums, counts = defaultdict(float), defaultdict(float)
        maxima, minima = {}, {}
        for state in states:
            for key, value in state["sums"].items():
                sums[key] += value
                counts[key] += state["counts"][key]
            for key, value in state["max"].items():
                maxima[key] = max(maxima.get(key, -math.inf), value)
            for key, value in state["min"].items():
                minima[key] = min(minima.get(key, math.inf), value)
        result: dict[str, float] = {}
        for key in sorted(sums):
            if counts[key] == 0:
                continue
            if key.endswith("/std") and f"{key[:-4]}/mean" in sums:
                mean = sums[f"{key[:-4]}/mean"] / counts[f"{key[:-4]}/mean"]
                result[key] = math.sqrt(max(sums[key] / counts[key] - mean**2, 0.0))
            else:
                result[key] = sums[key] / counts[key]
        result.update(maxima)
        result.update(minima)
        return result


class MetricsLogger:
    """Writes reduced metrics to ``metrics.jsonl`` and, optionally, wandb. Only the main process writes.

    Args:
        output_dir: folder of ``metrics.jsonl``.
        is_main_process: only the main process writes.
        wandb_mode: ``"offline"``, ``"online"`` or ``"disabled"``; ``WANDB_MODE`` in the environment wins.
        project, run_name, config: passed to ``wandb.init``.
    """

    def __init__(
        self,
        output_dir: str | Path,
        is_main_process: bool = True,
        wandb_mode: str = "offline",
        project: str = "flux-probe-grpo",
        run_name: str | None = None,
        config: dict | None = None,
    ) -> None:
        self.path = Path(output_dir) / METRICS
        self.is_main_process = is_main_process
        self.started = time.time()
        self._wandb = None
        if not is_main_process:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8")
        mode = os.environ.get("WANDB_MODE", wandb_mode)
        if mode == "online" and not os.environ.get("WANDB_API_KEY"):
            logger.warning("wandb_mode=online but WANDB_API_KEY is not set: logging to wandb offline instead")
            mode = "offline"
        if mode != "disabled":
            self._wandb = self._init_wandb(mode, project, run_name or Path(output_dir).name, config, output_dir)

    @staticmethod
    def _init_wandb(mode: str, project: str, name: str, config: dict | None, output_dir: str | Path):
        try:
            import wandb

            return wandb.init(mode=mode, project=project, name=name, config=config, dir=str(output_dir))
        except Exception as error:  # logging must never kill a run
            logger.warning("wandb disabled: wandb.init failed (%s)", error)
            return None

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Append ``{"step": step, "wall_s": ..., **metrics}`` to the JSONL file (and wandb)."""
        if not self.is_main_process:
            return
        record = {"step": step, "wall_s": round(time.time() - self.started, 3), **metrics}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._wandb is not None:
            try:
                self._wandb.log(metrics, step=step)
            except Exception as error:  # logging must never kill a run
                logger.warning("wandb disabled: wandb.log failed (%s)", error)
                self._wandb = None

    def resume(self, step: int, elapsed_s: float, finished: bool = False) -> None:
        """Continue a run from its checkpoint at ``step``: drop records the stopped run wrote after it (they are
        logged again, identically; a final evaluation at ``step`` came after the trained end's checkpoint too,
        unless the run ``finished`` there: it is not done again) and carry the wall clock on from ``elapsed_s``."""
        self.started = time.time() - elapsed_s
        if not self.is_main_process:
            return
        self._file.close()
        kept = [
            r
            for r in read_metrics(self.path)
            if r["step"] < step or (r["step"] == step and (finished or not any(k.startswith("final_eval/") for k in r)))
        ]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._file = self.path.open("a", encoding="utf-8")

    def log_images(self, key: str, images: torch.Tensor, captions: list[str], step: int, columns: int = 8) -> None:
        """Save a grid of ``images`` (``[N, 3, H, W]`` in [0, 1]) as ``<output_dir>/samples/<key>-<step>.png``
        (``/`` in ``key`` becomes ``_``) and log it to wandb with the captions. Never raises."""
        if not self.is_main_process or len(images) == 0:
            return
        try:
            from PIL import Image

            grid = Image.fromarray(image_grid(images, columns))
            path = self.path.parent / SAMPLES / f"{key.replace('/', '_')}-{step:06d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            grid.save(path)
            if self._wandb is not None:
                import wandb

                caption = " | ".join(captions[:columns]) + (" ..." if len(captions) > columns else "")
                self._wandb.log({key: wandb.Image(grid, caption=caption)}, step=step)
        except Exception as error:  # logging must never kill a run
            logger.warning("image logging failed (%s)", error)

    def close(self) -> None:
        if not self.is_main_process:
            return
        self._file.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception as error:  # logging must never kill a run
                logger.warning("wandb.finish failed (%s)", error)


def image_grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """``[N, 3, H, W]`` images in [0, 1] -> one ``[rows H, columns W, 3]`` uint8 grid, row by row (blank filler)."""
    n, channels, height, width = images.shape
    columns = min(columns, n)
    rows = -(-n // columns)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    grid = torch.zeros(rows * columns, channels, height, width, dtype=torch.uint8)
    grid[:n] = pixels
    grid = grid.view(rows, columns, channels, height, width).permute(0, 3, 1, 4, 2)
    return grid.reshape(rows * height, columns * width, channels).numpy()


def read_metrics(path: str | Path) -> list[dict]:
    """Every record of a ``metrics.jsonl`` file, in order.

    A last line that does not parse (a run killed mid-write) is dropped with a warning, so the run can still be
    resumed and reported; an unparsable line before the last is damage, not an interruption, and raises.

    Raises:
        ValueError: a line other than the last is not JSON (its number is named).
    """
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(f"{path}: line {number} is not JSON ({error}); the log is damaged") from None
            logger.warning("%s: dropped a partial last line (%d characters; a run stopped mid-write)", path, len(line))
    return records
