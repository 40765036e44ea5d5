"""One run per ``output_dir`` at a time.

Two launches into one folder (a scheduler retrying a job that still runs, the same command in two terminals, both
with the shipped ``resume_from: latest``) would write one ``metrics.jsonl`` and interleave their checkpoints: two
runs mixed into one. The main process of a run therefore holds an advisory lock (``flock``) on
``<output_dir>/.run.lock`` for the life of the process; the operating system drops it when the process ends in
any way, SIGKILL included, so a lock is never stale. The file names the holder, for the second launch's message.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import time
from pathlib import Path

from rl.run_files import RUN_ENTRIES

LOCK_NAME = ".run.lock"

logger = logging.getLogger(__name__)

_HELD: dict[Path, int] = {}  # the locks this process holds: a second trainer in one process (tests) re-enters


class OutputDirInUseError(FileExistsError):
    """Another live run holds the output_dir; the message names it and the ways on."""


def lock_output_dir(output_dir: Path) -> None:
    """Take ``output_dir``'s run lock for this process (the folder must exist), or fail at once.

    Raises:
        OutputDirInUseError: another process holds it, naming that process.
    """
    path = (output_dir / LOCK_NAME).resolve()
    if path in _HELD:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        if not isinstance(error, BlockingIOError):  # a filesystem without locks (some Lustre mounts): run unguarded
            os.close(fd)
            logger.warning(
                "output_dir %s cannot be locked (%s): a second launch into it will not be detected", output_dir, error
            )
            return
        holder = os.read(fd, 512).decode(errors="replace").strip() or "a process that has not named itself yet"
        os.close(fd)
        raise OutputDirInUseError(
            f"output_dir {output_dir} is in use by another run ({holder}): two runs would write one log and mix "
            "their checkpoints. Wait for it to end (or stop it: it checkpoints on SIGTERM) and relaunch, or start "
            "this one with another --output_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
    _HELD[path] = fd


def release_output_dir(output_dir: Path) -> None:
    """Drop this process's lock on ``output_dir`` (a no-op when it holds none)."""
    fd = _HELD.pop((output_dir / LOCK_NAME).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor releases the flock


def clear_output_dir(output_dir: Path) -> list[str]:
    """Delete the run in ``output_dir`` (``overwrite_output_dir``): its own files and folders only, so a user's
    notes beside it survive, and not its run lock, which stays held. Returns the names kept."""
    for pattern in RUN_ENTRIES:
        for entry in output_dir.glob(pattern):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    return sorted(entry.name for entry in output_dir.iterdir() if entry.name != LOCK_NAME)
