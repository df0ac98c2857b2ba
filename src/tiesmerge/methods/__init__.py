"""Merge methods: frozen dataclasses of pure tensor math. See :mod:`tiesmerge.methods.base`."""

from .average import Average
from .base import (
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
    method_config,
    option,
)
from .dare import DareLinear, DareTies
from .fisher import Fisher
from .magnitude_prune import MagnitudePrune
from .regmean import RegMean
from .task_arithmetic import TaskArithmetic
from .ties import Ties

__all__ = [
    "Average",
    "ChunkContext",
    "Cut",
    "DareLinear",
    "DareTies",
    "Fisher",
    "LinearKernel",
    "MagnitudePrune",
    "MergeMethod",
    "ModelPath",
    "Reduction",
    "RegMean",
    "Requirements",
    "SideInput",
    "TaskArithmetic",
    "Ties",
    "TiesKernel",
    "TopK",
    "method_config",
    "option",
]
