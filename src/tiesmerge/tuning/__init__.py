"""Validation-set search over a method's (density, lam) grid; see :mod:`tiesmerge.tuning.search`."""

from .search import GridPoint, TuningResult, paper_grid, parse_grid, steps, tune

__all__ = ["GridPoint", "TuningResult", "paper_grid", "parse_grid", "steps", "tune"]
