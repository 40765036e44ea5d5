"""What every config section shares: documented fields (:func:`option`), YAML type checks and a section's own
value checks (:class:`Section`). The sections live in rl/config.py (and rl/pruning_config.py); keeping the base
apart lets a section live beside the code it configures without importing the whole run config.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Collection
from typing import Any, ClassVar


def option(default: Any, help: str) -> Any:
    """A dataclass field with its documentation (``help``) in the metadata, as TRL and HfArgumentParser read it."""
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _matches(value: Any, annotation: Any) -> bool:
    """Whether ``value`` has the (simple) annotated type: str, int, float, bool, list[...], dict, unions."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if annotation is Any:
        return True
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or annotation)


class Section:
    """Base of every config section: type checks of YAML values (argparse converts only strings).

    ``choices`` maps a string key to its valid values (a tuple, or a registry whose keys are the names, read
    when a config is made so late registrations count); they are checked here and listed by ``--help``.
    """

    choices: ClassVar[dict[str, Collection[str]]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            name, annotation, value = field.name, hints[field.name], getattr(self, field.name)
            if annotation is float and isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, float(value))
            elif not _matches(value, annotation):
                raise ValueError(f"{name}: expected {annotation}, got {value!r} ({type(value).__name__})")
        for name in self.choices:
            one_of(name, getattr(self, name), self.valid_values(name))
        self.check()

    @classmethod
    def valid_values(cls, name: str) -> tuple[str, ...]:
        """The valid values of key ``name`` (a registry's names sorted), or () when any value of its type is."""
        allowed = cls.choices.get(name, ())
        return tuple(sorted(allowed)) if isinstance(allowed, dict) else tuple(allowed)

    def check(self) -> None:
        """Single-section value checks; raise ValueError naming the key."""


def one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def positive(section: Section, *names: str) -> None:
    for name in names:
        if getattr(section, name) <= 0:
            raise ValueError(f"{name} must be > 0, got {getattr(section, name)}")


def nonnegative(section: Section, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(section, name)}")
