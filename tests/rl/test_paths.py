"""A relative path of the repository's files, missing from another current folder, is named with the fix."""

from pathlib import Path

import pytest

from rl.config_parse import parse_config
from rl.paths import REPOSITORY, repository_hint


def test_the_hint_names_the_repository_file_only_when_that_is_the_cause(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hint = repository_hint("assets/tiny-flux-shapes")
    assert str(tmp_path) in hint and str(REPOSITORY / "assets" / "tiny-flux-shapes") in hint
    assert "launch from the repository root" in hint
    assert repository_hint("assets/no-such-model") == ""  # not in the repository either: nothing to point at
    assert repository_hint(REPOSITORY / "assets" / "gone") == ""  # absolute: nothing to resolve
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "mine.txt").write_text("a red circle\n")
    assert repository_hint("assets/mine.txt") == ""  # it exists where it is read


def test_a_config_named_relative_to_the_repository_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"config file configs/tiny_shapes.yaml does not exist; .*repository"):
        parse_config(["--config", "configs/tiny_shapes.yaml"])
    with pytest.raises(FileNotFoundError, match=r"config file missing.yaml does not exist$"):
        parse_config(["--config", "missing.yaml"])
    Path("list.yaml").write_text("- learning_rate: 1.0e-4\n")
    with pytest.raises(ValueError, match="config file list.yaml must be a YAML mapping of keys to values"):
        parse_config(["--config", "list.yaml"])
