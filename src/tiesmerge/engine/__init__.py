"""The streaming engine: plans, exact selection, execution."""

from .executor import Executor, MemorySink, RunStats
from .plan import Plan, format_size, make_plan, parse_size
from .select import RadixSelect

__all__ = ["Executor", "MemorySink", "Plan", "RadixSelect", "RunStats", "format_size", "make_plan", "parse_size"]
