"""How candidates are proposed: the grid, random search, and CMA-ES, all ask/tell.

A strategy hands out batches of candidates (``ask``) and is told their scores in the same order
(``tell``). The driver scores a whole batch before it asks again, so a batch never depends on
how many workers scored it or in what order they finished: the same seed proposes the same
candidates on one process and on a cluster, and a resumed search re-proposes the candidates of
the interrupted one (their scores then come from the log).

CMA-ES runs in the unit cube of the space (every axis scaled to [0, 1]), from the method's
defaults (clipped into their ranges), with the ``cma`` package: a small, pure-Python, well-kept
implementation of Hansen's CMA-ES with box bounds. Ray Tune could drive it too, but it would
own the loop (trials, checkpoints, its own log) that the merge-specific parts here (merges shared
between candidates, the in-process run without Ray, the resumable JSONL log) need to own.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError
from ..methods.base import MAX_AXIS_POINTS, _shown
from .space import SearchSpace

__all__ = ["Strategy", "GridStrategy", "RandomStrategy", "CmaesStrategy", "STRATEGIES", "make_strategy"]

STRATEGIES = ("grid", "random", "cmaes")


class Strategy(Protocol):
    """ask() -> the next batch of candidates' options ([] when done); tell(batch, scores)."""

    def ask(self) -> list[dict[str, Any]]: ...

    def tell(self, batch: Sequence[dict[str, Any]], scores: Sequence[float]) -> None: ...


@dataclass
class GridStrategy:
    """Every combination of the axes' values, in one batch (the budget, if given, takes the first)."""

    space: SearchSpace
    budget: int | None = None
    _done: bool = False

    def ask(self) -> list[dict[str, Any]]:
        if self._done:
            return []
        self._done = True
        return self.space.grid()[:self.budget]

    def tell(self, batch: Sequence[dict[str, Any]], scores: Sequence[float]) -> None:
        pass


@dataclass
class RandomStrategy:
    """``budget`` points drawn uniformly from the unit cube with a seeded generator, in batches."""

    space: SearchSpace
    budget: int
    seed: int = 0
    batch: int | None = None  # default: the whole budget at once (as wide as a cluster can run)
    _given: int = 0

    def __post_init__(self) -> None:
        self._points = np.random.default_rng(self.seed).random((self.budget, self.space.dimension))

    def ask(self) -> list[dict[str, Any]]:
        n = min(self.batch or self.budget, self.budget - self._given)
        out = [self.space.from_unit(u) for u in self._points[self._given:self._given + n]]
        self._given += n
        return out

    def tell(self, batch: Sequence[dict[str, Any]], scores: Sequence[float]) -> None:
        pass


def default_popsize(dimension: int) -> int:
    """cma's own generation size for ``dimension`` axes: 4 + ⌊3 ln d⌋ (6 for 2 axes)."""
    return 4 + int(3 * math.log(dimension)) if dimension >= 1 else 4


@dataclass
class CmaesStrategy:
    """CMA-ES (``cma``) maximising the score in the unit cube; one generation per batch.

    ``popsize`` defaults to cma's 4 + 3 ln(d); ``sigma`` is the initial step in unit-cube
    coordinates. The last generation is cut at the budget (and not told: a partial generation
    would bias the update).
    """

    space: SearchSpace
    budget: int
    seed: int = 0
    popsize: int | None = None
    sigma: float = 0.3
    start: dict[str, Any] | None = None  # options to start from (default: the method's defaults)
    _given: int = 0
    _es: Any = dataclasses.field(default=None, repr=False)
    _xs: list = dataclasses.field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        import sys

        if "matplotlib" not in sys.modules:  # cma imports matplotlib, which writes a font cache under ~ by default
            from ..scratch import private_folder_for

            private_folder_for("MPLCONFIGDIR", "tiesmerge-matplotlib-")
        try:
            import cma
        except ImportError:
            raise ConfigError("the CMA-ES strategy needs the cma package",
                              hint="pip install 'tiesmerge[distributed]' (or pip install cma)") from None
        if self.space.dimension < 2:
            raise ConfigError(f"CMA-ES needs 2 or more dimensions; this space has {self.space.dimension}",
                              hint="search more axes, or use the random or grid strategy")
        x0 = self.space.to_unit(self.start) if self.start else [0.5] * self.space.dimension
        options = {"bounds": [0.0, 1.0], "seed": self.seed + 1,  # cma's seed 0 means "random"
                   "verbose": -9, "verb_log": 0, "verb_disp": 0}
        if self.popsize:
            options["popsize"] = self.popsize
        self._es = cma.CMAEvolutionStrategy(x0, self.sigma, options)

    def ask(self) -> list[dict[str, Any]]:
        left = self.budget - self._given
        if left <= 0:
            return []
        self._xs = self._es.ask()
        out = [self.space.from_unit(x) for x in self._xs[:left]]
        self._given += len(out)
        return out

    def tell(self, batch: Sequence[dict[str, Any]], scores: Sequence[float]) -> None:
        if len(batch) < len(self._xs):
            return  # the budget cut this generation
        finite = [s for s in scores if math.isfinite(s)]
        worst = min(finite) if finite else 0.0
        # cma minimises; a failed (non-finite) score counts as a little worse than the worst one
        self._es.tell(self._xs, [-(s if math.isfinite(s) else worst - 1.0) for s in scores])


def make_strategy(name: str, space: SearchSpace, *, budget: int | None, seed: int = 0,
                  popsize: int | None = None, start: dict[str, Any] | None = None) -> Strategy:
    if budget is not None and (not isinstance(budget, int) or isinstance(budget, bool) or budget < 1):
        # hp36 C38: a grid's budget of -1 was a Python slice, the grid less its last point, without a word
        raise ConfigError(f"--budget {budget!r}: the number of candidates to score is a whole number of at least 1",
                          hint="leave --budget out (budget=None from Python) for the whole grid" if name == "grid"
                          else f"give the {name} strategy a budget of 1 or more candidates (e.g. --budget 40 on the "
                               "command line, budget=40 from Python)")  # (hp86b c25n: only the flag was named)
    if name == "grid":
        return GridStrategy(space, budget)
    if budget is None or budget < 1:
        raise ConfigError(f"the {name} strategy needs a budget: the number of candidates to score",
                          hint="pass --budget N (budget=N)")
    if budget > MAX_AXIS_POINTS:  # each candidate is a merge and an evaluation; the proposals are made up front
        raise ConfigError(f"--budget {budget:,} is more candidates than any search could score (at most "
                          f"{MAX_AXIS_POINTS:,}: each is a whole merge and an evaluation)",
                          hint="a few hundred candidates are plenty for the few options a method has")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32 - 1:
        raise ConfigError(f"seed {_shown(seed)}: a seed is a whole number from 0 to {2**32 - 2:,}",  # an API call's
                          hint="pass --seed N on the command line (seed=N from Python) in that range")  # too (hp62b)
    if popsize is not None and (not isinstance(popsize, int) or isinstance(popsize, bool)):  # 2.0, True: in range,
        raise ConfigError(f"--popsize {_shown(popsize)}: a CMA-ES generation's size is a whole number (an int), "  # but
                          f"not a {type(popsize).__name__}",  # no count (hp82b c24: said as out of range)
                          hint="pass --popsize N on the command line (popsize=N from Python), or leave it out")
    if popsize is not None and not 2 <= popsize <= budget:
        raise ConfigError(f"--popsize {popsize!r}: a CMA-ES generation holds 2 to --budget ({budget:,}) candidates "
                          "(each is a merge and an evaluation; cma's default is 4 + 3 ln d)",
                          hint="pass --popsize N on the command line (popsize=N from Python) in that range, or "
                               "leave it out")
    if name == "random":
        return RandomStrategy(space, budget, seed)
    if name == "cmaes":
        return CmaesStrategy(space, budget, seed, popsize, start=start)
    raise ConfigError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")
