"""From ``--config file.yaml`` and ``--key value`` overrides to a validated :class:`rl.config.RunConfig`.

Unknown keys are refused by name, in the file and on the command line, with the closest known key; a YAML syntax
error or a key given twice names the file and the line. ``--help`` lists every option by section
(rl/config_help.py).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from rl.config import RunConfig
from rl.config_help import option_names
from rl.paths import REPOSITORY, repository_hint

# what a launch without --config runs (`make train`'s): the dataclass defaults fit the tiny model's sizes, but
# the tuned recipe (objective, learning rate, steps) lives in this file
DEFAULT_RUN_CONFIG = "configs/tiny_shapes.yaml"


def with_default_config(args: list[str]) -> list[str]:
    """``args``, led by ``--config <the shipped default>`` when they name no config file (``--help`` too)."""
    args = split_config_flag(args)
    return args if "--config" in args else ["--config", str(REPOSITORY / DEFAULT_RUN_CONFIG), *args]


def split_config_flag(args: list[str]) -> list[str]:
    """``--config=FILE`` as ``--config FILE`` (how the key checks and the default's placement look for it)."""
    return [part for arg in args for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]


def known_keys() -> dict[str, str]:
    """Every config key -> its section name; raises if two sections share a key."""
    keys: dict[str, str] = {}
    for section, cls in RunConfig.sections().items():
        for f in dataclasses.fields(cls):
            if f.name in keys:
                raise TypeError(f"config key {f.name!r} is defined in both {keys[f.name]} and {section}")
            keys[f.name] = section
    return keys


def _unknown_key_error(key: str, where: str, known: Iterable[str] | None = None) -> ValueError:
    """``key`` named with the closest of ``known`` (default: the run config's keys)."""
    close = difflib.get_close_matches(key, list(known_keys() if known is None else known), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "; --help lists every key"
    return ValueError(f"unknown config key {key!r} in {where}{hint}")


def check_flags(args: list[str], known: Iterable[str]) -> None:
    """Refuse an unknown ``--key`` of ``args`` by name, with the closest of ``known`` (any script's options).

    Raises:
        ValueError: naming the key and a close match.
    """
    known = set(known)
    for key in option_names(args):
        if key not in ("config", "help") and key.replace("-", "_") not in known:  # --max-steps: --max_steps's alias
            raise _unknown_key_error(key, "the command line", known)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden key by key
                continue
            key = self.construct_object(key_node, deep=True)
            mark = key_node.start_mark
            if key in first:
                raise ValueError(
                    f"config file {mark.name}, line {mark.line + 1}: key {key!r} is given twice (first on line "
                    f"{first[key]}) and YAML would silently keep the last; delete one of them"
                )
            first[key] = mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: Path) -> Any:
    """A config file's YAML, with a duplicate key an error (it would silently take the last value).

    Raises:
        ValueError: a syntax error or a duplicate key, naming the file, the line and the problem.
    """
    try:
        with path.open(encoding="utf-8") as handle:  # a stream, so marks carry the file's name
            return yaml.load(handle, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        context, context_mark = getattr(error, "context", None), getattr(error, "context_mark", None)
        if context and context_mark:  # where an unclosed bracket or quote began
            problem += f" ({context} on line {context_mark.line + 1})"
        raise ValueError(f"config file {where}: {problem}; fix the YAML there") from None


def _check_keys(args: list[str]) -> None:
    """Reject unknown keys in the YAML file given by ``--config`` and among ``--flag`` overrides."""
    known = set(known_keys())
    if args.count("--config") > 1:  # the second would otherwise end in a parser error naming neither
        raise ValueError(
            "--config is given more than once; one config file per run: put the other file's keys on the command "
            "line as --key value overrides"
        )
    if "--config" in args:
        path = Path(args[args.index("--config") + 1])
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist{repository_hint(path)}")
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must be a YAML mapping of keys to values")
        for key in data:
            if key != "env" and key not in known:
                raise _unknown_key_error(key, str(path))
    check_flags(args, known)
    for before, arg in zip(["", *args], args):
        if arg.startswith("--") or (before.startswith("--") and "=" not in before):  # an option, or its value
            continue
        if arg.split("=", 1)[0] in known and "=" in arg:  # key=value, the style of other launchers
            key, value = arg.split("=", 1)
            raise ValueError(f"{arg!r} on the command line: options are written --{key} {value}")
        if arg.endswith((".yaml", ".yml")):  # a config file without its flag
            raise ValueError(f"{arg!r} on the command line is not an option: a config file is given as --config {arg}")


def parse_config(args: list[str] | None = None, description: str = "") -> RunConfig:
    """Parse ``--config file.yaml`` and ``--key value`` overrides (command line wins) into a validated RunConfig.

    ``--help`` (or ``-h``) prints ``description`` and every option by section (rl/config_help.py) and exits 0.

    Raises:
        ValueError: an unknown key (named, with a suggestion), a value of the wrong type, or a failed check.
        FileNotFoundError: a missing config file.
    """
    import sys

    from rl.config_help import ConfigParser

    args = split_config_flag(list(sys.argv[1:] if args is None else args))
    _check_keys(args)
    sections = RunConfig.sections()
    parser = ConfigParser(tuple(sections.values()), names=tuple(sections), description=description, allow_abbrev=False)
    parsed = parser.parse_args_and_config(args)
    return RunConfig(**dict(zip(sections, parsed)))
