"""Method names -> method classes: the built-in methods, listed here, and the methods other
packages declare, found through the ``tiesmerge.methods`` entry-point group. No import has a
registration side effect; the table is read afresh, so a package installed (or a test's
distribution put on ``sys.path``) after start-up is seen.

A package adds a method with one line of its ``pyproject.toml``::

    [project.entry-points."tiesmerge.methods"]
    my_method = "my_package.my_module:MyMethod"

Everything else follows from the class: ``tiesmerge methods``, the CLI flags, the recipe keys
and the tuning grid (see CONTRIBUTING.md).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import sys
import warnings
from collections.abc import Iterator, Mapping
from importlib import metadata
from typing import Any

from .errors import ConfigError, MergeWarning
from .methods import (
    Average,
    Breadcrumbs,
    BreadcrumbsTies,
    Consensus,
    DareLinear,
    DareTies,
    Della,
    DellaLinear,
    Fisher,
    MagnitudePrune,
    ModelStock,
    NuSlerp,
    RegMean,
    Slerp,
    TaskArithmetic,
    Ties,
)
from .methods.base import MergeMethod, option_types
from .methods.iso import IsoC, IsoCTS
from .methods.tsv import TsvMerge

__all__ = ["METHODS", "BUILTIN", "ENTRY_POINT_GROUP", "method_class", "make_method", "did_you_mean",
           "check_method_class", "broken_plugins"]

ENTRY_POINT_GROUP = "tiesmerge.methods"
BUILTIN: tuple[type, ...] = (Ties, TaskArithmetic, Average, DareTies, DareLinear, MagnitudePrune, Fisher, RegMean,
                             TsvMerge, IsoC, IsoCTS,
                             Breadcrumbs, BreadcrumbsTies, Della, DellaLinear, ModelStock, Slerp, NuSlerp, Consensus)


def check_method_class(cls: Any, where: str) -> None:
    """A class the registry can serve: a dataclass with a name, a paper, a summary,
    ``requirements`` and ``merge``, whose option types the CLI can parse."""
    missing = [a for a in ("name", "paper", "summary", "requirements", "merge") if not hasattr(cls, a)]
    if not isinstance(cls, type) or not dataclasses.is_dataclass(cls) or missing:
        raise ConfigError(f"{where}: {cls!r} is not a merge method"
                          + (f" (it lacks {', '.join(missing)})" if missing else " (not a dataclass)"),
                          hint="a method is a class made with tiesmerge.methods.method_config (see CONTRIBUTING.md)")
    try:
        option_types(cls)
    except (TypeError, NameError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _plugins() -> tuple[dict[str, type], dict[str, ConfigError]]:
    # scanning the installed distributions costs ~5 ms and a command asks a dozen times: read
    # once per sys.path (a package put on the path, by a test or at run time, is seen)
    return _plugins_on(tuple(sys.path))


@functools.lru_cache(maxsize=8)
def _plugins_on(path: tuple[str, ...]) -> tuple[dict[str, type], dict[str, ConfigError]]:
    """The plugin methods that load and check out, and for every other entry point the error
    that says why not: a broken plugin is set aside, so it breaks only the command that asks
    for it by name, never the built-in methods or other plugins."""
    good: dict[str, type] = {}
    broken: dict[str, ConfigError] = {}
    builtin = {cls.name: cls for cls in BUILTIN}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        where = f"entry point {entry.name} = {entry.value} (group {ENTRY_POINT_GROUP})"
        try:
            try:
                cls = entry.load()
            except Exception as exc:  # whatever the plugin's import raises
                raise ConfigError(f"{where}: cannot be loaded ({type(exc).__name__}: {exc})",
                                  hint="fix or uninstall the package that declares it") from None
            check_method_class(cls, where)
            if cls.name != entry.name:
                raise ConfigError(f"{where}: the entry point's name must be the method's name {cls.name!r}")
            if cls.name in builtin or cls.name in good:
                owner = builtin.get(cls.name) or good[cls.name]
                raise ConfigError(f"{where}: a method named {cls.name!r} exists already ({owner.__module__})",
                                  hint="give the plugin method another name")
            good[cls.name] = cls
        except ConfigError as exc:
            broken[entry.name] = exc
    return good, broken


def _table(plugins: tuple[dict[str, type], dict[str, ConfigError]] | None = None) -> dict[str, type]:
    good, broken = plugins or _plugins()
    table = {cls.name: cls for cls in BUILTIN}  # a plugin claiming a built-in's name is set aside, never the built-in
    table.update(good)
    return table


def broken_plugins() -> dict[str, ConfigError]:
    """Entry points of the group that could not be served, by name, with the reason."""
    return _plugins()[1]


class _Methods(Mapping):
    """The method table, read afresh on each use (built-ins first, then plugins)."""

    def __getitem__(self, name: str) -> type:
        return method_class(name) if name in broken_plugins() and name not in _BUILTIN_NAMES else _table()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(_table())

    def __len__(self) -> int:
        return len(_table())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in _table()

    def __repr__(self) -> str:
        return f"METHODS({', '.join(self)})"


METHODS: Mapping[str, type] = _Methods()
_BUILTIN_NAMES = frozenset(cls.name for cls in BUILTIN)


def did_you_mean(word: object, choices: list[str] | tuple[str, ...]) -> str:
    if not isinstance(word, str):  # a YAML key may be a date, a number, null: nothing to suggest from
        return ""
    folded = {c.lower().replace("-", "_"): c for c in choices}  # TIES, Task-Arithmetic: another case or dash
    # a ratio of 0.6 at least: 0.5 offered 'consensus' for 'nonexistent' (hp77a c26)
    same = folded.get(word.lower().replace("-", "_"))
    close = [same] if same is not None else difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


# mergekit's names for methods of ours, said before the nearest spelling ("linear": "did you mean 'dare_linear'?",
# which drops 90% of the entries at random: hp88a c68)
_MERGEKIT_NAMES = {"linear": "average (base_weight for mergekit's form that lists the base among the models)"}


def method_suggestion(name: object, methods: list[str]) -> str:
    """What an unknown method name meant: mergekit's name for one of ours, else the nearest spelling, else ""."""
    if isinstance(name, str) and name in _MERGEKIT_NAMES:
        return f" (mergekit's {name} is {_MERGEKIT_NAMES[name]} here)"
    return did_you_mean(str(name)[:100], methods)


def method_class(name: str) -> type:
    plugins = _plugins()
    if name in plugins[1] and name in _BUILTIN_NAMES:  # a plugin that claims a built-in's name: the built-in runs
        warnings.warn(f"the built-in method {name!r} runs; an installed plugin's {plugins[1][name].message}",
                      MergeWarning, stacklevel=2)
    elif name in plugins[1]:
        raise plugins[1][name]
    table = _table(plugins)
    if not isinstance(name, str) or name not in table:
        raise ConfigError(
            f"unknown method {name!r}{method_suggestion(name, list(table))}",
            hint=f"available methods: {', '.join(table)} (tiesmerge methods lists their options)",
        )
    return table[name]


def _mergekit_word(key: object, known: list[str]) -> str:
    """Where a mergekit option a recipe's method parameters carry lives here ('normalize' under a tiesmerge ties
    recipe had no pointer: hp86a c38), or ""."""
    if key == "normalize" and "normalize_weights" in known:
        return " (mergekit's normalize is normalize_weights here)"
    if key == "normalize" and "aggregate" in known:
        return " (mergekit's normalize true is aggregate mean here, the default; its normalize false is aggregate sum)"
    if key == "int8_mask":
        return " (mergekit's int8_mask only saves its memory; tiesmerge needs no such option: remove it)"
    if key == "weight" and "weights" in known:
        return " (mergekit's per-model weight is weights here, one per model in the models' order)"
    if key == "lambda" and "lam" in known:
        return " (mergekit's lambda is lam here)"
    return ""


def make_method(name: str, options: Mapping[str, Any] | None = None) -> MergeMethod:
    """Build a method config from its name and options, reporting every problem at once."""
    cls = method_class(name)
    options = dict(options or {})
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise ConfigError(
            [f"{name}: unknown option {k!r}{_mergekit_word(k, known) or did_you_mean(k, known)}" for k in unknown],
            hint=f"{name} takes: {', '.join(known)}",
        )
    return cls(**options)
