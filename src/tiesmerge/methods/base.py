"""What a merge method is, as the engine sees it.

A method is a frozen dataclass (its fields are at once the config schema, the CLI flags,
the recipe keys and the tuning space) with a ``merge`` that maps one chunk of stacked task
vectors to one chunk of the merged task vector. Methods never read files: the engine feeds
them, and computes the global quantities they ask for (trim thresholds, majority sign) in
reduction passes over the same stream before the merge pass.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch

__all__ = ["ChunkContext", "TrimSpec", "SideInput", "MergeMethod", "DataAwareMethod", "option", "check_choice",
           "check_weights", "check_densities"]


@dataclass(frozen=True)
class TrimSpec:
    """A method trims each task vector to its top ``density`` fraction by magnitude."""

    density: float
    scope: str  # "global": one threshold per model over its whole model; "per_tensor"
    densities: tuple[float, ...] | None = None  # per model, overriding density (mergekit's per-model density)
    at_least_one: bool = False  # mergekit's exact-k rule keeps max(1, k) entries of a non-empty tensor

    def keep_counts(self, numel: int, n_models: int) -> list[int]:
        """Entries each model keeps of a trim scope of ``numel`` entries."""
        from .ops import keep_count  # ops imports nothing of ours; imported here to keep base.py first

        # models past the per-model densities (a TIES sign_from reference, streamed last and never
        # trimmed) take the common density: every streamed input gets a count
        densities = (tuple(self.densities or ()) + (self.density,) * n_models)[:n_models]
        counts = [keep_count(numel, d) for d in densities]
        return [max(1, k) if self.at_least_one and numel else k for k in counts]


@dataclass(frozen=True)
class SideInput:
    """Per-model statistics a data-aware method merges with (Fisher diagonals, Gram matrices).

    kind:      the statistics kind every model's statistics must hold ("fisher" or "gram").
    rows:      True: a statistic has its parameter's shape and the engine reads the chunk's
               rows of it; False: one (in, in) matrix per 2-D parameter, read whole.
    normalize: "none", or "rms": the engine divides each model's statistics by their root
               mean square over the whole model (a reduction pass over the statistics files).
    """

    kind: str
    rows: bool
    normalize: str = "none"


@dataclass(frozen=True)
class ChunkContext:
    """What the engine knows about the chunk it hands to ``merge``.

    thresholds: (n,) magnitude at or above which model t's entries are kept, or None.
    majority:   sign (+1/-1/0) of the summed elected signs over the trim scope, or None.
    weights:    (n,) per-model weights, or None for all ones.
    keep:       (n,) how many entries each model keeps, given when the chunk is its whole trim
                scope (per-tensor trimming of a tensor held in one chunk), else None.
    stream:     a stable integer for (tensor name); with ``offset`` (flat index of the chunk's
                first entry in its tensor) it addresses the counter-based random numbers.
    side:       data-aware methods only: one float32 statistic per model, stacked (n, ...) —
                the chunk's rows of a Fisher diagonal, or a whole (in, in) Gram matrix — or
                None when some model has no statistic for this tensor (the method averages).
    """

    thresholds: torch.Tensor | None = None
    majority: float | None = None
    weights: torch.Tensor | None = None
    stream: int = 0
    offset: int = 0
    keep: torch.Tensor | None = None  # (n,) entries kept per model when the chunk is a whole trim scope
    side: torch.Tensor | None = None


@runtime_checkable
class MergeMethod(Protocol):
    name: ClassVar[str]
    paper: ClassVar[str]
    summary: ClassVar[str]

    def trim_spec(self) -> TrimSpec | None: ...

    def needs_majority_sign(self) -> bool: ...

    def elected_sign_sum(self, tau: torch.Tensor, ctx: ChunkContext) -> float: ...

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor: ...

    def check(self, n_models: int) -> list[str]: ...


@runtime_checkable
class DataAwareMethod(MergeMethod, Protocol):
    """A method that also merges with per-model statistics computed from data (tiesmerge.stats)."""

    def side_input(self) -> SideInput: ...


def option(default: Any, help: str, *, unit: str = "", choices: tuple[str, ...] = ()) -> Any:
    """A method field with its help text, unit and choices, read by the CLI and `tiesmerge methods`."""
    return field(default=default, metadata={"help": help, "unit": unit, "choices": choices})


def check_choice(problems: list[str], method: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append(f"{method}: {name}={value!r} is not one of {', '.join(choices)}")


def check_finite(problems: list[str], method: str, name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        problems.append(f"{method}: {name} must be a finite number, got {value!r}")


def check_fraction(problems: list[str], method: str, name: str, value: object, *, closed_low: bool = False,
                   closed_high: bool = True) -> None:
    """value in (0, 1] by default."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value >= 0 if closed_low else value > 0) and (value <= 1 if closed_high else value < 1)
    if not ok:
        lo, hi = "[" if closed_low else "(", "]" if closed_high else ")"
        problems.append(f"{method}: {name} must be a fraction in {lo}0, 1{hi}, got {value!r}"
                        + (" (it is a fraction, not a percent)" if isinstance(value, (int, float)) and value > 1 else ""))


def check_weights(problems: list[str], method: str, weights: object, n_models: int | None) -> None:
    if weights is None:
        return
    if not isinstance(weights, tuple) or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights
    ):
        problems.append(f"{method}: weights must be a list of finite numbers, got {weights!r}")
        return
    if n_models is not None and len(weights) != n_models:
        problems.append(f"{method}: {len(weights)} weights given for {n_models} models")


def check_densities(problems: list[str], method: str, densities: object, n_models: int | None) -> None:
    """Per-model densities: one fraction in (0, 1] per model, or None."""
    if densities is None:
        return
    if not isinstance(densities, tuple):
        problems.append(f"{method}: densities must be a list of fractions, got {densities!r}")
        return
    for d in densities:
        check_fraction(problems, method, "densities", d)
    if n_models is not None and len(densities) != n_models:
        problems.append(f"{method}: {len(densities)} densities given for {n_models} models")


def as_tuple(value: Any) -> Any:
    """Lists from YAML or the CLI become tuples, so configs stay hashable and frozen."""
    return tuple(value) if isinstance(value, list) else value


def fields_of(method_cls: type) -> list[dataclasses.Field]:
    return list(dataclasses.fields(method_cls))
