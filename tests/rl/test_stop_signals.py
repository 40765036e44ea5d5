"""SIGTERM and SIGINT ask the loop to stop after the step; a second signal stops at once (rl/stop_signals.py)."""

import os
import signal

import pytest

from rl.stop_signals import StopSignals


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_the_first_signal_is_recorded_and_the_second_stops_at_once(number):
    before = signal.getsignal(number)
    with StopSignals() as signals:
        os.kill(os.getpid(), number)  # delivered to the main thread before kill returns
        assert signals.received == number and signals.name == signal.Signals(number).name
        with pytest.raises(SystemExit, match="again: stopping now, without a checkpoint"):
            os.kill(os.getpid(), number)
    assert signal.getsignal(number) is before  # the previous handler (Ctrl-C's KeyboardInterrupt) is back
