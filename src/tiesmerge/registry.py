"""Method names -> method classes. Built from an explicit list: no registration side effects."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError
from .methods import (
    Average,
    DareLinear,
    DareTies,
    Fisher,
    MagnitudePrune,
    MergeMethod,
    RegMean,
    TaskArithmetic,
    Ties,
)

__all__ = ["METHODS", "method_class", "make_method", "did_you_mean"]


def _build(classes: list[type]) -> dict[str, type]:
    table: dict[str, type] = {}
    for cls in classes:
        if cls.name in table:
            raise RuntimeError(f"two methods are named {cls.name!r}")
        table[cls.name] = cls
    return table


METHODS: Mapping[str, type] = _build([Ties, TaskArithmetic, Average, DareTies, DareLinear, MagnitudePrune, Fisher, RegMean])


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def method_class(name: str) -> type:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"unknown method {name!r}{did_you_mean(name, list(METHODS))}",
            hint=f"available methods: {', '.join(METHODS)} (tiesmerge methods lists their options)",
        ) from None


def make_method(name: str, options: Mapping[str, Any] | None = None) -> MergeMethod:
    """Build a method config from its name and options, reporting every problem at once."""
    cls = method_class(name)
    options = dict(options or {})
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ConfigError(
            [f"{name}: unknown option {k!r}{did_you_mean(k, known)}" for k in unknown],
            hint=f"{name} takes: {', '.join(known)}",
        )
    return cls(**options)
