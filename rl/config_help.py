"""``--help`` built from the config dataclasses: each option once, grouped by section, with its meaning (the
field's ``help``), type, default and valid values.

:class:`ConfigParser` is ``trl.TrlParser`` with that help (``launch/grpo_flux.py`` through
:func:`rl.config_parse.parse_config`, and the dataclass-configured probe and bench scripts); the defaults it shows are
the ones the command line would run with, so ``--config file.yaml --help`` lists the file's values.
:class:`HelpFormatter` gives the plain argparse scripts the same type and default on every option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import textwrap
import typing
from collections.abc import Sequence
from typing import Any, NoReturn

from trl import TrlParser

WIDTH = 100  # fixed, not the terminal's, so the help reads the same in a log, a test and a terminal
HELP_INDENT = " " * 6


def type_name(annotation: Any) -> str:
    """``int``, ``str | None``, ``list[float]``: an annotation as it is written in the dataclass."""
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return str(annotation).replace("NoneType", "None").replace("typing.", "")


def format_value(value: Any) -> str:
    """A value as it is written in YAML or on the command line (``true``, ``''``, ``[1, 2]``)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | dict):
        return json.dumps(value)
    if value == "":
        return "''"
    return str(value)


def describe_field(field: dataclasses.Field, annotation: Any, default: Any, valid: Sequence[str] = ()) -> str:
    """One option's entry: ``--key type  (default: ...; one of: ...)`` and its meaning, wrapped and indented."""
    meaning = field.metadata.get("help", "")
    facts = ["required" if default is dataclasses.MISSING else f"default: {format_value(default)}"]
    if default is None and "default" in meaning:  # the meaning says what None stands for
        facts = []
    if valid:
        facts.append(f"one of: {', '.join(valid)}")
    elif annotation is bool:
        facts.append("true or false")
    head = textwrap.fill(
        f"--{field.name} {type_name(annotation)}" + (f"  ({'; '.join(facts)})" if facts else ""),
        WIDTH,
        initial_indent="  ",
        subsequent_indent=HELP_INDENT,
        break_on_hyphens=False,
    )
    body = textwrap.fill(meaning, WIDTH, initial_indent=HELP_INDENT, subsequent_indent=HELP_INDENT)
    return f"{head}\n{body}" if meaning else head


def option_names(args: Sequence[str]) -> list[str]:
    """The option names of a command line, as typed: ``--max_steps=3 --lr 1e-4 x`` -> ``["max_steps", "lr"]``."""
    return [arg[2:].split("=", 1)[0] for arg in args if arg.startswith("--")]


class ConfigParser(TrlParser):
    """``trl.TrlParser`` whose ``--help`` lists the dataclasses' fields section by section.

    Args:
        dataclass_types: the config sections, in order.
        names: each section's name (the YAML comment that groups its keys); default: "options" for one
            dataclass, else the class names.
        **kwargs: ``argparse.ArgumentParser`` arguments (``description``, ``allow_abbrev``, ...).
    """

    def __init__(self, dataclass_types: Sequence[type], names: Sequence[str] | None = None, **kwargs: Any) -> None:
        super().__init__(tuple(dataclass_types), **kwargs)
        # Python 3.11's argparse takes "--learning_rate -1e-4" for two options ("expected one argument"): its
        # negative-number pattern knows only "-1" and "-0.5". Later argparse uses this one: a dash, then a digit.
        self._negative_number_matcher = re.compile(r"-\.?\d")
        if names is None:
            names = ["options"] if len(dataclass_types) == 1 else [cls.__name__ for cls in dataclass_types]
        self.section_names = list(names)

    def parse_args_and_config(self, args: list[str] | None = None, **kwargs: Any) -> tuple:
        """TrlParser's, remembering which config file and which command-line keys it read (for :meth:`error`)."""
        args = list(sys.argv[1:] if args is None else args)
        self.config_file = args[args.index("--config") + 1] if "--config" in args else None
        self.command_line_keys = set(option_names(args))
        return super().parse_args_and_config(args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """One line naming the option and the value, as the trainer's own errors (argparse prints its whole usage
        first: dozens of lines before the one that matters). A bad value from the config file names the file and
        its key, not a flag the user never typed."""
        option = re.match(r"argument --(\w+)[^:]*: (.*)", message)
        if option and getattr(self, "config_file", None) and option[1] not in self.command_line_keys:
            message = f"config file {self.config_file}, key {option[1]}: {option[2]}"
        self.exit(2, f"error: {message}; {self.prog} --help lists every option with its type and valid values\n")

    def format_help(self) -> str:
        """Usage, the description, then per section its docstring's first line and each option's entry."""
        lines = [
            f"usage: {self.prog} [--config FILE.yaml] [--KEY VALUE ...]",
            "",
            (self.description or "").strip(),
            "",
            "Every option is a key of the YAML given by --config and a --KEY VALUE override (the command line",
            "wins). Defaults are what this command line runs with: the built-in ones, replaced by --config's.",
        ]
        for name, cls in zip(self.section_names, self.dataclass_types):
            hints = typing.get_type_hints(cls)
            summary = (cls.__doc__ or "").strip().split("\n")[0]
            if summary.startswith(
                f"{cls.__name__}("
            ):  # the signature dataclasses write for a class without a docstring
                summary = ""
            lines += ["", f"{name}: {summary}" if summary else f"{name}:"]
            valid_values = getattr(cls, "valid_values", lambda _: ())
            for field in dataclasses.fields(cls):
                action = self._option_string_actions[f"--{field.name}"]
                default = dataclasses.MISSING if action.required else action.default
                lines.append(describe_field(field, hints[field.name], default, valid_values(field.name)))
        return "\n".join(lines) + "\n"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """argparse help that shows each option's type as its metavar and its default after its meaning.

    The description keeps its line breaks (script docstrings hold example command lines).
    """

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        return getattr(action.type, "__name__", "str")

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required:  # its default is never used
            return f"{action.help or ''} (required)"
        if action.default is None or "default" in (action.help or ""):  # None says nothing; the help says it
            return action.help or ""
        return super()._get_help_string(action)


def configuration_markdown(shipped: dict[str, dict[str, Any]] | None = None) -> str:
    """``docs/configuration.md``: every run-config key by section with type, default, valid values and meaning.

    Args:
        shipped: ``{section: {key: value}}`` of the config the bare launch line runs (``configs/tiny_shapes.yaml``
            through ``RunConfig.to_dict()``), shown beside the built-in default where it differs.
    """
    from rl.config import RunConfig

    shipped = shipped or {}
    lines = [
        "# Configuration",
        "",
        "Generated from the config dataclasses of `rl/config.py` and `rl/pruning_config.py` by",
        "`python launch/config_docs.py` (a test keeps it current). A run is `--config file.yaml` plus `--key value`",
        "overrides; YAML files group keys by section. `python launch/grpo_flux.py` without `--config` runs `configs/tiny_shapes.yaml` (its values in the",
        "tiny column where they differ from the built-in default).",
    ]
    for name, cls in RunConfig.sections().items():
        hints = typing.get_type_hints(cls)
        summary = (cls.__doc__ or "").strip().split("\n")[0]
        lines += ["", f"## {name}", "", summary, "", "| key | type | default | tiny | valid values | meaning |"]
        lines.append("|---|---|---|---|---|---|")
        for field in dataclasses.fields(cls):
            default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
            tiny = shipped.get(name, {}).get(field.name, default)
            valid = ", ".join(f"`{v}`" for v in cls.valid_values(field.name))
            cells = [f"`{field.name}`", f"`{type_name(hints[field.name])}`", f"`{format_value(default)}`",
                     f"`{format_value(tiny)}`" if tiny != default else "", valid,
                     field.metadata.get("help", "").replace("|", "\\|")]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
