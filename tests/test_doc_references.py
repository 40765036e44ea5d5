"""The repository paths the documents name in backticks or links, and the documents the code names, exist; nothing
points outside the repository."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("rl/", "probe/", "rewards/", "configs/", "launch/", "tests/", "bench/", "assets/", "docs/")
# files the docs tell a reader to create (the third objective of docs/design.md), not files they point to
TO_BE_WRITTEN = {"rl/objectives/nft.py"}


def tracked(pattern: str) -> list[Path]:
    listed = subprocess.run(["git", "ls-files", pattern], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in listed.stdout.split()]


def named_paths(text: str) -> set[str]:
    """Backticked repository paths (a file with an extension, or a folder ending in /), without ::test or :line."""
    paths = set()
    for token in re.findall(r"`([^`\s]+)`", text):
        path = re.split(r"::|:(?=\d|[A-Za-z_])", token)[0].rstrip(".,")
        if path.startswith(TOP_FOLDERS) and re.search(r"(\.\w+|/)$", path) and not re.search(r"[<>*{}$]", path):
            paths.add(path)
    return paths - TO_BE_WRITTEN


def test_every_path_a_document_names_exists():
    missing = []
    for document in tracked("*.md"):
        text = document.read_text()
        if "../shared" in text:
            missing.append(f"{document.relative_to(ROOT)}: a path outside the repository (../shared)")
        missing += [
            f"{document.relative_to(ROOT)}: `{path}`" for path in named_paths(text) if not (ROOT / path).exists()
        ]
        for link in re.findall(r"\]\(([^)#\s]+)", text):
            if not link.startswith(("http://", "https://", "mailto:")) and not (document.parent / link).exists():
                missing.append(f"{document.relative_to(ROOT)}: link {link}")
    assert not missing, "dangling references:\n" + "\n".join(missing)


def test_the_code_names_only_documents_in_the_repository():
    missing = []
    for source in tracked("*.py") + tracked("*.yaml") + tracked("Makefile"):
        text = source.read_text()
        for path in set(re.findall(r"\b((?:docs|bench)/[\w./-]+\.md)\b", text)):
            if not (ROOT / path).exists():
                missing.append(f"{source.relative_to(ROOT)}: {path}")
        assert "../shared" not in text or source.name == Path(__file__).name, source
    assert not missing, "code pointing to missing documents:\n" + "\n".join(missing)


# a folder of one machine (a home, a scratch disk, a container's root) written into a tracked file
MACHINE_PATH = re.compile(r"(?<![\w.~<>-])/(?:work|root|home|Users|scratch)/[\w.-]+")


def test_no_tracked_file_names_a_folder_of_one_machine():
    found = []
    for source in tracked("*.md") + tracked("*.json") + tracked("*.py") + tracked("*.yaml") + tracked("Makefile"):
        text = source.read_text()
        found += [
            f"{source.relative_to(ROOT)}: {m}" for m in MACHINE_PATH.findall(text) if source.name != Path(__file__).name
        ]
    assert not found, "paths of one machine (write them relative to the repository, or <repo>):\n" + "\n".join(found)


def test_the_machine_path_check_catches_one():
    assert MACHINE_PATH.findall("see /work/mt/runs/lora and /root/out/x.json, not <repo>/assets or runs/work/x") == [
        "/work/mt",
        "/root/out",
    ]


def test_the_reference_check_catches_a_dangling_path():
    assert named_paths("see `rl/trainer.py:120`, `rl/nowhere.py::test_x`, `probe/pcc_online`, `runs/x.json`") == {
        "rl/trainer.py",
        "rl/nowhere.py",
    }
