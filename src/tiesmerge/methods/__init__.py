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
from .breadcrumbs import Breadcrumbs, BreadcrumbsTies
from .consensus import Consensus
from .dare import DareLinear, DareTies
from .della import Della, DellaLinear
from .fisher import Fisher
from .iso import IsoC, IsoCTS
from .magnitude_prune import MagnitudePrune
from .model_stock import ModelStock
from .nuslerp import NuSlerp
from .regmean import RegMean
from .slerp import Slerp
from .task_arithmetic import TaskArithmetic
from .ties import Ties
from .tsv import TsvMerge

__all__ = [
    "SCOPES", "Average", "ChunkContext", "Cut", "DareLinear", "DareTies", "Fisher", "LinearKernel", "MagnitudePrune",
    "MergeMethod", "ModelPath", "Reduction", "RegMean", "Requirements", "SideInput", "TaskArithmetic", "Ties",
    "TiesKernel", "TopK", "finite", "fraction", "method_config", "non_negative_int", "nonzero_sum", "option",
    "positive", "probability", "steps", "unit_interval",
    # issue 12: the SVD methods, the mergekit family and consensus
    "IsoC", "IsoCTS", "TsvMerge",
    "Breadcrumbs", "BreadcrumbsTies", "Consensus", "Della", "DellaLinear", "ModelStock", "NuSlerp", "Slerp",
]
