"""Where a relative path points when it is missing: the shipped configs name this repository's files relatively
(``assets/tiny-flux-shapes``, ``assets/probe/...``), so a run launched from another folder would otherwise read
a bare "does not exist" (or, for the model, a hub download error) for a file that is right there."""

from __future__ import annotations

from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]


def missing_local_folder(value: str) -> bool:
    """Whether ``value`` (a model or LoRA option) is no folder here yet reads as a local path, not a hub id
    (``owner/name``): loading it would fail with the hub's "Repo id must be in the form" instead of naming it."""
    path = Path(value).expanduser()
    if path.exists():
        return False
    return value.startswith((".", "/", "~")) or value.count("/") != 1 or "\\" in value or path.parent.is_dir()


def repository_hint(path: str | Path) -> str:
    """For a relative ``path`` missing from the current folder but present in the repository: a sentence naming
    both and the fix (to append to an error message); otherwise ''."""
    path = Path(path)
    if path.is_absolute() or path.exists() or not (REPOSITORY / path).exists():
        return ""
    return (
        f"; relative paths are read from the current folder {Path.cwd()}, and the repository has "
        f"{REPOSITORY / path}: launch from the repository root ({REPOSITORY}) or give that absolute path"
    )
