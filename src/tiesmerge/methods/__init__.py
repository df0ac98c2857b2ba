"""Merge methods: frozen dataclasses of pure tensor math. See :mod:`tiesmerge.methods.base`."""

from .average import Average
from .base import ChunkContext, MergeMethod, TrimSpec
from .dare import DareLinear, DareTies
from .magnitude_prune import MagnitudePrune
from .task_arithmetic import TaskArithmetic
from .ties import Ties

__all__ = [
    "Average",
    "ChunkContext",
    "DareLinear",
    "DareTies",
    "MagnitudePrune",
    "MergeMethod",
    "TaskArithmetic",
    "Ties",
    "TrimSpec",
]
