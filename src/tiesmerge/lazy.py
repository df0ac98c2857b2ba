"""Modules imported on first use, so that commands which do no tensor math never load them.

``import torch`` alone takes 1.2 s on the 2-core machines we measure on (2.9 s on an AVX2
EPYC), more than ``tiesmerge validate`` or ``merge --dry-run`` need in all. Modules whose
functions use torch only when called (the method declarations, the tensor operations, the
torch path of the engine) write ``from ..lazy import torch``: the name behaves as the torch
module, which is imported at the first attribute access.

>>> from tiesmerge.lazy import torch
>>> torch.zeros(2).shape                     # torch is imported here     # doctest: +SKIP
torch.Size([2])
"""

from __future__ import annotations

import importlib
import types
from typing import Any

__all__ = ["LazyModule", "torch"]


class LazyModule(types.ModuleType):
    """Stands for the module ``name`` and imports it when one of its attributes is first read."""

    def __getattr__(self, attr: str) -> Any:
        module = importlib.import_module(self.__name__)
        # later lookups hit this dict directly; what the module adds afterwards (its own lazy
        # submodules) still comes through here
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)


torch: Any = LazyModule("torch")
