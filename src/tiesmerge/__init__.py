"""tiesmerge: merge models fine-tuned from one base with TIES-Merging, streamed tensor by tensor.

The verbs: :func:`merge`, :func:`plan_merge`, :func:`analyze`, :func:`tune`, :func:`run_search`, :func:`adapt`
(AdaMerging: coefficients learned from unlabeled inputs), and the statistics
of the data-aware methods (:func:`fisher_information`, :func:`gram_matrices`, :func:`save_stats`,
:func:`load_stats`); :func:`open_checkpoint` reads a model lazily; :data:`METHODS` lists the
methods. They are imported when first used (PEP 562), so ``import tiesmerge.io.checkpoint`` or
``tiesmerge --version`` does not pay for torch and numba.

>>> import tiesmerge                                                           # doctest: +SKIP
>>> tiesmerge.merge("base", ["ft-a", "ft-b"], "ties", density=0.2, output="merged")
"""

from __future__ import annotations

import importlib

from .version import __version__

# typing is not imported here: the console script's Ctrl-C guard (_launch.entry) starts only after this package's
# own imports, so they stay few (a Ctrl-C inside typing's import was a traceback: hostile pass 25, N1)
TYPE_CHECKING = False

# public name -> the module that defines it (None: the name is a submodule)
_WHERE = {
    "merge": "api", "plan_merge": "api", "analyze": "api", "describe_plan": "api", "base_distance": "api",
    "tune": "tuning", "run_search": "tuning", "open_checkpoint": "io.checkpoint", "METHODS": "registry",
    "fisher_information": "stats", "gram_matrices": "stats", "save_stats": "stats", "load_stats": "stats",
    "adapt": "adamerging", "errors": None, "methods": None,
}

__all__ = ["METHODS", "adapt", "analyze", "base_distance", "describe_plan", "errors", "fisher_information",
           "gram_matrices",
           "load_stats", "merge", "methods", "open_checkpoint", "plan_merge", "run_search", "save_stats", "tune",
           "__version__"]

if TYPE_CHECKING:
    from typing import Any

    from . import errors, methods
    from .adamerging import adapt
    from .api import analyze, base_distance, describe_plan, merge, plan_merge
    from .io.checkpoint import open_checkpoint
    from .registry import METHODS
    from .stats import fisher_information, gram_matrices, load_stats, save_stats
    from .tuning import run_search, tune


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _WHERE[name]
    value = importlib.import_module(f".{name if module is None else module}", __name__)
    value = value if module is None else getattr(value, name)
    globals()[name] = value  # later lookups are plain attribute hits
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
