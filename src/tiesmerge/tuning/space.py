"""The search space of a merge: axes taken from a method's option fields.

An axis is one numeric option (``lam``, ``density``) or one per-model option (``weights``,
``densities``: one coordinate per model). Each has a range, for the random and CMA-ES
strategies, which see the space as the unit cube [0, 1]^d, and may have grid values, for the
grid strategy. Ranges come from ``--range NAME=LO:HI``, else the option's paper grid (its
smallest and largest value), else its check (a fraction kept: [0.05, 1]; a per-model weight:
[0.1, 1]); an axis with none of these is an error that names the flag to pass.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, MergeWarning
from ..limits import OutOfFloatRange, finite_float, parse_float
from ..methods.base import (
    MAX_AXIS_POINTS,
    MODEL_COUNT_UNITS,
    NORMALISED_WEIGHT_LIMIT,
    _shown,
    fraction,
    nonzero_sum,
    option_problem,
    option_types,
    round_value,
    said_of,
)
from ..methods.base import paper_grid as declared_grid

__all__ = ["Axis", "SearchSpace", "build_space", "parse_ranges", "parse_fixed", "canonical"]

# a per-model option without a fraction check or a grid is a relative weight: 0.1..1 lets one model count
# ten times another without letting every weight reach 0 (a mean over weights 0 is undefined)
WEIGHT_RANGE = (0.1, 1.0)
FRACTION_RANGE = (0.05, 1.0)  # a density below 5% keeps too little to be worth a candidate


@dataclass(frozen=True)
class Axis:
    """One option searched: ``low..high`` for sampling, ``values`` for the grid, ``per_model``
    coordinates (0: one scalar), ``integer`` options rounded to integers."""

    name: str
    low: float
    high: float
    values: tuple[float, ...] = ()
    per_model: int = 0
    integer: bool = False

    @property
    def size(self) -> int:
        """Coordinates of the unit cube this axis takes."""
        return self.per_model or 1

    def value(self, u: Sequence[float]) -> Any:
        """The option's value at unit coordinates ``u`` (each clipped into [0, 1])."""
        out = [self._scale(min(1.0, max(0.0, float(x)))) for x in u]
        return tuple(out) if self.per_model else out[0]

    def unit(self, value: Any) -> list[float]:
        """The unit coordinates of an option value (the inverse of :meth:`value`)."""
        values = value if self.per_model else (value,)
        span = self.high - self.low
        return [min(1.0, max(0.0, (float(v) - self.low) / span)) if span else 0.5 for v in values]

    def _scale(self, x: float) -> float:
        v = self.low + x * (self.high - self.low)
        if self.integer:  # the nearest whole number inside [low, high] (0.4:1 never gives 0: hostile pass 29, N4)
            return min(max(int(round(v)), math.ceil(self.low)), math.floor(self.high))
        return min(max(round_value(v), self.low), self.high)  # rounding never leaves the range (hp56 c41)


@dataclass(frozen=True)
class SearchSpace:
    """The axes searched, and the options held fixed (the rest keep the method's defaults)."""

    method: str
    axes: tuple[Axis, ...]
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def dimension(self) -> int:
        return sum(a.size for a in self.axes)

    def from_unit(self, u: Sequence[float]) -> dict[str, Any]:
        """Options (fixed ones included) at a point of the unit cube [0, 1]^dimension."""
        if len(u) != self.dimension:
            raise ValueError(f"expected {self.dimension} coordinates, got {len(u)}")
        options, at = dict(self.fixed), 0
        for axis in self.axes:
            options[axis.name] = axis.value(u[at:at + axis.size])
            at += axis.size
        return options

    def to_unit(self, options: Mapping[str, Any]) -> list[float]:
        """Unit coordinates of ``options``; an axis they do not set (or set to None) sits at its centre."""
        return [x for axis in self.axes
                for x in (axis.unit(options[axis.name]) if options.get(axis.name) is not None else [0.5] * axis.size)]

    def defaults(self) -> dict[str, Any]:
        """The method's default for each axis (None where it has none, e.g. per-model options)."""
        from ..registry import method_class

        fields = {f.name: f.default for f in dataclasses.fields(method_class(self.method))}
        return {a.name: fields.get(a.name) for a in self.axes}

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the axes' grid values, the last axis varying fastest."""
        missing = [a.name for a in self.axes if not a.values]
        if missing:
            per_model = [a.name for a in self.axes if not a.values and a.per_model]
            raise ConfigError(f"the grid strategy needs values for {', '.join(missing)}",
                              hint=f"per-model axes ({', '.join(per_model)}) are searched by --strategy random or "
                                   "cmaes, within --range; a grid sweeps one value per option"
                              if per_model else "pass --grid NAME=v1,v2,... or NAME=start:stop:step for each")
        return [{**self.fixed, **{a.name: v for a, v in zip(self.axes, combo)}}
                for combo in itertools.product(*(a.values for a in self.axes))]

    def describe(self) -> dict[str, Any]:
        """The space as JSON (the results log's header: a resumed search must search the same space)."""
        return {"method": self.method, "fixed": canonical(self.fixed),
                "axes": [{"name": a.name, "low": a.low, "high": a.high, "values": list(a.values),
                          "per_model": a.per_model, "integer": a.integer} for a in self.axes]}


def _normalised(meta: Any) -> bool:
    """A per-model option divided by its sum (declared, or checked by nonzero_sum as a plugin's method may)."""
    return bool(meta.get("normalised")) or meta.get("check_all") is nonzero_sum


def canonical(options: Mapping[str, Any]) -> dict[str, Any]:
    """Options as JSON values, keys sorted (tuples as lists): the form logs and keys use."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(options.items())}


def parse_ranges(items: Sequence[str]) -> dict[str, tuple[float, float]]:
    """``NAME=LO:HI`` items as {name: (lo, hi)}."""
    ranges, problems = {}, []
    given: dict[str, str] = {}
    for item in items:
        name, _, text = item.partition("=")
        key = name.strip().replace("-", "_")
        if key in given:  # the last one would win silently (hp56 c21)
            problems.append(f"--range {item!r}: {key} already has --range {given[key]!r}; give each option one "
                            "--range")
            continue
        given[key] = item
        try:
            low, high = (parse_float(x) for x in text.split(":"))
            if not low < high:
                raise ValueError
        except OutOfFloatRange as exc:
            problems.append(f"--range {item!r}: {exc}")
            continue
        except ValueError:
            problems.append(f"--range {item!r}: expected NAME=LO:HI with LO < HI")
            continue
        if not (math.isfinite(low) and math.isfinite(high) and math.isfinite(high - low)):
            # candidates are drawn as low + u * (high - low): an infinite width makes them infinite
            problems.append(f"--range {item!r}: the bounds and their difference must be finite numbers")
            continue
        ranges[key] = (low, high)
    if problems:
        raise ConfigError(problems)
    return ranges


def parse_fixed(method: str | type, items: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` items as options, each value parsed as its option's type."""
    from ..registry import method_class

    cls = method_class(method) if isinstance(method, str) else method
    types = option_types(cls)
    fixed, problems = {}, []
    given: dict[str, str] = {}
    for item in items:
        name, _, text = item.partition("=")
        name = name.strip().replace("-", "_")
        if name in given:  # the last one would win silently (hp56 c20)
            problems.append(f"--set {item!r}: {name} is already set by --set {given[name]!r}; set each option once")
            continue
        given[name] = item
        kind = types.get(name)
        try:
            if kind is None:
                raise KeyError
            if kind is bool:
                if text.lower() not in ("true", "false"):
                    raise ValueError
                value: Any = text.lower() == "true"
            elif kind is tuple:
                value = tuple(parse_float(x) for x in text.split(","))
            elif kind is float:
                value = parse_float(text)
            elif kind is int:
                value = int(text)
            else:
                value = text
            why = option_problem(cls, name, value)
            if why:
                problems.append(f"--set {item!r}: {said_of(name, why)}")
                continue
            fixed[name] = value
        except KeyError:
            problems.append(f"--set {item!r}: {cls.name} has no option {name!r} (it has: {', '.join(types)})")
        except OutOfFloatRange as exc:
            problems.append(f"--set {item!r}: {exc}")
        except ValueError:
            problems.append(f"--set {item!r}: not a valid {getattr(kind, '__name__', kind)} for {name}")
    if problems:
        raise ConfigError(problems)
    return fixed


def _too_many(total: float) -> ConfigError:
    """A grid past the sweep's bound: every point a merge and an evaluation, and the combinations built up front
    (10^5 x 10^5 values grew memory until killed, a bare MemoryError under a limit, where the command line refuses
    past MAX_AXIS_POINTS: hp84b c25)."""
    size = f"{total:,}" if math.isfinite(total) else "more than 9.2e18"
    return ConfigError(f"the grid has {size} points (the product of its axes' lengths), more than the "
                       f"{MAX_AXIS_POINTS:,} a sweep may hold",
                       hint="narrow the axes or use larger steps, or sample the space: run_search with strategy "
                            "'random' (or 'cmaes'), ranges and a budget")


def check_grid(grid: Any) -> None:
    """A grid from the API ({option: values}) of the shape the command line builds: each option's values a non-empty
    list or tuple, lam's real numbers. A text was read letter by letter ("12": lam 1 and 2; "0.5": a ValueError on
    '.'), an empty list blamed the evaluator (hp56 c36, c38)."""
    if grid is None:
        return
    if not isinstance(grid, Mapping):
        raise ConfigError(f"grid is a {type(grid).__name__}, not a mapping of option names to lists of values",
                          hint="e.g. grid={'lam': [0.8, 1.0], 'density': [0.1, 0.2]}")
    # the size first: each value is looked at below, and range(10**20) never came back (hp85b c15)
    sizes = []
    for values in grid.values():
        if isinstance(values, (list, tuple, range)):
            try:
                sizes.append(len(values))
            except OverflowError:  # len() of a range past sys.maxsize
                sizes.append(math.inf)
    if math.prod(sizes) > MAX_AXIS_POINTS:
        raise _too_many(math.prod(sizes))
    problems = []
    for name, values in grid.items():
        if isinstance(values, (str, bytes, Mapping)) or not isinstance(values, (list, tuple, range)):
            problems.append(f"grid[{name!r}] is {_shown(values)}, not a list of values (e.g. [{_example(name)}])")
        elif not values:
            problems.append(f"grid[{name!r}] is empty: give at least one value")
        elif exact := [v for v in values if isinstance(v, numbers.Number)
                       and not isinstance(v, (int, float, complex))]:
            # a Decimal or Fraction: a number, said as one (hp74b c26: "not a finite number"); the grid's values are
            # written to the scores' JSON and compared as floats, so they are given as floats
            problems.append(f"grid[{name!r}] holds {_shown(exact[0])}, an exact {type(exact[0]).__name__}: a grid "
                            f"takes int and float values{_as_float_example(exact[0])}")
        elif name == "lam":
            problems += [f"grid['lam'] holds {_shown(v)}, not a finite number" for v in values
                         if isinstance(v, bool) or not isinstance(v, (int, float)) or not finite_float(v)]
        else:  # a number past float's range failed later as an OverflowError (hp58 c28, c29)
            problems += [f"grid[{name!r}] holds {_shown(v)}, past any number an option takes" for v in values
                         if isinstance(v, int) and not isinstance(v, bool) and not finite_float(v)]
    if problems:
        raise ConfigError(problems, hint="e.g. grid={'lam': [0.8, 1.0], 'density': [0.1, 0.2]}")


def _as_float_example(value: numbers.Number) -> str:
    """' (write 1.5)' for an exact number float holds (near enough), '' past float's range."""
    try:
        as_float = float(value)
    except (OverflowError, ValueError):
        return ""
    return f" (write {as_float!r})" if math.isfinite(as_float) else ""


def check_ranges(ranges: Any) -> None:
    """Ranges from the API ({option: (low, high)}), as ``--range NAME=LO:HI`` gives them: two finite numbers, low
    below high (a text failed in unpacking, untyped: hp56 c37; a reversed pair passed where the flag refuses it)."""
    if ranges is None:
        return
    if not isinstance(ranges, Mapping):
        raise ConfigError(f"ranges is a {type(ranges).__name__}, not a mapping of option names to (low, high)",
                          hint="e.g. ranges={'lam': (0.5, 2.0)}")
    problems = []
    for name, pair in ranges.items():
        numbers = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
        if not numbers:
            problems.append(f"ranges[{name!r}] is {_shown(pair)}, not a pair (low, high) of numbers")
        elif not all(finite_float(v) for v in pair) or not pair[0] < pair[1]:  # (10**400: hp58 c30)
            problems.append(f"ranges[{name!r}] is {_shown(pair)}: low and high must be finite, low < high")
    if problems:
        raise ConfigError(problems, hint="e.g. ranges={'lam': (0.5, 2.0)}")


def check_axes_and_fixed(axes: Any, fixed: Any) -> None:
    """``axes`` a list of option names, ``fixed`` a mapping, as the command line builds them: a text was read letter
    by letter ("no option 'l' ... 'a' ... 'm'"), fixed="scope=per_tensor" an untyped ValueError (hp57 c34, c35)."""
    problems = []
    if axes is not None and (isinstance(axes, (str, bytes, Mapping)) or not isinstance(axes, (list, tuple))
                             or not all(isinstance(a, str) for a in axes)):
        problems.append(f"axes is {_shown(axes)}, not a list of option names (e.g. axes=['lam', 'density'])")
    if fixed is not None and not isinstance(fixed, Mapping):
        problems.append(f"fixed is {_shown(fixed)}, not a mapping of option names to values (e.g. "
                        "fixed={'scope': 'per_tensor'})")
    if problems:
        raise ConfigError(problems)


def check_start(space: SearchSpace, start: Any) -> None:
    """CMA-ES's first mean: {axis: value} inside each axis's range, a number per scalar axis and one per model for a
    per-model one (hp57 c32: a text, a list or 10**400 failed untyped; c33: names of no axis, NaN or values outside
    the range ignored or clamped silently)."""
    if start is None:
        return
    if not isinstance(start, Mapping):
        raise ConfigError(f"start is {_shown(start)}, not a mapping of the searched options to values",
                          hint=f"e.g. start={{{space.axes[0].name!r}: ...}}" if space.axes else None)
    axes = {a.name: a for a in space.axes}
    problems = []
    for name, value in start.items():
        axis = axes.get(name)
        if axis is None:
            problems.append(f"start[{name!r}]: not an option this search varies (it varies {', '.join(axes)})")
            continue
        if value is None and axis.per_model:  # the method's default, as the log records a start resolved over the
            continue  # defaults (hp83b c03: the recorded start given back was "None, not 2 values")
        values = value if axis.per_model and isinstance(value, (list, tuple)) else (value,)
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        if axis.per_model and not (isinstance(value, (list, tuple)) and len(value) == axis.per_model):
            problems.append(f"start[{name!r}] is {_shown(value)}, not {axis.per_model} values, one per model")
        elif not numbers:
            problems.append(f"start[{name!r}] is {_shown(value)}, not a number")
        elif not all(finite_float(v) for v in values):
            problems.append(f"start[{name!r}] is {_shown(value)}, not a finite number")
        elif not all(axis.low <= v <= axis.high for v in values):
            problems.append(f"start[{name!r}] is {_shown(value)}, outside the range searched "
                            f"[{axis.low:g}, {axis.high:g}]")
    if problems:
        raise ConfigError(problems)


def _example(name: str) -> str:
    return "0.8, 1.0" if name == "lam" else "0.1, 0.2"


def build_space(method: str | type, n_models: int, *, axes: Sequence[str] | None = None,
                grid: Mapping[str, Sequence[float]] | None = None,
                ranges: Mapping[str, tuple[float, float]] | None = None,
                fixed: Mapping[str, Any] | None = None) -> SearchSpace:
    """The space of ``axes`` (default: the grid's axes, else the method's paper grid) for a
    method merging ``n_models`` models. ``grid`` gives axes' values (overriding the paper's),
    ``ranges`` their sampling ranges; ``fixed`` options are held (and may not be searched)."""
    from ..registry import method_class

    check_grid(grid)
    check_ranges(ranges)
    cls = method_class(method) if isinstance(method, str) else method
    types = option_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    paper = declared_grid(cls)  # an axis whose values differ from the paper's is the user's own (the command line
    # hands the paper's grid over with the user's --grid on top)
    given = {k for k, v in dict(grid or {}).items() if tuple(v) != tuple(paper.get(k, ()))}
    grid = fit_counts(cls, {**paper, **dict(grid or {})}, n_models, given=given)
    ranges = dict(ranges or {})
    fixed = dict(fixed or {})
    # an option given a range (or a grid of the user's) is searched; with --axis naming the axes, one outside them
    # would be neither searched nor held: it was dropped without a word (hp37 C16)
    names = list(axes) if axes else [*grid, *(k for k in ranges if k not in grid)]
    problems = []
    if axes:
        for name in dict.fromkeys([*ranges, *(k for k in grid if k in given)]):
            if name not in names:
                flag = "--range" if name in ranges else "--grid"
                problems.append(f"{flag} {name} names an option the search does not vary (the axes are "
                                f"{', '.join(names)}): add --axis {name} to search it, or hold it with --set "
                                f"{name}=VALUE")
    searchable = [n for n, f in fields.items()
                  if types[n] in (float, int) or (types[n] is tuple and f.metadata.get("per_model"))]
    for name in dict.fromkeys([*names, *ranges]):  # an option named by --axis and --range: said once (hp29 N5)
        if name not in searchable:
            # a switch of the paper grid (model_stock's filter_wise) is tune's to sweep, not "no option to tune"
            # (hp85b c56: contradicted tune and `tiesmerge methods`)
            switch = name in fields and types[name] is bool
            problems.append(f"{cls.name} has no numeric or per-model option {name!r} to search "
                            + (f"({name} is a switch: `tiesmerge tune` sweeps it, search varies numbers"
                               + (f"; {cls.name}'s numeric options are {', '.join(searchable)})" if searchable
                                  else f"; {cls.name} has none)") if switch else
                               f"(it has: {', '.join(searchable)})" if searchable else
                               "(it has none: its merge has no numeric option to search)"))
    for name in names:
        if name in fixed:
            problems.append(f"{name!r} is both searched and fixed; drop one")
    for name, value in fixed.items():  # an option the method lacks, or a value it refuses: said now, as --set's are,
        # not by every candidate's merge with "narrow the searched ranges" for a hint (hp84b c27)
        if name not in fields:
            problems.append(f"fixed[{name!r}]: {cls.name} has no option {name!r} (it has: {', '.join(fields)})")
        elif not (fields[name].metadata.get("per_model") and isinstance(value, (tuple, list))) \
                and (why := option_problem(cls, name, value)):
            problems.append(f"fixed[{name!r}]: {said_of(name, why)}")
    for name, value in fixed.items():  # a held per-model option of the wrong count: said now, not by candidate 0's
        # merge ("candidate 0: ties: 1 weights given for 2 models", hp41 C84)
        if name in fields and fields[name].metadata.get("per_model") and isinstance(value, (tuple, list)) \
                and len(value) not in (0, n_models):
            problems.append(f"the held {name} (--set {name}=...) gives {len(value)} value(s) for {n_models} models: "
                            f"give one per model, in the models' order")
    if len(set(names)) != len(names):
        problems.append(f"an option is named twice in the axes {names}")
    if problems:
        raise ConfigError(problems)
    unused = _unused_options(cls, fixed)
    if n_models == 1:  # one model's weight divides out of a normalised sum or an elected mean (hp84b c29: every
        # candidate the same merge, the same score)
        for name in names:
            if name == "weights" and fields[name].metadata.get("per_model") and (
                    _normalised(fields[name].metadata) or _elected_mean(cls, fixed)):
                unused.setdefault(name, "with one model, its weight divides out (the merge divides by the weights' "
                                        "sum)")
    held = fixed.get("weights")
    if "weights" in fields and "base_weight" not in fields and isinstance(held, (tuple, list)) and held \
            and all(isinstance(w, (int, float)) and w == 0 for w in held):
        # every task vector weighted 0: each candidate is the base, the budget spent on one score (hp86b c24)
        for name in names:
            unused.setdefault(name, "the held weights are all 0 (the merge is the base itself)")
    if "lam" in fields and isinstance(fixed.get("lam"), (int, float)) and fixed["lam"] == 0:
        # lam held at 0 scales every merged task vector to nothing: the same (hp88b c39)
        for name in names:
            unused.setdefault(name, "the held lam is 0 (the merge is the base itself)")
    for name in names:
        if name in unused:  # every candidate would be the same merge, scored again and again
            problems.append(f"searching {name} changes nothing: {unused[name]}, so every candidate is the same "
                            "merge; " + ("drop that --set, or search another option" if fixed else
                                         "search another option (or --set what makes it count)"))
    # an axis that another searched axis makes unused (TIES's density beside densities, which overrides it): its
    # values changed nothing, and the report plotted their "effect" (hp42 D64)
    probe = {n: (0.5,) * n_models for n in names if types[n] is tuple and n not in unused}
    beside = _unused_options(cls, {**fixed, **probe}) if probe else {}
    for name in names:
        if name in beside and name not in unused and name not in probe:
            problems.append(f"searching {name} changes nothing while {', '.join(probe)} is searched too: "
                            f"{beside[name]}; drop one of the axes")
    if problems:
        raise ConfigError(problems)
    built = []
    for name in names:
        meta = fields[name].metadata
        per_model = n_models if types[name] is tuple else 0
        values = tuple(grid.get(name, ()))
        if types[name] is int:  # a whole-number option (consensus' k, a seed): its grid values are integers
            whole = [v for v in values if isinstance(v, (int, float)) and float(v).is_integer()]
            if len(whole) != len(values):
                problems.append(f"{name} is a whole number, but the grid holds {[v for v in values if v not in whole]}")
                continue
            values = tuple(int(v) for v in values)
        if name in ranges:
            low, high = ranges[name]
        elif values and len(values) > 1:
            low, high = float(min(values)), float(max(values))
        elif values and name in given:  # the user's one value (--grid density=0.3): the axis holds it, a fraction
            low = high = float(values[0])  # too (it was drawn from [0.05, 1] without a word, hp36 C41)
        elif meta.get("check") is fraction:
            low, high = FRACTION_RANGE
        elif per_model:
            low, high = WEIGHT_RANGE
        elif values:  # one grid value: the axis holds it (random and CMA-ES sample nothing else)
            low = high = float(values[0])
        else:
            problems.append(f"no range for {name!r}: pass --range {name}=LO:HI (or --grid {name}=v1,v2,...)")
            continue
        if per_model and values:
            problems.append(f"{name!r} is per model: it has a range (--range), not grid values")
            continue
        if types[name] is int and math.ceil(low) > math.floor(high):
            problems.append(f"{name} takes whole numbers, and {low:g}:{high:g} holds none: widen --range {name}")
            continue
        if types[name] is int and not values and max(abs(low), abs(high)) > 2 ** 53:  # sampled as floats: skip whole
            # numbers there (hp54 c59: a seed below the range was tried)
            problems.append(f"{name}'s range {low:.17g}:{high:.17g} lies past 2**53, where a sampled float skips "
                            f"whole numbers: list them with --grid {name}=v1,v2,... instead")
            continue
        for end in (low, high, *values):  # every value a candidate can take lies in [low, high] or the grid
            if types[name] is int:  # sampled values are the whole numbers inside the range (Axis._scale)
                end = min(max(int(round(end)), math.ceil(low)), math.floor(high))
            why = option_problem(cls, name, (end,) * per_model if per_model else end)
            if why:
                problems.append(f"{name} {why.split(', got')[0]}, but the search would try {end!r}")
                break
        if per_model and low < 0 < high and _normalised(meta):  # weights normalised by their sum
            problems.append(f"{name} over {low:g}:{high:g} crosses 0: weights normalised by their sum can then nearly "
                            f"cancel (a sum near 0 scales the merge far past the models), so some candidates would "
                            f"be refused mid-search; narrow --range {name} to one sign")
            continue
        if (per_model and _normalised(meta)) or meta.get("sums_with"):
            crossing = _total_crossing(fields, name, per_model, (low, high), fixed, ranges, grid, names)
            if crossing:
                problems.append(crossing)
                continue
        if per_model and low != high:  # per-model values are sampled apart: a corner can be refused
            corners = [(low,) * per_model, (high,) * per_model] + ([(low,) + (high,) * (per_model - 1)]
                                                                    if per_model > 1 else [])
            why = next(((c, w) for c in corners if (w := _corner_problem(cls, fixed, name, c))), None)
            if why:
                middle = _corner_problem(cls, fixed, name, ((low + high) / 2,) * per_model)
                if middle and middle == why[1]:  # refused whatever the values: a conflict with a fixed option
                    held = ", ".join(f"{k}={v!r}" for k, v in fixed.items() if v is not None)
                    problems.append(f"searching {name}" + (f" with {held} fixed" if held else "") + " is refused "
                                    f"whatever its values ({middle}): drop the --set that conflicts, or search "
                                    "another option")
                else:
                    problems.append(f"{name} over {low:g}:{high:g}: a candidate such as {why[0]} would be refused "
                                    f"({why[1]}); narrow --range {name}")
                continue
        built.append(Axis(name, float(low), float(high), tuple(values), per_model, types[name] is int))
    if problems:
        raise ConfigError(problems)
    if not built:
        raise ConfigError(f"nothing to search for {cls.name}: name the options with axes=/--axis",
                          hint=f"searchable options: {', '.join(searchable)}")
    return SearchSpace(cls.name, tuple(built), fixed)


def fit_counts(cls: type, grid: Mapping[str, Sequence[Any]], n_models: int, given: set[str]) -> dict[str, Any]:
    """``grid`` with the paper's values of a count (consensus' k: 1, 2, 3) cut to what ``n_models`` allow; an axis in
    ``given`` (the user's own values) is kept whole, and refused as given where a value is too large."""
    out = dict(grid)
    for f in dataclasses.fields(cls):
        if f.name not in out or f.metadata.get("unit") not in MODEL_COUNT_UNITS:
            continue
        past = [v for v in out[f.name] if isinstance(v, (int, float)) and v > n_models]
        if past and f.name in given:  # refused before the first merge, not candidate by candidate (hp29 N11)
            raise ConfigError(f"{cls.name}: {f.name}={past[0]} counts {f.metadata['unit']}, but only {n_models} "
                              f"model{'s are' if n_models != 1 else ' is'} merged: drop it from --grid {f.name}")
        if past:
            kept = tuple(v for v in out[f.name] if v not in past)
            if kept:
                out[f.name] = kept
                warnings.warn(MergeWarning(f"{cls.name}: {f.name}={', '.join(map(str, past))} left out of the grid: "
                                           f"it counts {f.metadata['unit']}, and {n_models} models are merged"),
                              stacklevel=3)
    return out


def _total_crossing(fields: Mapping[str, Any], name: str, n: int, bounds: tuple[float, float],
                    fixed: Mapping[str, Any], ranges: Mapping[str, tuple[float, float]],
                    grid: Mapping[str, Sequence[float]], searched: Sequence[str]) -> str | None:
    """Options normalised by their total together (average's per-model weights and its base_weight, declared by
    ``sums_with``): where that total over the search's box crosses 0 or comes near it, candidates there nearly
    cancel and are refused mid-search (an adaptive strategy walks into them), though no corner of the searched
    option's own range is refused. ``name`` is searched over ``bounds`` (``n`` values per model, 0: one value);
    each partner counts with its fixed value, its range or its grid, a partner also searched being checked from its
    own side. None when the total keeps away from 0 (or nothing is normalised with it)."""
    count = max(n, 1)
    low, high = count * bounds[0], count * bounds[1]  # the searched option's own part of the total over the box
    lows, highs = [bounds[0]] * count, [bounds[1]] * count  # the box's corners where the total is lowest / highest
    joined, partners = [], []
    own = fields[name].metadata.get("sums_with")
    for other, f in fields.items():
        if f.metadata.get("sums_with") == name:  # a scalar added to the searched per-model values
            if isinstance(fixed.get(other), (int, float)) and not isinstance(fixed[other], bool):
                span = (float(fixed[other]),) * 2
            elif other in ranges:
                span = tuple(map(float, ranges[other]))
            elif len(grid.get(other, ())) > 0:
                span = (float(min(grid[other])), float(max(grid[other])))
            else:  # not set: not counted (the method leaves it out)
                continue
            lows.append(span[0])
            highs.append(span[1])
            joined.append(f"{other}={span[0]:g}" if span[0] == span[1] else f"{other} over {span[0]:g}:{span[1]:g}")
        elif other == own and other not in searched and isinstance(fixed.get(other), (tuple, list)):
            values = [float(x) for x in fixed[other]]  # the per-model values the searched scalar is added to
            span = (sum(values),) * 2
            lows += values
            highs += values
            joined.append(f"{other}={','.join(f'{v:g}' for v in values)}")
        else:
            continue
        low, high = low + span[0], high + span[1]
        partners.append(other)
    if not joined:
        return None
    change = " and ".join(partners)
    if not low <= 0 <= high:  # one sign: the corner nearest 0 may still normalise past the limit (a total of 1e-5)
        nearest, corner = (low, lows) if low > 0 else (high, highs)
        reach = max(abs(v) for v in corner) / abs(nearest)
        if reach <= NORMALISED_WEIGHT_LIMIT:
            return None
        return (f"{name} over {bounds[0]:g}:{bounds[1]:g} with {' and '.join(joined)}: their total comes within "
                f"{abs(nearest):.3g} of 0 at a corner of the box, where the weights normalised by it reach "
                f"±{reach:.3g} (at most {NORMALISED_WEIGHT_LIMIT:g}), so candidates there would be refused "
                f"mid-search; narrow --range {name} (or change {change}) so the total stays away from 0")
    return (f"{name} over {bounds[0]:g}:{bounds[1]:g} with {' and '.join(joined)}: their total ranges over "
            f"{low:g}:{high:g}, which crosses 0, so candidates inside it nearly cancel (a sum near 0 scales the merge "
            f"far past the models) and would be refused mid-search; narrow --range {name} (or change {change}) so "
            "the total keeps one sign")


def _elected_mean(cls: type, fixed: Mapping[str, Any]) -> bool:
    """Whether the method, with the fixed options, merges by an elected weighted mean (ties and its kin with aggregate
    mean), which divides by the agreeing models' weights."""
    try:
        method = cls(**fixed)
    except (ConfigError, TypeError, ValueError):
        return False
    return hasattr(method, "elect") and getattr(method, "aggregate", None) == "mean"


def _unused_options(cls: type, fixed: Mapping[str, Any]) -> dict[str, str]:
    """The options a method ignores with the fixed ones (its ``unused_options``, e.g. slerp's t under a t_by_name
    with a '*' rule); none where the fixed options alone are refused (reported where the candidates are built)."""
    if not hasattr(cls, "unused_options"):
        return {}
    try:
        return dict(cls(**fixed).unused_options())
    except (ConfigError, TypeError, ValueError):
        return {}


def _corner_problem(cls: type, fixed: Mapping[str, Any], name: str, value: tuple) -> str | None:
    """Why the method refuses ``name=value`` with the fixed options (its own checks of the whole config, such as
    nuslerp's weights of opposite signs), or None: checked before a search, which would stop at that candidate."""
    try:
        cls(**{**fixed, name: value}).requirements()
    except ConfigError as exc:
        return str(exc).split("\n")[0]
    except (TypeError, ValueError):  # other options' values are checked where the candidates are built
        return None
    return None
