"""docs/configuration.md is generated from the config dataclasses and must be current."""

import sys
from pathlib import Path

from rl.config_parse import known_keys

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "launch"))
import config_docs  # noqa: E402


def test_configuration_doc_is_current_and_lists_every_key(tmp_path):
    assert config_docs.main(["--check"]) == 0, "docs/configuration.md is stale: run python launch/config_docs.py"
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert all(f"| `{key}` |" in text for key in known_keys())
    # the tiny column shows the shipped config where it differs from the built-in default
    assert "| `learning_rate` | `float` | `0.0001` | `0.0005` |" in text
    stale = tmp_path / "configuration.md"
    stale.write_text("old\n")
    assert config_docs.main(["--check", "--out", str(stale)]) == 1
    assert config_docs.main(["--out", str(stale)]) == 0 and stale.read_text() == text
