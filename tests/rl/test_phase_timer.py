"""Phase times are exclusive (a step's phases add up to its wall-clock); work beside them is kept apart."""

import threading

import pytest

from rl import phase_timer
from rl.phase_timer import PhaseTimer


@pytest.fixture
def clock(monkeypatch):
    """A clock that moves only when the test says so."""
    now = [0.0]
    monkeypatch.setattr(phase_timer.time, "perf_counter", lambda: now[0])
    return now


def test_nested_phases_are_charged_to_themselves_and_add_up_to_the_wall_clock(clock):
    timer = PhaseTimer()
    with timer.phase("predict"):
        clock[0] += 1.0
        with timer.phase("decode"):
            clock[0] += 2.0
            with timer.phase("reward"):
                clock[0] += 4.0
        clock[0] += 8.0
    with timer.phase("decode"):  # a second visit adds up
        clock[0] += 16.0
    # predict: 1 + 8 of its 15 s; decode: 2 of its 6 s, then 16; reward: 4
    assert timer.phases == {"predict": 9.0, "decode": 18.0, "reward": 4.0}
    wall, times = timer.take()
    assert wall == 31.0 == clock[0]
    assert times == {"predict": 9.0, "decode": 18.0, "reward": 4.0} and timer.phases == {}


def test_work_beside_the_phases_is_reported_but_not_part_of_the_wall_clock(clock):
    timer = PhaseTimer()
    with timer.phase("sample"):
        clock[0] += 3.0
    workers = [threading.Thread(target=timer.add_beside, args=("decode", 0.5)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    timer.add_beside("sample", 1.0)  # a name may be both: reported as the sum
    with timer.phase("checkpoint"):
        clock[0] += 7.0
    wall, times = timer.take(excluded=("checkpoint",))
    assert wall == 3.0
    assert times == {"sample": 4.0, "decode": 2.0, "checkpoint": 7.0}
    assert timer.take() == (0.0, {})  # the next step starts empty


def test_pop_removes_one_phase(clock):
    timer = PhaseTimer()
    with timer.phase("eval"):
        clock[0] += 5.0
    assert timer.pop("eval") == 5.0 and timer.pop("eval") == 0.0 and timer.phases == {}


def test_a_phase_waits_for_its_device_work_before_it_ends(clock):
    """On a GPU a phase's kernels finish after the calls that launch them: the timer syncs before reading the end,
    so the phase, not the next one, is charged the work (here a sync that finishes 5 s of queued work)."""

    def sync():
        clock[0] += 5.0

    timer = PhaseTimer(sync)
    with timer.phase("sample"):
        clock[0] += 1.0  # launching
    with timer.phase("train"):
        clock[0] += 2.0
    assert timer.phases == {"sample": 6.0, "train": 7.0}
