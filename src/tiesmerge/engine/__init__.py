"""The streaming engine: plans, exact selection, execution."""

from .executor import Executor, MemorySink, RunStats
from .plan import Plan, make_plan
from .select import RadixSelect, WindowSelect

__all__ = ["Executor", "MemorySink", "Plan", "RadixSelect", "RunStats", "WindowSelect", "make_plan"]
