"""SIGTERM and SIGINT ask the loop to stop after the step; a second signal stops at once (rl/stop_signals.py)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rl.stop_signals import StopSignals


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_is_recorded_and_the_second_stops_at_once(number):
    """The second signal ends the process at once, past a cleanup that would wait (here 60 s: in the trainer, the
    reward threads and the other processes); the first one delivered twice at once (the terminal's Ctrl-C and
    accelerate's launcher forwarding it) is one request."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from rl.stop_signals import StopSignals
        try:
            with StopSignals() as signals:
                os.kill(os.getpid(), {int(number)})  # delivered to the main thread before kill returns
                os.kill(os.getpid(), {int(number)})  # the launcher forwarding it at once: the same request
                print("first", signals.name, flush=True)
                time.sleep(StopSignals.REPEAT_WITHIN_S + 0.2)
                os.kill(os.getpid(), {int(number)})  # a user's second Ctrl-C
                print("still running", flush=True)
        finally:
            time.sleep(60)
    """)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - started < 30 and done.returncode == 128 + number
    assert done.stdout == f"first {signal.Signals(number).name}\n"
    name = signal.Signals(number).name
    assert done.stderr.splitlines() == [
        f"{name}: finishing this step, then checkpointing and stopping",  # the first one's warning
        f"{name} again: stopping now, without a checkpoint",
    ]


def test_the_handlers_are_installed_for_the_block_only():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGTERM and signals.name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_outside_the_loop_sigterm_raises_once_and_a_later_one_stops_at_once():
    """TerminateAsInterrupt: SIGTERM raises KeyboardInterrupt; the same signal again at once (the launcher
    forwarding it) leaves the cleanup running; a later one ends the process without waiting for it."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
        from rl.stop_signals import StopSignals, TerminateAsInterrupt
        with TerminateAsInterrupt() as outside:
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except KeyboardInterrupt:
                print("raised", signal.Signals(outside.received).name, flush=True)
                os.kill(os.getpid(), signal.SIGTERM)  # forwarded at once: the cleanup goes on
                print("cleaning up", flush=True)
                time.sleep(StopSignals.REPEAT_WITHIN_S + 0.2)
                os.kill(os.getpid(), signal.SIGTERM)  # a second request: no more waiting
                time.sleep(60)
    """)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert time.perf_counter() - started < 30 and done.returncode == 128 + signal.SIGTERM
    assert done.stdout == "raised SIGTERM\ncleaning up\n"
    assert done.stderr == "SIGTERM again: stopping now, without the cleanup\n"
