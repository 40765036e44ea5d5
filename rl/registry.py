"""Registries of the project's pluggable units (predictors, objectives): name -> class, filled by a decorator."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable
from typing import TypeVar

Unit = TypeVar("Unit", bound=type)


def registrar(registry: dict[str, type], kind: str) -> Callable[[str], Callable[[Unit], Unit]]:
    """A ``@register(name)`` class decorator for ``registry``: sets ``cls.name`` and refuses a name used twice."""

    def register(name: str) -> Callable[[Unit], Unit]:
        def add(cls: Unit) -> Unit:
            if name in registry:
                raise ValueError(f"{kind} {name!r} is registered twice ({registry[name].__name__}, {cls.__name__})")
            cls.name = name
            registry[name] = cls
            return cls

        return add

    return register


def import_units(package: str, path: Iterable[str]) -> None:
    """Import every module of ``package`` (its ``__name__`` and ``__path__``) so each registers its units: adding a
    unit is adding its file, with no import to write."""
    for module in pkgutil.iter_modules(path):
        importlib.import_module(f"{package}.{module.name}")
