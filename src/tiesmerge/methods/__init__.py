"""Merge methods: frozen dataclasses of pure tensor math. See :mod:`tiesmerge.methods.base`."""

from .average import Average
from .base import ChunkContext, DataAwareMethod, MergeMethod, SideInput, TrimSpec
from .dare import DareLinear, DareTies
from .fisher import Fisher
from .magnitude_prune import MagnitudePrune
from .regmean import RegMean
from .task_arithmetic import TaskArithmetic
from .ties import Ties

__all__ = [
    "Average",
    "ChunkContext",
    "DareLinear",
    "DareTies",
    "DataAwareMethod",
    "Fisher",
    "MagnitudePrune",
    "MergeMethod",
    "RegMean",
    "SideInput",
    "TaskArithmetic",
    "Ties",
    "TrimSpec",
]
