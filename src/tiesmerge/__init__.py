"""tiesmerge: merge models fine-tuned from one base with TIES-Merging, streamed tensor by tensor.

The verbs: :func:`merge`, :func:`plan_merge`, :func:`analyze`, :func:`tune`, and the statistics
of the data-aware methods (:func:`fisher_information`, :func:`gram_matrices`, :func:`save_stats`,
:func:`load_stats`); :func:`open_checkpoint` reads a model lazily; :data:`METHODS` lists the
methods. They are imported on first use, so ``import tiesmerge`` stays light.

>>> import tiesmerge                                                           # doctest: +SKIP
>>> tiesmerge.merge("base", ["ft-a", "ft-b"], "ties", density=0.2, output="merged")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it (PEP 562: resolved on first access)
_LAZY = {
    "merge": "api", "plan_merge": "api", "analyze": "api", "describe_plan": "api",
    "tune": "tuning", "open_checkpoint": "io.checkpoint", "METHODS": "registry",
    "fisher_information": "stats", "gram_matrices": "stats", "save_stats": "stats", "load_stats": "stats",
    "errors": None, "methods": None,
}

__all__ = ["METHODS", "analyze", "describe_plan", "errors", "fisher_information", "gram_matrices", "load_stats",
           "merge", "methods", "open_checkpoint", "plan_merge", "save_stats", "tune", "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'tiesmerge' has no attribute {name!r}")
    module = _LAZY[name]
    value = importlib.import_module(f".{name}" if module is None else f".{module}", __name__)
    if module is not None:
        value = getattr(value, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
