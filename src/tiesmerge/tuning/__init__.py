"""Validation-set search over a method's options.

:func:`tune` walks the paper's (density, lam) grid in one process (:mod:`.search`); :func:`run_search`
searches any numeric and per-model options (per-model weights and densities, lam) with the grid,
random search or CMA-ES, in this process or on Ray (:class:`RayExecutor`), with a resumable JSONL log
(:mod:`.driver`), and :func:`write_report` writes its Markdown table and HTML report.
"""

from .driver import SearchResult, Trial, run_search
from .executors import LocalExecutor, RayExecutor, ray_available
from .report import write_report
from .search import GridPoint, TuningResult, paper_grid, parse_grid, steps, tune
from .space import Axis, SearchSpace, build_space, parse_ranges
from .strategies import STRATEGIES

__all__ = ["GridPoint", "TuningResult", "paper_grid", "parse_grid", "steps", "tune", "run_search", "SearchResult",
           "Trial", "LocalExecutor", "RayExecutor", "ray_available", "write_report", "Axis", "SearchSpace",
           "build_space", "parse_ranges", "STRATEGIES"]
