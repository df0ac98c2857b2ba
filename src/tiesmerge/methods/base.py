"""What a merge method is, as the engine sees it: one declaration, one pure function.

A method is a frozen dataclass made with :func:`method_config`. Its fields, declared with
:func:`option`, are at once its config schema, its CLI flags, its recipe keys and its tuning
space: their annotations give the flag types (``float``, ``int``, ``str``, a tuple of floats
one per model, or a :data:`ModelPath`), their metadata the help, unit, choices and checks.

It says once, in ``requirements()``, what it needs (:class:`Requirements`: cuts by magnitude,
sums over the stream, statistics, a reference model, whole tensors, the base's values, a fused
CPU kernel that computes it exactly), and the engine provides exactly that in the
:class:`ChunkContext` of each ``merge(tau, ctx)`` call, which maps one chunk of stacked task
vectors ``(n, *S)`` to one chunk of the merged task vector ``(*S)``. Methods never read files
and the engine never asks a method anything else: adding a method is one module.

Optionally a method also defines ``task_vectors(tau, ctx) -> (n, *S)``: each model's *processed*
task vector v_t, such that the method's merge is a fixed combination of them (task arithmetic:
w_t tau_t; TIES: the trimmed values that agree with the elected sign). ``tiesmerge adapt``
(AdaMerging) learns the combination theta = base + sum_t lambda_t v_t instead, so any method
that defines it can be adapted; ``lam`` and any division by the weights' sum are left out of v_t.

Nothing here imports torch: ``tiesmerge methods``, ``--help`` and ``validate`` start without it.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
import numbers
import os
import re
import types as types_module
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, NewType, Protocol, runtime_checkable

from ..errors import ConfigError, MergeWarning

if TYPE_CHECKING:
    import torch

__all__ = [
    "ModelPath", "SCOPES", "TopK", "Cut", "Reduction", "SideInput", "Band", "TiesKernel", "LinearKernel",
    "TensorKernel", "Requirements",
    "ChunkContext", "MergeMethod", "method_config", "option", "option_types", "paper_grid", "check_options",
    "check_models", "steps", "fraction", "probability", "unit_interval", "finite", "positive", "non_negative_int",
    "seed_value", "nonzero_sum", "option_problem", "unit_range", "MODEL_COUNT_UNITS",
]

ModelPath = NewType("ModelPath", str)  # a field holding a model directory: a path flag, resolved like a path
SCOPES = ("global", "per_tensor")  # where cuts and reductions run: each model's whole model, or each tensor


# ---------------------------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class TopK:
    """Each model's top ``density`` fraction of entries by |tau| over the scope.

    The engine finds the exact threshold per model (ties at the threshold kept) and hands it
    to ``merge``; ``densities`` (one per model) override ``density``.
    """

    density: float
    densities: tuple[float, ...] | None = None

    def keep_counts(self, numel: int, n_models: int, *, at_least_one: bool = False) -> list[int]:
        """Entries each model keeps of a scope of ``numel`` entries (``at_least_one``: mergekit's
        exact-k rule, max(1, int(density * numel)) of a non-empty tensor with mergekit's float
        product, so 0.29 of 100 keeps 28 there and 29 elsewhere)."""
        from .ops import keep_count  # exact rational arithmetic; ops is pure math

        densities = self.densities if self.densities is not None else (self.density,) * n_models
        if at_least_one:
            return [min(numel, max(1, int(float(d) * numel))) if numel else 0 for d in densities]
        return [keep_count(numel, d) for d in densities]


@dataclass(frozen=True)
class Cut:
    """A further cut by magnitude beside the trim, handed to ``merge`` as ``ctx.cuts[name]``
    (e.g. Breadcrumbs' outliers: the top ``beta`` fraction that it drops)."""

    name: str
    top: TopK


@dataclass(frozen=True)
class Reduction:
    """A sum over the scope, computed in a pass after the cuts and before the merge.

    ``per_chunk(tau, ctx)`` returns one chunk's partial sum (a tensor of any fixed shape; the
    context holds the cuts); the engine adds the partial sums in float64 over the scope and
    hands ``finish(total)`` to ``merge`` as ``ctx.reduced[name]``. TIES's majority sign is
    one: the sign of the summed elected signs.
    """

    name: str
    per_chunk: Callable[[torch.Tensor, ChunkContext], torch.Tensor]
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass(frozen=True)
class SideInput:
    """Per-model statistics a data-aware method merges with (Fisher diagonals, Gram matrices).

    kind:      the statistics kind every model's statistics must hold ("fisher" or "gram").
    rows:      True: a statistic has its parameter's shape and the engine reads the chunk's
               rows of it; False: one (in, in) matrix per 2-D parameter, read whole.
    normalize: "none", or "rms": each model's statistics are divided by their root mean
               square over the whole model (a reduction pass over the statistics files).
    """

    kind: str
    rows: bool
    normalize: str = "none"


@dataclass(frozen=True)
class Band:
    """mergekit 0.1.5's ``magnitude_outliers`` band of one whole tensor (Breadcrumbs): of
    ``torch.sort(|tau|)``'s ascending order, positions ``positions(numel)`` = [lo, hi) survive:
    k = int(density n) kept, int(gamma n) outliers dropped (fewer if they would cut into k)."""

    density: float
    gamma: float

    def positions(self, numel: int) -> tuple[int, int]:
        kept = int(self.density * numel)  # mergekit's float products, truncated
        bottom = max(0, numel - kept - int(self.gamma * numel))
        return bottom, bottom + kept


@dataclass(frozen=True)
class TiesKernel:
    """The fused CPU kernel computes ``base + lam * TIES(tau)`` exactly as ``merge`` does
    (same float32 operations, same order): the engine may run it instead of ``merge``.
    ``majority_from``: the reduction whose value fills zero votes (``zero_sign="majority"``).
    ``dare``: (drop rate, seed): DARE's random drop and 1/(1 - drop) rescale in place of the trim
    (methods.dare's counter-based streams)."""

    lam: float
    elect: str
    zero_sign: str
    aggregate: str
    majority_from: str | None = None
    dare: tuple[float, int] | None = None
    band: Band | None = None  # Breadcrumbs' band per whole tensor in place of the trim (exact counts, sort order)


@dataclass(frozen=True)
class LinearKernel:
    """The fused CPU kernel computes ``base + post(sum_t c_t tau_t)`` exactly as ``merge``
    does: ``coefficients`` c (None: 1 each), then ``* scale``, or ``/ n`` with ``mean``
    (the mean over the n models, as ``tau.mean(0)`` computes it)."""

    coefficients: tuple[float, ...] | None = None
    scale: float = 1.0
    mean: bool = False
    divisor: float | None = None  # sum / divisor, then * scale (mergekit's normalize, then lambda)
    band: Band | None = None  # each tau_t masked to Breadcrumbs' band first (whole tensors)
    base_coefficient: float | None = None  # models' own values: (c_0 theta_0 + sum_t c_t theta_t) / divisor,
    # accumulated from 0 in this order (mergekit's linear, whose first model stands as the base)


@dataclass(frozen=True)
class TensorKernel:
    """A whole-tensor method's fused CPU path (SLERP, NuSLERP, Model Stock): per tensor, the
    engine computes float32 reductions of the stored rows (norms, dot products: the same torch
    reductions on the same float32 values as ``merge``), hands them to ``coefficients`` for the
    method's scalars, then one elementwise pass combines the raw rows with them
    (:mod:`tiesmerge.engine.whole`). ``kind`` names the pass: "interp" (SLERP/NuSLERP: two
    inputs ``pair``, 0 the base and 1 + t model t; ``relative``: their task vectors, added back
    to the base) or "stock" (Model Stock). ``coefficients(name, reductions)`` -> the scalars."""

    kind: str
    coefficients: Callable[..., tuple[float, ...]]
    pair: tuple[int, int] = (0, 1)
    relative: bool = False


@dataclass(frozen=True)
class Requirements:
    """Everything a method needs from the engine, with the defaults of a plain elementwise method.

    trim:          a cut by magnitude -> ``ctx.thresholds`` (n,); ``cuts`` more of them.
    scope:         where cuts and reductions run: "global" (each model's whole model, the
                   paper) or "per_tensor" (mergekit, PEFT).
    exact_k:       keep exactly max(1, k) entries per tensor in sort order -> ``ctx.keep``
                   (n,) (mergekit's trim); needs whole tensors and the per-tensor scope.
    reductions:    sums over the scope -> ``ctx.reduced[name]``.
    statistics:    per-model statistics -> ``ctx.statistics``.
    reference:     a model read beside the others -> ``ctx.reference`` = theta_ref - theta_base
                   over the real base (also when adapters merge against a zero base): never
                   trimmed, weighted or merged, recorded under its own name in the manifest.
    whole_tensors: every tensor in one chunk (SVD, SLERP, angles): planned whole, and a tensor
                   too large for the memory budget is an error naming the budget it needs.
    workspace:     (shape, n_models) -> bytes a whole tensor's merge needs beyond the planner's
                   per-entry working set (an SVD's factors and LAPACK's workspace); planned in.
    temporaries:   float32 (n, E) temporaries ``merge`` holds besides tau (None: the planner's
                   default for elementwise methods; 0 for a method whose memory is its workspace).
    base_values:   ``ctx.base`` = the base's values (float32), not only tau.
    model_values:  ``ctx.models`` = the models' own values (n, *S) float32, as read (base + tau
                   rounds, model - base - base does not give the model back), and ``merge``
                   returns the merged model's values, not a task vector: interpolations of
                   models (SLERP, Model Stock) that must equal mergekit's bit for bit.
    weights:       per-model weights -> ``ctx.weights`` (n,).
    kernel:        a fused CPU kernel that computes this merge bit for bit (else torch only).
    n_models:      how many models the method merges, if it takes a fixed number (SLERP: 2).
    """

    trim: TopK | None = None
    cuts: tuple[Cut, ...] = ()
    scope: str = "global"
    exact_k: bool = False
    reductions: tuple[Reduction, ...] = ()
    statistics: SideInput | None = None
    reference: str | None = None
    whole_tensors: bool = False
    workspace: Callable[[tuple[int, ...], int], int] | None = None
    temporaries: int | None = None
    base_values: bool = False
    model_values: bool = False
    weights: tuple[float, ...] | None = None
    kernel: TiesKernel | LinearKernel | TensorKernel | None = None
    n_models: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.scope not in SCOPES:
            problems.append(f"scope={self.scope!r} is not one of {', '.join(SCOPES)}")
        if self.workspace is not None and not self.whole_tensors:
            problems.append("a workspace is planned per whole tensor: it needs whole_tensors=True")
        if self.exact_k and (self.trim is None or self.scope != "per_tensor"):
            problems.append("exact k (threshold_ties='sort', mergekit's trim) needs a trim and scope='per_tensor'")
        names = [c.name for c in self.all_cuts] + [r.name for r in self.reductions]  # the trim is cut "trim"
        if len(set(names)) != len(names):
            problems.append(f"cut and reduction names must differ, got {names}")
        if problems:
            raise ConfigError(problems)

    @property
    def keeps_tensors_whole(self) -> bool:
        """Whether each tensor is planned as one chunk (declared, or implied by exact k)."""
        return self.whole_tensors or self.exact_k

    @property
    def all_cuts(self) -> tuple[Cut, ...]:
        """The trim (named "trim") and the further cuts, in the order they are selected."""
        return ((Cut("trim", self.trim),) if self.trim is not None else ()) + self.cuts


@dataclass(frozen=True)
class ChunkContext:
    """What the engine hands to ``merge`` with one chunk: exactly what the method required.

    name, shape:  the tensor's name and whole shape (a chunk holds rows of it); offset: flat
                  index of the chunk's first entry in the tensor; stream: a stable 32-bit id of
                  the name (with offset it addresses counter-based random numbers).
    thresholds:   (n,) keep |tau| >= thresholds[t] (+inf keeps nothing); cuts: the same per cut.
    reduced:      each reduction's finished value.
    weights:      (n,) per-model weights, or None for all ones.
    keep:         (n,) entries each model keeps (exact k; the chunk is the whole tensor).
    statistics:   (n, ...) float32: the chunk's rows of each model's Fisher diagonal, or each
                  model's whole (in, in) Gram matrix; None where some model has none.
    reference:    (*S) float32 theta_ref - theta_base.
    base:         (*S) float32 base values.
    models:       (n, *S) float32 the models' own values (``model_values``; an adapter's is base + tau).
    ranks:        (n,) an upper bound on each model's task-vector rank for this tensor where its input's
                  structure gives one (a LoRA adapter's r; 0 where it leaves the tensor alone), else None
                  (also None for every model when the method does not take whole tensors).
    """

    name: str = ""
    shape: tuple[int, ...] = ()
    offset: int = 0
    stream: int = 0
    thresholds: torch.Tensor | None = None
    cuts: Mapping[str, torch.Tensor] = field(default_factory=dict)
    reduced: Mapping[str, torch.Tensor] = field(default_factory=dict)
    weights: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    statistics: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    base: torch.Tensor | None = None
    models: torch.Tensor | None = None
    ranks: tuple[int | None, ...] | None = None


@runtime_checkable
class MergeMethod(Protocol):
    """A method config: ``name``, ``paper``, ``summary``, ``requirements()`` and ``merge``."""

    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]

    def requirements(self) -> Requirements: ...

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------- options and checks

Check = Callable[[Any], "str | None"]  # a value -> what is wrong with it, or None
OPTION_TYPES = (float, int, str, bool, ModelPath, tuple)  # what a field's annotation may be (None allowed)


def option(default: Any, help: str, *, unit: str = "", choices: tuple[str, ...] = (), check: Check | None = None,
           per_model: bool = False, check_all: Check | None = None, grid: tuple[Any, ...] = (),
           sums_with: str = "", normalised: bool = False) -> Any:
    """A method field: its default, help text, unit and choices (read by the CLI, ``tiesmerge
    methods`` and the recipe), the ``check`` its value must pass, ``per_model``: a tuple of
    floats with one value per model (each passing ``check``, the whole passing ``check_all``),
    or None; ``grid``: the values the method's paper searched on validation data (the
    default axis of ``tiesmerge tune``); ``sums_with``: the per-model option whose sum this value
    joins where it is normalised (average's base_weight with its weights: a search's range is
    checked against their total); ``normalised``: per-model values divided by their sum (a search's range must not
    cross 0; the method checks the sum, where another option may join it)."""
    return field(default=default, metadata={"help": help, "unit": unit, "choices": choices, "check": check,
                                            "per_model": per_model, "check_all": check_all, "grid": tuple(grid),
                                            "sums_with": sums_with, "normalised": normalised})


def paper_grid(cls: type) -> dict[str, tuple[Any, ...]]:
    """The validation grid the method declares on its options (empty if none)."""
    return {f.name: f.metadata["grid"] for f in dataclasses.fields(cls) if f.metadata.get("grid")}


@functools.cache
def option_types(cls: type) -> dict[str, Any]:
    """Each option's type from its annotation, one of :data:`OPTION_TYPES` (``X | None`` gives
    X; ``tuple[float, ...]`` gives tuple): what the CLI flag parses and the tuner sweeps."""
    hints = typing.get_type_hints(cls)
    types: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in (
            typing.Union, types_module.UnionType) else [hint]
        kind = typing.get_origin(args[0]) or args[0] if len(args) == 1 else None
        if kind not in OPTION_TYPES:
            raise TypeError(f"{cls.__name__}.{f.name}: options are float, int, str, bool, ModelPath or "
                            f"tuple[float, ...] (optionally | None), not {hint}")
        types[f.name] = kind
    return types


FLOAT32_MAX = 3.4028234663852886e38  # every merge computes in float32: a larger option value is Inf there


def _real(value: Any) -> bool:
    """A finite int or float. An int is never converted: 10**400 is finite, and math.isfinite(10**400) would
    raise OverflowError (an int past the float range)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (isinstance(value, int) or math.isfinite(value))


def _number(value: Any) -> bool:
    return _real(value) and abs(value) <= FLOAT32_MAX  # an int compares with a float exactly, any size


FLOAT32_TINY = 1.1754943508222875e-38  # float32's smallest normal number: below it a product underflows to 0


def _finite_other_number(value: Any) -> bool:
    """A finite number of another type than int/float (Decimal, Fraction, numpy's are read as numbers before)."""
    if not isinstance(value, numbers.Number) or isinstance(value, (bool, complex)):
        return False
    try:
        return math.isfinite(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return False


def finite(value: Any) -> str | None:
    if _number(value) and not 0 < abs(value) < FLOAT32_TINY:
        return None
    if _number(value):  # 1e-45 times a task vector entry is 0 in float32: the merge would be the base, silently
        return "must be 0 or at least 1.2e-38 in magnitude (float32's smallest normal number; merges compute in it)"
    if _real(value):
        return "must be at most 3.4e38 in magnitude (merges compute in float32)"
    if _finite_other_number(value):
        # Decimal("0.3"), Fraction(1, 3): finite, but not the float or int an option holds (a frozen config's value
        # is compared and written as it is)
        return f"must be an int or a float, not a {type(value).__name__} (give float(value))"
    return "must be a finite number"


def positive(value: Any) -> str | None:
    return None if _number(value) and value > 0 else "must be a positive, finite number"


def fraction(value: Any) -> str | None:
    """(0, 1]: a density, the fraction kept."""
    if _number(value) and 0 < value <= 1:
        return None
    percent = _number(value) and value > 1
    return "must be a fraction in (0, 1]" + (" (it is a fraction, not a percent)" if percent else "")


def probability(value: Any) -> str | None:
    """[0, 1): e.g. a drop rate (1 would drop everything)."""
    return None if _number(value) and 0 <= value < 1 else "must be a fraction in [0, 1)"


def unit_interval(value: Any) -> str | None:
    return None if _number(value) and 0 <= value <= 1 else "must be a number in [0, 1]"


def non_negative_int(value: Any) -> str | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "must be a non-negative integer"


def seed_value(value: Any) -> str | None:
    """A random generator's seed: the counter-based generator takes 64 bits, and a larger seed would
    silently wrap onto a smaller one (2**64 drew the same masks as 0)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 63
    return None if ok else "must be an integer in [0, 2**63)"


NORMALISED_WEIGHT_LIMIT = 1000.0  # |w_i / sum w| past this: weights of both signs that nearly cancel


def nonzero_sum(values: tuple) -> str | None:
    """Per-model weights that are normalised by their sum: not summing to 0, nor so near it that a normalised weight
    passes :data:`NORMALISED_WEIGHT_LIMIT` (1, -0.999999 would scale the models by ±1e6: an extrapolation far beyond
    all of them, not a mean)."""
    total = sum(values)
    if total == 0:
        return "must not sum to 0"
    largest = max(abs(v) for v in values) / abs(total)
    if largest > NORMALISED_WEIGHT_LIMIT:
        return (f"sum to {total:g}, so near 0 that normalised by their sum they reach ±{largest:.3g} (at most "
                f"{NORMALISED_WEIGHT_LIMIT:g}): an extrapolation far beyond the models, not a weighted mean; give "
                "weights whose sum is not nearly cancelled")
    return None


_TYPE_CHECKS: dict[Any, Check] = {
    float: finite,
    int: lambda v: None if isinstance(v, int) and not isinstance(v, bool) else "must be an integer",
    bool: lambda v: None if isinstance(v, bool) else "must be true or false",
    str: lambda v: None if isinstance(v, str) else "must be a string",
    ModelPath: lambda v: None if isinstance(v, str) and v else "must be the path of a model directory",
}


MAX_AXIS_POINTS = 100_000  # each point is a whole merge (and an evaluation): far beyond any real sweep


def steps(start: float, stop: float, step: float) -> tuple[float, ...]:
    """An inclusive grid, rounded so that 0.8 + 0.1 * k prints as it should (a tuning axis).

    >>> steps(0.8, 1.0, 0.1)
    (0.8, 0.9, 1.0)
    """
    bounds = f"start:stop:step {start:g}:{stop:g}:{step:g}"
    if not all(math.isfinite(v) for v in (start, stop, step)) or step == 0:
        raise ConfigError(f"{bounds}: the step must be a non-zero number and every bound finite")
    if (stop - start) / step < 0:
        raise ConfigError(f"{bounds}: the step leads away from stop (the grid would be empty); "
                          "a falling grid takes a negative step")
    count = (stop - start) / step + 1  # counted before anything is built: 0:1e9:1e-9 would be 1e18 points
    # the points up to stop, float noise forgiven (0.8:3.0:0.1 is 22.999... steps), never one past it (round() made
    # 0.99999951:0.99999999:1e-7, 5.8 points, six, the last above stop: hp57 c25)
    points = math.floor(count + 1e-6) if count < 1e15 else None  # the grid's length; None: far too many
    if points is None or points > MAX_AXIS_POINTS:  # inf (0:1e308:1e-308) too
        # exact below 1e15 (100,001 must not read "1e+05", as if it were the limit)
        shown = f"{points:,}" if points is not None else f"about {count:.3g}" if math.isfinite(count) else "inf"
        raise ConfigError(f"{bounds}: {shown} points, more than the {MAX_AXIS_POINTS:,} a grid axis may hold",
                          hint="use a larger step")
    # 12 significant digits: 0.8 + 0.1 * 2 prints 1.0, and a step of 1e-7 on 1.0000001 keeps every point inside
    # [start, stop], apart (6 decimals made 1.0000001:1.0000005:1e-7 two points, one below start: hp57 c25); a point
    # float noise puts beside 0 (-0.3 + 3 * 0.1 = 5.6e-17) is 0
    values = tuple(0.0 if abs(v) < abs(step) * 1e-9 else float(f"{v:.12g}")
                   for v in (start + i * step for i in range(points)))
    if len(set(values)) != len(values):
        raise ConfigError(f"{bounds}: a step this fine repeats points at 12 significant digits",
                          hint="use a coarser step, or list the values (NAME=v1,v2,...)")
    return values


def round_value(value: float) -> float:
    """A drawn candidate rounded for readable logs and stable resume keys: to 6 decimals, and to 4 significant digits
    below 1e-3, where 6 decimals made every value of 1e-7:5e-7 0.0, the base itself, outside the range asked for
    (hp56 c40, c41).

    >>> round_value(0.8 + 0.1 * 2), round_value(3 * 1e-7)
    (1.0, 3e-07)
    """
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, max(6, 3 - math.floor(math.log10(abs(value)))))


def method_config(cls: type) -> type:
    """Make ``cls`` a method config: a frozen dataclass whose options are normalised (lists to
    tuples, path-like objects to str) and checked when it is built, every problem at once, and
    whose ``requirements()`` is checked too (a contradictory declaration fails here, not in
    the middle of a merge)."""

    def __post_init__(self: Any) -> None:
        check_options(self)

    cls.__post_init__ = __post_init__  # type: ignore[attr-defined]
    return dataclass(frozen=True)(cls)


# The range an option's unit declares, enforced wherever an option is set (a method built from the
# CLI, a recipe, a tune grid or a search space): "(0, 1]", "[0, 1)", ">= 0", or a bare "fraction" or
# "probability", which mean [0, 1]. So a unit the help shows is a promise, not a comment.
_INTERVAL = re.compile(r"([\[(])\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*([\])])")
_AT_LEAST = re.compile(r">=\s*(-?[\d.]+)")
_UNIT_INTERVALS = ("fraction", "probability")  # a bare unit of these words: [0, 1]
MODEL_COUNT_UNITS = ("tasks", "models")  # an integer option counting models: at most the number merged


def unit_range(unit: str) -> tuple[str, float, float, str] | None:
    """The interval a unit declares, as (opening bracket, low, high, closing bracket), or None."""
    m = _INTERVAL.search(unit)
    if m:
        return m.group(1), float(m.group(2)), float(m.group(3)), m.group(4)
    m = _AT_LEAST.search(unit)
    if m:
        return "[", float(m.group(1)), math.inf, ")"
    if unit.split(",")[0].strip() in _UNIT_INTERVALS:
        return "[", 0.0, 1.0, "]"
    return None


def _out_of_range(unit: str, value: Any) -> str | None:
    bounds = unit_range(unit)
    if bounds is None or not _real(value):
        return None
    opening, low, high, closing = bounds
    inside = (low <= value if opening == "[" else low < value) and (value <= high if closing == "]" else value < high)
    if inside:
        return None
    shown = f">= {low:g}" if high == math.inf else f"in {opening}{low:g}, {high:g}{closing}"
    return f"must be {shown} ({unit})"


def _shown(value: Any) -> str:
    """A value as an error shows it: a 400-digit number or a huge list cut short."""
    if type(value).__name__ == "Fraction" and len(repr(value)) > 80:  # Fraction(1, 10**400) by its size
        import decimal

        with decimal.localcontext() as context:
            context.prec, context.Emin, context.Emax = 4, -decimal.MAX_EMAX, decimal.MAX_EMAX
            return f"a Fraction of about {decimal.Decimal(value.numerator) / decimal.Decimal(value.denominator):.3g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10 ** 40:
        digits = len(str(abs(value))) if abs(value) < 10 ** 4000 else "thousands of"
        text = f"{float(value):.3g}" if abs(value) <= 1.7e308 else f"an integer of {digits} digits"
    else:
        import reprlib

        shower = reprlib.Repr()  # depth- and length-bounded: a value nested 990 deep recursed in repr (hp55 c17)
        shower.maxlevel, shower.maxlist, shower.maxdict, shower.maxstring, shower.maxother = 6, 8, 8, 80, 80
        text = shower.repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _problem(f: dataclasses.Field, kind: Any, value: Any) -> str | None:
    """What is wrong with one option's (normalised) value, or None."""
    meta = f.metadata
    unit = meta.get("unit", "")
    if meta.get("per_model"):
        if not isinstance(value, tuple) or not value:
            return f"must be a list with one value per model, got {_shown(value)}"
        for v in value:
            why = _out_of_range(unit, v) if _real(v) and not _number(v) else None
            why = why or (meta["check"](v) if meta.get("check") else finite(v)) or _out_of_range(unit, v)
            if why:
                return f"{why}, got {_shown(v)} in {_shown(list(value))}"
        if all(_real(v) for v in value) and math.fsum(abs(float(v)) for v in value) > FLOAT32_MAX:
            # each within range, their sum not: a merge adds them in float32 (the weights of the models that agree
            # on a sign, a normalisation's sum), and Inf there made entries keep the base silently (hp42 C70)
            return (f"must sum to at most 3.4e38 in magnitude (merges add them in float32), got {_shown(list(value))}"
                    f" (magnitudes summing to {math.fsum(abs(float(v)) for v in value):.3g})")
        why = meta["check_all"](value) if meta.get("check_all") else None
        return f"{why}, got {_shown(list(value))}" if why else None
    if meta.get("choices"):
        ok = isinstance(value, str) and value in meta["choices"]
        return None if ok else f"={_shown(value)} is not one of {', '.join(meta['choices'])}"
    # a declared range first where the value is a number at all: t = 1e308 is "a fraction in [0, 1]", not "past
    # float32's range"
    why = _out_of_range(unit, value) if _real(value) and not _number(value) else None
    why = why or (meta["check"](value) if meta.get("check") else _TYPE_CHECKS[kind](value))  # includes the type's
    why = why or _out_of_range(unit, value)
    return f"{why}, got {_shown(value)}" if why else None


def warn_unused(method: Any) -> None:
    """A method's ``unused_options()`` (options its configuration ignores whatever the model: TIES's density beside
    densities) given a value other than their default: said, since the merge is not what that value asks for."""
    for notice in getattr(method, "notices", lambda: [])():  # a setting that makes the method another one
        warnings.warn(MergeWarning(f"{method.name}: {notice}"), stacklevel=3)
    if not hasattr(method, "unused_options"):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(method)}
    for name, why in method.unused_options().items():
        value = getattr(method, name)
        if value is not None and value != defaults.get(name):
            warnings.warn(MergeWarning(f"{method.name}: {name} = {value!r} is not used: {why}; drop it, or put the "
                                       "value where it is read"), stacklevel=3)


def said_of(name: str, why: str) -> str:
    """An option's problem after its name: "scope='bogus' is not one of ..." (a choice's problem starts with '=');
    "density must be ..." otherwise (hp87b c24: "scope ='bogus'")."""
    return f"{name}{'' if why.startswith('=') else ' '}{why}"


def option_problem(cls: type, name: str, value: Any) -> str | None:
    """What is wrong with ``value`` for option ``name`` of method class ``cls`` (its type, check and
    declared range), or None: for values set outside a method object (a tune grid, a search range)."""
    f = next((f for f in dataclasses.fields(cls) if f.name == name), None)
    if f is None:
        return f"{cls.name} has no option {name!r}"
    value = plain_value(value)
    if value is None and f.default is None:
        return None
    return _problem(f, option_types(cls)[name], value)


def _array_like(value: Any) -> bool:
    return type(value).__module__.split(".")[0] in ("numpy", "torch") and hasattr(value, "shape")


def plain_value(value: Any) -> Any:
    """An option value as Python holds it: a list, a 1-D numpy array or tensor as a tuple, and numpy scalars and 0-d
    tensors (np.float32(0.5), torch.tensor(0.5)), alone or as elements, as the Python numbers they hold (a grid built
    with numpy is common); anything else as it is, for the checks to judge."""
    try:
        if _array_like(value) and tuple(value.shape) == () and hasattr(value, "item"):
            return value.item()
        if _array_like(value) and len(value.shape) == 1 and hasattr(value, "tolist"):
            return tuple(value.tolist())
    except (RuntimeError, TypeError, ValueError):  # a tensor on the meta device holds no number: judged as it is
        return value
    if isinstance(value, (list, tuple)):
        return tuple(plain_value(v) if _array_like(v) or _exact(v) else v for v in value)
    if _exact(value):  # Fraction(1, 3), Decimal("0.3"): the number they are (hp64a c53: "must be a fraction in (0, 1],
        try:  # got Fraction(1, 3)")
            return float(value)
        except (ValueError, OverflowError):  # Decimal("sNaN"): judged as it is
            return value
    return value


def _exact_floats(given: Any, value: Any) -> Iterator[tuple[str, Any, float]]:
    """(``""`` or ``"[i]"``, the exact number given, the float it became) for each Fraction or Decimal of an option,
    alone or in a list, that :func:`plain_value` made a float."""
    many = isinstance(given, (list, tuple)) and isinstance(value, tuple)
    for i, (exact, number) in enumerate(zip(given, value) if many else [(given, value)]):
        if _exact(exact) and isinstance(number, float):
            yield (f"[{i}]" if many else ""), exact, number


def _underflowed(given: Any, value: Any) -> str | None:
    """`` = <the exact number>`` (``[i] = ...`` of a list) where an exact number that is not 0 became the float 0."""
    for where, exact, number in _exact_floats(given, value):
        if number == 0.0:
            try:
                nonzero = exact != 0
            except (ArithmeticError, TypeError):  # Decimal("sNaN")
                continue
            if nonzero:
                return f"{where} = {_shown(exact)}"
    return None


_COUNTED = ("densities", "rank_fraction")  # fractions that a count of entries or singular triplets is floored from


def _warn_rounded(method_name: str, name: str, given: Any, value: Any) -> None:
    """Say when an exact number (Fraction(1, 3)) became a float that is not the number written: every count is taken
    of the float as written (⌊0.3333333333333333 · 3⌋ = 0, not 1), and the recipe records the float (hp70a c13)."""
    for where, exact, number in _exact_floats(given, value):
        if not math.isfinite(number):
            continue
        try:
            if fractions.Fraction(exact) == fractions.Fraction(repr(number)):
                continue  # Decimal("0.3") is the float 0.3 as written
        except (ValueError, OverflowError, TypeError):
            continue
        warnings.warn(MergeWarning(
            f"{method_name}: {name}{where} = {_shown(exact)} is used as the float {number!r}, which "
            f"is not the same number; counts are taken of that float as it is written (⌊{number!r} · n⌋ of n) and the "
            "recipe records it, so a count can be one less than of the exact number: give the float you mean"),
            stacklevel=4)


def _exact(value: Any) -> bool:
    """A fractions.Fraction or decimal.Decimal (exact numbers that are no float)."""
    return type(value).__name__ in ("Fraction", "Decimal") and type(value).__module__ in ("fractions", "decimal",
                                                                                          "_pydecimal")


def check_options(method: Any) -> None:
    """Normalise and check every option of ``method`` (see :func:`option`); raise one ConfigError."""
    problems: list[str] = []
    kinds = option_types(type(method))
    for f in dataclasses.fields(method):
        given = getattr(method, f.name)
        value = plain_value(given)
        underflowed = _underflowed(given, value)
        if underflowed is not None:  # Fraction(1, 10**400): a float 0 where the number is not (hp73a c57: a weight
            # dropped silently, where the command line and recipes refuse 1e-400)
            problems.append(f"{method.name}: {f.name}{underflowed} is too small for a float: it reads as 0 (the "
                            "smallest is 5e-324); give 0 if 0 is meant")
            continue
        if f.name in _COUNTED or str(f.metadata.get("unit", "")).startswith(("fraction kept", "fraction dropped")):
            _warn_rounded(method.name, f.name, given, value)
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        object.__setattr__(method, f.name, value)
        if value is None and f.default is None:
            continue
        why = _problem(f, kinds[f.name], value)
        if why:
            problems.append(f"{method.name}: {said_of(f.name, why)}")
    if not problems:
        try:
            method.requirements()
        except ConfigError as exc:
            # a requirement's own message may name its method already (hp69a c40: "average: average: ...")
            problems += [p if p.startswith(f"{method.name}: ") else f"{method.name}: {p}" for p in exc.problems]
            if exc.hint:
                raise ConfigError(problems, hint=exc.hint) from None
    if problems:
        raise ConfigError(problems)


def check_models(method: Any, n_models: int) -> list[str]:
    """Problems of ``method`` with ``n_models`` models: per-model options of another length, or
    another number of models than the method takes."""
    problems = []
    wanted = method.requirements().n_models
    if wanted is not None and wanted != n_models:
        # the option that takes this many, where the method has one (hp76a c51: slerp of one model did not name
        # --anchor base, which interpolates the base and that model)
        other = method.other_count(n_models) if hasattr(method, "other_count") else None
        problems.append(f"{method.name} merges exactly {wanted} model{'s' if wanted != 1 else ''}, got {n_models}"
                        + (f"; {other}" if other else ""))
    for f in dataclasses.fields(method):
        value = getattr(method, f.name)
        if f.metadata.get("per_model") and isinstance(value, tuple) and len(value) != n_models:
            problems.append(f"{method.name}: {len(value)} {f.name} given for {n_models} models")
        if f.metadata.get("unit") in MODEL_COUNT_UNITS and _number(value) and value > n_models:
            problems.append(f"{method.name}: {f.name}={value} counts {f.metadata['unit']}, but only {n_models} "
                            f"model{'s are' if n_models != 1 else ' is'} merged (at most {n_models})")
    return problems
