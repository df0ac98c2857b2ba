"""Validation-set search over a method's (density, lam) grid; see :mod:`tiesmerge.tuning.search`."""

from .search import GridPoint, TuningResult, lam_grid, paper_grid, tune

__all__ = ["GridPoint", "TuningResult", "lam_grid", "paper_grid", "tune"]
