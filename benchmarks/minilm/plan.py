"""Which merge rows table 1 has, read from the method registry, and the validation search behind them.

Every registered method gets a row with its paper defaults (its option defaults) and, when it
declares a validation grid on its options (``option(..., grid=...)``), a row tuned on validation
over that grid. A grid is widened where the chosen value sits on its edge (up to ``rounds``
times, one axis at a time with the others at their best values), and what stays on an edge is
reported, so the table can say so. A method registered later (a plugin, a new built-in) gets its
rows without a change here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import common

import tiesmerge
from tiesmerge.errors import ConfigError
from tiesmerge.methods.base import option_types, paper_grid
from tiesmerge.registry import METHODS, make_method
from tiesmerge.tuning import tune

LABELS = {"average": "averaging", "task_arithmetic": "task arithmetic", "ties": "TIES", "regmean": "RegMean",
          "fisher": "Fisher merging"}
DATA_AWARE = ("regmean", "fisher")  # statistics from validation data: rows of their own (run.py, stats.py)
SYMBOLS = {"lam": "λ", "density": "k", "alpha": "α"}


@dataclass(frozen=True)
class MethodRows:
    name: str
    label: str
    grid: dict[str, tuple[Any, ...]]  # empty: no option to tune, so no validation row
    skip: str | None = None  # why the method has no row on this benchmark


def label(name: str) -> str:
    return LABELS.get(name, name)


def plan(n_models: int, names: Sequence[str] | None = None) -> list[MethodRows]:
    """Every registered method (or ``names``), with its grid or the reason it has no row."""
    rows = []
    for name in names or list(METHODS):
        cls = METHODS[name]
        try:
            requirements = make_method(name, {}).requirements()
        except ConfigError as exc:
            rows.append(MethodRows(name, label(name), {}, f"its defaults do not make a method ({exc})"))
            continue
        skip = None
        if requirements.n_models not in (None, n_models):
            skip = f"merges exactly {requirements.n_models} models, not {n_models}"
        elif requirements.reference is not None:
            skip = "needs a reference model beside the task models"
        elif requirements.statistics is not None and name not in DATA_AWARE:
            skip = f"needs per-model statistics ({requirements.statistics.kind}) the benchmark does not compute"
        grid = {k: tuple(v) for k, v in paper_grid(cls).items()}
        if grid and "lam" not in grid and "lam" in option_types(cls):
            grid["lam"] = (_default(cls, "lam"),)  # tune sweeps lam on top of each merge; keep it fixed
        rows.append(MethodRows(name, label(name), grid, skip))
    return rows


def _default(cls: type, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def thin(grid: Mapping[str, Sequence[Any]], most: int | None) -> dict[str, tuple[Any, ...]]:
    """Every axis longer than ``most`` cut to ``most`` evenly spaced values, both ends kept."""
    if not most or most < 2:
        return {k: tuple(v) for k, v in grid.items()}
    out = {}
    for key, values in grid.items():
        values = tuple(values)
        if len(values) > most:
            picks = sorted({round(i * (len(values) - 1) / (most - 1)) for i in range(most)})
            values = tuple(values[i] for i in picks)
        out[key] = values
    return out


def shrink(grid: Mapping[str, Sequence[Any]], most_points: int | None) -> dict[str, tuple[Any, ...]]:
    """Thin the longest numeric axes (evenly, ends kept) until the grid has at most ``most_points``
    points or every numeric axis is down to its two ends (a slow machine's search)."""
    out = {k: tuple(v) for k, v in grid.items()}
    if not most_points:
        return out
    counts = {k: len(v) for k, v in out.items()}
    while math.prod(counts.values()) > most_points:
        axes = [k for k in counts if counts[k] > 2 and _numeric(out[k])]
        if not axes:
            break
        counts[max(axes, key=lambda k: counts[k])] -= 1
    return {k: thin({k: v}, counts[k])[k] for k, v in out.items()}


def describe(options: Mapping[str, Any]) -> str:
    """``density=0.1, lam=1.5`` -> ``k=0.1, λ=1.5`` (the table's notes)."""
    return ", ".join(f"{SYMBOLS.get(k, k)}={_fmt(v)}" for k, v in options.items())


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass
class Search:
    """Every grid point scored on validation, the best one, and the edges it could not leave."""

    points: list[dict[str, Any]] = field(default_factory=list)  # options + "score"
    merges: int = 0
    seconds: float = 0.0
    edges: list[str] = field(default_factory=list)  # "λ=3 at the top of its valid range", ...
    widened: list[str] = field(default_factory=list)
    best_state: dict | None = None

    @property
    def best(self) -> dict[str, Any]:
        return max(self.points, key=lambda p: p["score"])

    @property
    def best_options(self) -> dict[str, Any]:
        return {k: v for k, v in self.best.items() if k != "score"}


Evaluator = Callable[[Mapping[str, Any]], float]


def _grid_points(base, models, name: str, grid: Mapping[str, Sequence[Any]], evaluate: Evaluator, device: str,
                 search: Search) -> None:
    """Score every point of ``grid``; lam is swept on one merge per other point (tuning.tune)."""
    started = time.perf_counter()
    if "lam" in grid:
        result = tune(base, models, name, evaluate, grid=grid, device=device, memory_budget=common.MEMORY_BUDGET)
        new = [{**p.options, "lam": p.lam, "score": p.score} for p in result.points]
        merges, state = result.merges, result.best_state
        best_new = max(new, key=lambda p: p["score"])
    else:
        keys = list(grid)
        new, merges, state, best_new = [], 0, None, None
        for values in itertools.product(*(grid[k] for k in keys)):
            options = dict(zip(keys, values))
            merged = tiesmerge.merge(base, models, make_method(name, options), device=device,
                                     memory_budget=common.MEMORY_BUDGET)
            merges += 1
            new.append({**options, "score": float(evaluate(merged))})
            if best_new is None or new[-1]["score"] > best_new["score"]:
                best_new, state = new[-1], merged
    if not search.points or best_new["score"] > search.best["score"]:
        search.best_state = state
    search.points += new
    search.merges += merges
    search.seconds += time.perf_counter() - started


def _numeric(values: Sequence[Any]) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def _beyond(name: str, options: Mapping[str, Any], axis: str, values: Sequence[Any], up: bool,
            count: int = 3) -> list[Any]:
    """Up to ``count`` valid values past the edge of ``values`` (the method's own checks decide).

    An axis of positive values stays positive (a negative scale or density means another
    method): below its lowest value it steps down while above zero, else halves."""
    ordered = sorted(values)
    step = (ordered[-1] - ordered[-2]) if up else (ordered[1] - ordered[0])
    edge = ordered[-1] if up else ordered[0]
    if up:
        candidates = [edge + i * step for i in range(1, count + 1)]
    else:
        candidates = [edge - i * step for i in range(1, count + 1)]
        if edge > 0:
            candidates = [v for v in candidates if v > 0] or [edge / 2 ** i for i in range(1, count + 1)]
    out = []
    for value in candidates:
        value = int(value) if isinstance(edge, int) else round(value, 10)
        if isinstance(edge, int) and (value in out or value == edge):
            continue
        try:
            make_method(name, {**options, axis: value})
        except ConfigError:
            break  # past the option's valid range
        out.append(value)
    return out


def search(base, models, name: str, grid: Mapping[str, Sequence[Any]], evaluate: Evaluator, *, device: str = "cpu",
           rounds: int = 2, log=print) -> Search:
    """The grid, then up to ``rounds`` widenings of every numeric axis whose best value is on an edge."""
    result = Search()
    _grid_points(base, models, name, grid, evaluate, device, result)
    explored = {k: list(v) for k, v in grid.items()}
    for _ in range(rounds):
        best = result.best_options
        moved = False
        for axis, values in explored.items():
            if len(values) < 2 or not _numeric(values):
                continue
            ordered = sorted(values)
            if best[axis] not in (ordered[0], ordered[-1]):
                continue
            extra = _beyond(name, best, axis, values, up=best[axis] == ordered[-1])
            if not extra:
                continue
            sub = {k: ((best[k],) if k != axis else tuple(extra)) for k in explored}
            log(f"  {name}: {SYMBOLS.get(axis, axis)}={_fmt(best[axis])} on the grid's edge; trying {extra}")
            _grid_points(base, models, name, sub, evaluate, device, result)
            result.widened.append(f"{SYMBOLS.get(axis, axis)} + {', '.join(_fmt(v) for v in extra)}")
            explored[axis] = sorted(set(values) | set(extra))
            moved = True
            break  # re-read the best before widening another axis
        if not moved:
            break
    best = result.best_options
    for axis, values in explored.items():
        if len(values) >= 2 and _numeric(values) and best[axis] in (min(values), max(values)):
            result.edges.append(f"{SYMBOLS.get(axis, axis)}={_fmt(best[axis])} is at the "
                                f"{'top' if best[axis] == max(values) else 'bottom'} of the searched range")
    return result
