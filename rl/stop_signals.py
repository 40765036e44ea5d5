"""Preemption and Ctrl-C as a clean stop: the loop checkpoints after the current step and exits."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

logger = logging.getLogger(__name__)


class StopSignals:
    """SIGTERM and SIGINT (preemption, Ctrl-C) ask the loop to checkpoint and stop after the current step; a
    second signal stops at once. Handlers are installed for the ``with`` block only (main thread only).

    A signal within ``REPEAT_WITHIN_S`` of the first is that request delivered twice, not a second one: Ctrl-C
    reaches every process of ``accelerate launch`` from the terminal and again forwarded by the launcher, and a
    scheduler that preempts a job signals its whole process tree.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)
    REPEAT_WITHIN_S = 1.0

    def __init__(self) -> None:
        self.received: int | None = None
        self.received_at = 0.0
        self.previous: dict[int, object] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def handle(self, number: int, frame) -> None:
        if self.received is not None and time.monotonic() - self.received_at < self.REPEAT_WITHIN_S:
            return  # the first one again (the launcher forwarding it): already stopping after this step
        if self.received is not None:  # the second one: no more waiting, also not for the caller's cleanup (it
            # waits for the decode and reward threads and for the other processes): the process ends here
            sys.stderr.write(f"{signal.Signals(number).name} again: stopping now, without a checkpoint\n")
            sys.stderr.flush()
            os._exit(128 + number)
        self.received, self.received_at = number, time.monotonic()
        logger.warning("%s: finishing this step, then checkpointing and stopping", signal.Signals(number).name)

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self.previous = {number: signal.signal(number, self.handle) for number in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


class TerminateAsInterrupt:
    """SIGTERM raises ``KeyboardInterrupt`` as Ctrl-C does, for the ``with`` block (main thread only).

    Outside the training loop (setup, the base and final evaluations), where :class:`StopSignals` is not installed
    and no step is open, a preempted run would otherwise end silently with status 143, its reward threads and
    other processes left to the default handler; as an exception it runs the same cleanup and message as Ctrl-C.
    ``received`` is the signal that arrived (None for a Ctrl-C, which Python raises itself). As with
    :class:`StopSignals`, a repeat within ``REPEAT_WITHIN_S`` is the same request delivered twice; a later one
    ends the process at once. Keep the block open until the message is written: a signal after it kills silently.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self.received_at = 0.0
        self.previous: object = None

    def handle(self, number: int, frame) -> None:
        if self.received is not None:
            if time.monotonic() - self.received_at < StopSignals.REPEAT_WITHIN_S:
                return  # the first one again (the launcher forwarding it): the cleanup it started goes on
            sys.stderr.write(f"{signal.Signals(number).name} again: stopping now, without the cleanup\n")
            sys.stderr.flush()
            os._exit(128 + number)
        self.received, self.received_at = number, time.monotonic()
        raise KeyboardInterrupt

    def __enter__(self) -> TerminateAsInterrupt:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self.handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
