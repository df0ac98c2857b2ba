"""tiesmerge: merge models fine-tuned from one base with TIES-Merging, streamed tensor by tensor.

>>> import tiesmerge                                                           # doctest: +SKIP
>>> tiesmerge.merge("base", ["ft-a", "ft-b"], "ties", density=0.2, output="merged")

The public names are imported when first used (PEP 562), so ``import tiesmerge.io.checkpoint``
or ``tiesmerge --version`` does not pay for torch and numba.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["METHODS", "analyze", "errors", "merge", "methods", "open_checkpoint", "plan_merge", "__version__"]

# public name -> the module that defines it
_WHERE = {"analyze": "api", "merge": "api", "plan_merge": "api", "open_checkpoint": "io.checkpoint",
          "METHODS": "registry", "errors": None, "methods": None}  # None: the name is a submodule

if TYPE_CHECKING:
    from . import errors, methods
    from .api import analyze, merge, plan_merge
    from .io.checkpoint import open_checkpoint
    from .registry import METHODS


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = _WHERE[name]
    value = importlib.import_module(f".{name if module is None else module}", __name__)
    return value if module is None else getattr(value, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
