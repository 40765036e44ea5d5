"""One run per output_dir: a second launch into a live run's folder stops before it writes anything."""

from __future__ import annotations

import errno
import fcntl
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_trainer import make_trainer, pipeline_dir  # noqa: F401 (a fixture)

from rl.run_lock import LOCK_NAME, OutputDirInUseError, clear_output_dir, lock_output_dir, release_output_dir

ROOT = Path(__file__).resolve().parents[2]


def hold_lock(output_dir: Path) -> subprocess.Popen:
    """Another process holding ``output_dir``'s lock, as a live run does, until it is killed."""
    code = (
        f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
        f"from rl.run_lock import lock_output_dir; lock_output_dir(Path({str(output_dir)!r})); "
        "print('held', flush=True); time.sleep(600)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_lock_refuses_another_process_naming_it_and_dies_with_its_holder(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(OutputDirInUseError, match=rf"{tmp_path} is in use by another run \(pid {holder.pid} on "):
            lock_output_dir(tmp_path)
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean exit: the operating system drops the lock
        holder.wait()
    lock_output_dir(tmp_path)
    lock_output_dir(tmp_path)  # this process holds it already: re-entered, not refused
    release_output_dir(tmp_path)


def test_clearing_deletes_the_run_only_and_keeps_the_lock_file(tmp_path):
    """overwrite_output_dir deletes what a run writes, not a user's files beside it."""
    (tmp_path / "checkpoints" / "step-1").mkdir(parents=True)
    (tmp_path / "samples").mkdir()
    for name in ("metrics.jsonl", "metrics.before-20261207-101010.jsonl", "summary.json", "config.yaml", "notes.txt"):
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "my_analysis").mkdir()
    lock_output_dir(tmp_path)
    assert clear_output_dir(tmp_path) == ["my_analysis", "notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME, "my_analysis", "notes.txt"]
    release_output_dir(tmp_path)


def test_a_second_run_into_a_live_runs_folder_stops_before_writing(pipeline_dir, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    holder = hold_lock(run)
    try:
        started = time.perf_counter()
        for extra in (["--resume_from", "latest"], ["--overwrite_output_dir", "true"]):
            with pytest.raises(OutputDirInUseError, match=rf"pid {holder.pid} .* another --output_dir"):
                make_trainer(pipeline_dir, tmp_path, *extra)
        assert time.perf_counter() - started < 10  # before the model loads
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME, "metrics.jsonl"]  # nothing kept aside or cleared
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_a_filesystem_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")  # what flock says on some Lustre and NFS mounts

    monkeypatch.setattr(fcntl, "flock", no_locks)
    lock_output_dir(tmp_path)  # no error: the run goes on
    assert "cannot be locked" in caplog.text and "will not be detected" in caplog.text
