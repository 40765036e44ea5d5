"""Where a GRPO step's time goes: exclusive phase times of the main thread, and work timed beside them.

The trainer logs each phase's per-step total as ``time/<name>_s`` (docs/metrics.md). Phases nest (a predictor's
decode inside ``predict``) and are charged exclusively, so a step's phases add up to its wall-clock. Work that
runs beside the main thread (under ``reward_overlap``, the finished chunks' decode and reward) is added with
:meth:`PhaseTimer.add_beside` and kept apart: it overlaps the phases and is no part of the step's wall-clock.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator


class PhaseTimer:
    """Per-step phase times; :meth:`take` hands them over and starts the next step's.

    Args:
        sync: called before a phase's end is read (``torch.cuda.synchronize`` on a GPU, whose kernels run after
            the call that launched them: else a phase would be charged its launches and the next its work).
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.sync = sync
        self.phases: dict[str, float] = {}
        self.beside: dict[str, float] = {}
        self._inner_seconds: list[float] = []  # time of the phases nested in each open phase
        self._beside_lock = threading.Lock()  # the decode worker and the main thread both add beside-time

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time a phase of the main thread, exclusive of the phases opened inside it."""
        started = time.perf_counter()
        self._inner_seconds.append(0.0)
        try:
            yield
        finally:
            if self.sync is not None:
                self.sync()
            elapsed = time.perf_counter() - started
            inner = self._inner_seconds.pop()
            self.phases[name] = self.phases.get(name, 0.0) + elapsed - inner
            if self._inner_seconds:
                self._inner_seconds[-1] += elapsed

    def add_beside(self, name: str, seconds: float) -> None:
        """Add ``seconds`` of work done beside the main thread's phases (any thread)."""
        with self._beside_lock:
            self.beside[name] = self.beside.get(name, 0.0) + seconds

    def pop(self, name: str) -> float:
        """A phase's time so far, removed (a phase logged on its own, as the evaluation)."""
        return self.phases.pop(name, 0.0)

    def take(self, excluded: tuple[str, ...] = ()) -> tuple[float, dict[str, float]]:
        """The step's wall-clock (its phases but ``excluded``) and every time by name (phases plus work beside
        them); resets both for the next step."""
        wall = sum(seconds for name, seconds in self.phases.items() if name not in excluded)
        times = dict(self.phases)
        with self._beside_lock:
            for name, seconds in self.beside.items():
                times[name] = times.get(name, 0.0) + seconds
            self.phases, self.beside = {}, {}
        return wall, times
