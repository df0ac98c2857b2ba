"""The streaming engine: plans, exact selection, execution."""

from .executor import Executor, MemorySink, RunStats
from .plan import Plan, format_size, make_plan, parse_size
from .select import RadixSelect, WindowSelect

__all__ = ["Executor", "MemorySink", "Plan", "RadixSelect", "RunStats", "WindowSelect", "format_size", "make_plan", "parse_size"]
