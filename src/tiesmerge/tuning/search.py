"""Validation-set search over (density, lam), the paper's Appendix B.4 protocol.

lam only scales the merged task vector (theta = base + lam * tau_m), so tau_m is merged once
per density, through the streaming engine, and every lam is a cheap axpy on top of it: a grid
of 3 densities x 23 lams costs 3 merges, not 69. The tuner takes any evaluator callable
(state dict -> score, higher is better), so it is not tied to one benchmark.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..api import Source, merge
from ..errors import ConfigError, EvaluatorError, TiesMergeError
from ..inputs import as_method, check_inputs
from ..limits import OutOfFloatRange, parse_float, plain_numbers
from ..methods.base import MAX_AXIS_POINTS, MergeMethod, check_models, option_problem, option_types, said_of, steps
from ..methods.base import paper_grid as declared_grid
from ..registry import make_method, method_class
from .candidates import as_state, check_candidate, check_tuning_vocab_policy
from .evaluator import check_callback, check_evaluated_models, format_score, guard
from .space import check_axes_and_fixed, check_grid, fit_counts

__all__ = ["GridPoint", "TuningResult", "steps", "paper_grid", "parse_grid", "tune"]

Evaluator = Callable[[Mapping[str, torch.Tensor]], float]


def _check_tunable(cls: type) -> None:
    """A method that needs per-model statistics (Fisher, RegMean) cannot be tuned or searched: neither takes them."""
    try:
        needs = cls().requirements().statistics
    except (TypeError, ConfigError):  # no defaults to build it from: its own options are checked later
        return
    if needs is not None:
        raise ConfigError(f"{cls.name} needs per-model statistics ({needs.kind}); this command takes no statistics",
                          hint=f"compute them with tiesmerge stats {needs.kind} and merge with "
                               f"tiesmerge merge --method {cls.name} --stats DIR ...; tune a method without statistics")


def paper_grid(method: str | type) -> dict[str, tuple[float, ...]]:
    """The validation grid the method's paper (or the TIES paper, for its baselines) searched:
    TIES k in {0.1, 0.2, 0.3} x lam 0.8..3.0; task arithmetic lam 0.1..1.0 (a method's ``grid``)."""
    cls = method_class(method) if isinstance(method, str) else method
    _check_tunable(cls)
    grid = declared_grid(cls)
    if not grid:
        raise ConfigError(f"no paper grid for method {cls.name!r}; pass grid= explicitly "
                          "(--grid NAME=v1,v2 or NAME=start:stop:step)")
    return grid


def parse_grid(method: str | type, items: Sequence[str]) -> dict[str, tuple[Any, ...]]:
    """The method's paper grid with ``NAME=v1,v2,...`` or ``NAME=start:stop:step`` axes on top,
    each value parsed as its option's type (an int option takes integers)."""
    cls = method_class(method) if isinstance(method, str) else method
    _check_tunable(cls)
    types = option_types(cls)
    grid: dict[str, tuple[Any, ...]] = declared_grid(cls)
    problems = []
    given: dict[str, str] = {}  # option -> the --grid item that swept it first
    for item in items:
        name, _, values = item.partition("=")
        name = name.strip().replace("-", "_")
        kind = types.get(name)
        if name in given and kind in (float, int):  # a second axis would silently replace the first
            problems.append(f"--grid {item!r}: {name} is already swept by --grid {given[name]!r}; give each "
                            "option one --grid (list every value there)")
            continue
        given.setdefault(name, item)
        if kind is tuple:  # a per-model option (weights): an axis of the search, sampled in a range (hp37 C92)
            problems.append(f"--grid {item!r}: {name} is per model (one value per model), so it has no grid of "
                            f"values; search it with `tiesmerge search --axis {name} --range {name}=LO:HI` (random or "
                            f"cmaes), or hold it there with --set {name}=v1,v2,...")
            continue
        if kind is bool and name in grid:  # a switch the method's own grid sweeps (model_stock's filter_wise): its
            # values as true/false words (hp88b c44: refused with "(it has: )")
            words = [v.strip().lower() for v in values.split(",")]
            if not words or any(w not in ("true", "false") for w in words):
                problems.append(f"--grid {item!r}: {name} is a switch: give true, false or both (true,false)")
                continue
            grid[name] = tuple(dict.fromkeys(w == "true" for w in words))
            continue
        if kind not in (float, int):
            numeric = [k for k, t in types.items() if t in (float, int)]
            problems.append(f"--grid {item!r}: {cls.name} has no numeric option {name!r} to sweep "
                            + (f"(it has: {', '.join(numeric)})" if numeric else
                               f"(it has none{'; its grid sweeps ' + ', '.join(grid) if grid else ''})"))
            continue
        try:
            integer = r"\s*[+-]?[0-9]{1,30}\s*"
            if ":" in values and kind is int and all(re.fullmatch(integer, x) for x in values.split(":")):
                # integers counted as integers: 1000000000000:1000000000003:1 as floats at 12 digits "repeats points"
                # (hp73b c41), and past 2**53 a float merges two seeds into one
                start, stop, step = (int(x) for x in values.split(":"))
                if step == 0 or (stop - start) * step < 0:  # said as the float ranges say it (hp74b c16)
                    raise ConfigError(f"start:stop:step {values}: " + (
                        "the step must be a non-zero number" if step == 0 else "the step leads away from stop (the "
                        "grid would be empty); a falling grid takes a negative step"))
                if (stop - start) // step + 1 > MAX_AXIS_POINTS:
                    raise ConfigError(f"start:stop:step {values}: {(stop - start) // step + 1:,} points, more than "
                                      f"the {MAX_AXIS_POINTS:,} a grid axis may hold", hint="use a larger step")
                axis = tuple(range(start, stop + (1 if step > 0 else -1), step))
            elif ":" in values:
                start, stop, step = (parse_float(x) for x in values.split(":"))
                axis = steps(start, stop, step)
            elif kind is int:  # integers as written: past 2**53 a float merges two seeds into one (hp54 c30)
                axis = tuple(int(x) if re.fullmatch(integer, x) else parse_float(x)
                             for x in values.split(","))
            else:
                axis = tuple(parse_float(x) for x in values.split(","))
            if kind is int:
                if any(v != int(v) for v in axis):
                    raise ValueError
                axis = tuple(int(v) for v in axis)
            bad = next(((v, why) for v in axis if (why := option_problem(cls, name, v))), None)
            if bad is not None:  # out of the option's declared range: refused here, not after a merge
                problems.append(f"--grid {item!r}: {said_of(name, bad[1])}")
                continue
            grid[name] = tuple(dict.fromkeys(axis))  # lam=1,1,1 is one point: merged and scored once
        except ConfigError as exc:  # a range that is empty, unbounded or too long: its own words
            problems += [f"--grid {item!r}: {p}" for p in exc.problems]
        except OutOfFloatRange as exc:
            problems.append(f"--grid {item!r}: {exc}")
        except ValueError:
            problems.append(f"--grid {item!r}: expected NAME=v1,v2,... or NAME=start:stop:step"
                            + (" with integers" if kind is int else ""))
    total = math.prod(len(axis) for axis in grid.values())
    if not problems and total > MAX_AXIS_POINTS:  # every point is a merge: refused before the first
        problems.append(f"--grid: the grid has {total:,} points (the product of its axes' lengths), more than "
                        f"the {MAX_AXIS_POINTS:,} a sweep may hold")
    if problems:
        too_many = ("narrow the axes or use larger steps, or sample the space: `tiesmerge search --strategy random` "
                    "(or cmaes) with --range and a --budget")  # (hp62b g6)
        raise ConfigError(problems, hint=too_many if total > MAX_AXIS_POINTS else
                          f"each --grid is NAME=v1,v2,... or NAME=start:stop:step over a numeric option of "
                          f"{cls.name}; `tiesmerge methods {cls.name}` lists its options, their ranges and grid")
    return grid


@dataclass(frozen=True)
class GridPoint:
    options: dict[str, Any]  # every grid option except lam
    lam: float | None  # None: the method has no lam (SLERP, Model Stock): each point is one merge
    score: float


@dataclass(frozen=True)
class TuningResult:
    method: str
    best: GridPoint
    points: tuple[GridPoint, ...]
    merges: int  # merges through the engine (one per non-lam grid point)
    seconds: float
    best_state: dict[str, torch.Tensor] = field(repr=False, compare=False, default_factory=dict)

    def table(self) -> str:
        keys = sorted(self.best.options)
        head = " ".join(f"{k:>9}" for k in keys) + f" {'lam':>6} {'score':>8}"
        rows = [" ".join(f"{p.options[k]!s:>9}" for k in keys)
                + (f" {p.lam:>6g}" if p.lam is not None else f" {'—':>6}") + f" {format_score(p.score):>8}"
                for p in self.points]  # lam as given (hp57 c26: 0.0001 printed 0.00), the score as everywhere
        return "\n".join([head, *rows])


def _scaled(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], lam: float,
            dtypes: Mapping[str, torch.dtype]) -> dict[str, torch.Tensor]:
    # the base's own tensors (integer buffers) copied: an evaluator may change its state in place, and the
    # caller's base and every later candidate must not see that
    return {k: (base[k] + lam * delta[k]).to(dtypes[k]) if k in delta else base[k].clone() for k in base}


def _once(values: Any) -> Any:
    """A grid axis with each value once, in order (1 and 1.0 are one); an axis of unhashable values (per-model lists)
    as it is."""
    try:
        return tuple(dict.fromkeys(values))
    except TypeError:
        return values


def tune(base: Source, models: Sequence[Source], method: str | MergeMethod, evaluate: Evaluator, *,
         grid: Mapping[str, Sequence[float]] | None = None, fixed: Mapping[str, Any] | None = None,
         device: str = "cpu", memory_budget: int | str | None = None, vocab_policy: str = "error",
         allow_distant: bool = False, on_point: Callable[[GridPoint], None] | None = None) -> TuningResult:
    """Find the grid point with the best ``evaluate`` score on validation data.

    ``grid`` maps option names to candidate values and must include ``lam`` (default: the
    paper's grid for ``method``); ``fixed`` sets other options. ``method`` is a name or a method
    config object, whose fields the grid then overrides (e.g. an ablation that is no registered
    method). Returns every point's score and the best merged state dict (``best_state``), ready
    to evaluate on test data. ``vocab_policy`` ("error" or "truncate") and ``allow_distant`` as
    :func:`tiesmerge.merge` takes them. ``on_point`` is called with each scored :class:`GridPoint` (a progress hook of
    the caller's own: an exception it raises ends the sweep as raised, unlike an evaluator's, which becomes an
    EvaluatorError naming it).
    """
    check_tuning_vocab_policy(vocab_policy)
    if not isinstance(method, str):
        as_method(method, {})  # None, bytes, a number: a typed error (hp59b c21), not an AttributeError
    grid, fixed = plain_numbers(grid), plain_numbers(fixed, 1)  # numpy's scalars are numbers (hp59b c24)
    name = method if isinstance(method, str) else method.name
    cls = method_class(method) if isinstance(method, str) else type(method)
    evaluate = guard(evaluate)  # its failures: an EvaluatorError naming it, the cause chained
    check_callback(on_point, "on_point", "a grid point")
    from ..inputs import resolve_sources

    base, models = resolve_sources(base, models)  # bytes paths and hub names, as merge takes them (hp45 c24)
    check_inputs(base, models)  # before len(models) below: a single path would be counted letter by letter
    # a built-in's check of the fine-tunes, before any merge, on the models as paths (hp77b c07: bytes paths or a
    # generator were not looked at)
    check_evaluated_models(evaluate, models)
    _check_tunable(cls)
    check_grid(grid)
    check_axes_and_fixed(None, fixed)
    both = sorted(set(dict(grid or {})) & set(dict(fixed or {})))
    if both:  # the grid's values won silently (hp58 c33); run_search refuses the same
        raise ConfigError(f"{', '.join(map(repr, both))} both in the grid and fixed; drop one")
    grid = dict(grid or paper_grid(cls))
    # the paper's grid of a count cut to the models merged; an axis whose values differ from it is the user's own
    paper = declared_grid(cls)
    grid = fit_counts(cls, grid, len(models), given={k for k, v in grid.items() if tuple(v) != tuple(paper.get(k, ()))})
    has_lam = "lam" in {f.name for f in dataclasses.fields(cls)}
    if has_lam and "lam" not in grid:
        raise ConfigError("the grid must include lam (the values swept on top of each merge)")
    # a method without lam (SLERP, Model Stock) is merged and scored once per grid point
    # a value given twice is one point, merged and scored once, as parse_grid makes it (hp69b c32: lam [1, 1] twice)
    grid = {k: _once(v) for k, v in grid.items()}
    lams: tuple[float | None, ...] = tuple(dict.fromkeys(float(x) for x in grid.pop("lam"))) if has_lam else (None,)
    wrong = [f"lam={lam!r}: {why}" for lam in lams if lam is not None and (why := option_problem(cls, "lam", lam))]
    if wrong:  # the lams are swept on top of each merge, never set on a method: checked here
        raise ConfigError(wrong)
    if has_lam and lams and all(lam == 0 for lam in lams) and any(len(v) > 1 for v in grid.values()):
        # every point is the base: the other values merged and scored for nothing, a "best" reported (hp88b c39)
        raise ConfigError(f"lam 0, the grid's only lam, makes every point the base itself, so the values of "
                          f"{', '.join(k for k, v in grid.items() if len(v) > 1)} change nothing",
                          hint="give lam values above 0 (--grid lam=..., grid={'lam': [...]} in Python), or leave "
                               "lam to the method's own grid")
    unit = {"lam": 1.0} if has_lam else {}
    fixed = dict(fixed or {})
    started = time.perf_counter()
    combos: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        combos = [{**c, key: v} for c in combos for v in values]
    # validate every combination up front, so a bad grid fails before the first merge
    methods: list[MergeMethod] = [make_method(method, {**fixed, **c, **unit}) if isinstance(method, str)
                                  else dataclasses.replace(method, **{**fixed, **c, **unit}) for c in combos]
    # and against the number of models (consensus' k counts them): before the first merge, each problem once
    wrong = list(dict.fromkeys(p for m in methods for p in check_models(m, len(models))))
    if wrong:
        raise ConfigError(wrong)
    points: list[GridPoint] = []
    best: GridPoint | None = None
    best_delta: dict[str, torch.Tensor] = {}  # the best merge's float32 delta, never handed to the evaluator
    best_method: MergeMethod | None = None  # a method without lam: its best merge is made again at the end
    base_sd = as_state(base)  # (the base as a state dict: tuning evaluates in-memory models)
    dtypes = {k: v.dtype for k, v in base_sd.items()}
    base32 = {k: v.float() if v.is_floating_point() else v for k, v in base_sd.items()}
    from .driver import InputWatch

    # tune has no --dir to start again in (hp84b c11: the search's hint named one)
    watch = InputWatch([("the base", base), *((f"model {k}", m) for k, m in enumerate(models))], during="tune",
                       hint="let whatever writes it finish, then run tune again (the scores so far are of the model "
                            "as it was)")
    def merged_by(m: MergeMethod) -> dict[str, torch.Tensor]:
        # lam = 1 and float32 output: base + tau_m without a rounding that lam would amplify
        try:
            merged = merge(base, models, m, device=device, memory_budget=memory_budget, dtype=torch.float32,
                           vocab_policy=vocab_policy, allow_distant=allow_distant)
        except TiesMergeError:
            # a model rewritten since the grid started fails its read first ("not a readable safetensors file ...
            # download it again", hp85b c37): the change is the cause, said as such
            watch.check()
            raise
        watch.check()  # a model replaced since the grid started: its points are not scored beside the others (D50)
        return merged

    def as_stored(merged: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The merge as it is, in the base's dtypes (base + (merged - base) could round)."""
        return {k: merged[k].to(dtypes[k]) if k in dtypes else merged[k] for k in merged}

    for combo, m in zip(combos, methods):
        merged = merged_by(m)
        if not has_lam:
            delta = {}
            whole = as_stored(merged)
        else:
            delta = {k: merged[k].float() - base32[k] for k in merged if merged[k].is_floating_point()}
        del merged
        for lam in lams:
            state = whole if lam is None else _scaled(base32, delta, lam, dtypes)
            if lam is not None:
                check_candidate(state, delta, " ".join([*(f"{k}={v}" for k, v in combo.items()), f"lam={lam:g}"]))
            point = GridPoint(dict(combo), lam, float(evaluate(state)))
            points.append(point)
            if on_point is not None:
                on_point(point)
            # a NaN never wins: a NaN first point stayed "best", as no later score compares greater (hp37b A18)
            if math.isfinite(point.score) and (best is None or point.score > best.score):
                best, best_delta, best_method = point, delta, m
    if best is None:
        raise EvaluatorError(f"no grid point got a finite score ({len(points)} scored: "
                             f"{', '.join(sorted({str(p.score) for p in points}))})",
                             hint="check the evaluator on one merge first: it must return a finite validation "
                                  "score, higher is better")
    # scaled again from the best merge's delta, not the state the evaluator was handed: an evaluator that changes its
    # argument in place (quantises, fine-tunes) left best_state zeroed (hp40 T1); a method without lam merges its best
    # again, as its scored state is the one handed over (hp87b c41: slerp's best_state all zeros). Each merge is
    # deterministic (a random method's seed is one of its options).
    watch.check()  # replaced during the last point's evaluation: the best would be written from another model (c18)
    whole = state = {}  # the last candidate's tensors let go before the best is merged again
    assert best_method is not None
    best_state = as_stored(merged_by(best_method)) if best.lam is None else \
        _scaled(base32, best_delta, best.lam, dtypes)
    return TuningResult(name, best, tuple(points), len(combos), time.perf_counter() - started, best_state)



