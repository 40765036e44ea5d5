"""Write docs/configuration.md from the config dataclasses (rl/config.py): every key, type, default, meaning.

python launch/config_docs.py            # rewrite docs/configuration.md
python launch/config_docs.py --check    # exit 1 if it is out of date (what the test runs)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rl.config_help import HelpFormatter, configuration_markdown
from rl.config_parse import parse_config

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--out", default="docs/configuration.md", help="the Markdown file, relative to the repository")
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 if it differs")
    args = parser.parse_args(argv)
    shipped = parse_config(["--config", str(ROOT / "configs" / "tiny_shapes.yaml")]).to_dict()
    text = configuration_markdown(shipped)
    out = ROOT / args.out  # an absolute --out stays as given
    if args.check:
        if not out.exists() or out.read_text() != text:
            print(f"{out} is out of date: run python launch/config_docs.py", file=sys.stderr)
            return 1
        return 0
    out.write_text(text)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
