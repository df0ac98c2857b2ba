"""Merge methods: frozen dataclasses of pure tensor math. See :mod:`tiesmerge.methods.base` for
the protocol (what a method declares, what the engine hands it) and CONTRIBUTING.md for how a
method is added."""

from .average import Average
from .base import (
    SCOPES,
    ChunkContext,
    Cut,
    LinearKernel,
    MergeMethod,
    ModelPath,
    Reduction,
    Requirements,
    SideInput,
    TiesKernel,
    TopK,
    finite,
    fraction,
    method_config,
    non_negative_int,
    nonzero_sum,
    option,
    positive,
    probability,
    steps,
    unit_interval,
)
from .dare import DareLinear, DareTies
from .fisher import Fisher
from .iso import IsoC, IsoCTS
from .magnitude_prune import MagnitudePrune
from .regmean import RegMean
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .tsv import TsvMerge

__all__ = [
    "SCOPES", "Average", "ChunkContext", "Cut", "DareLinear", "DareTies", "Fisher", "LinearKernel", "MagnitudePrune",
    "MergeMethod", "ModelPath", "Reduction", "RegMean", "Requirements", "SideInput", "TaskArithmetic", "Ties",
    "TiesKernel", "TopK", "finite", "fraction", "method_config", "non_negative_int", "nonzero_sum", "option",
    "positive", "probability", "steps", "unit_interval",
    "IsoC", "IsoCTS", "TsvMerge",  # the SVD methods
]
