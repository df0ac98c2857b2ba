"""The streaming engine in three rooms: reading (:mod:`.reader`), reductions (:mod:`.reduce`:
cuts, sums, statistics normalisation) and orchestration (:mod:`.executor`), planned by
:mod:`.plan` from what a method declares."""

from .executor import Executor, MemorySink, RunStats
from .plan import Plan, make_plan
from .reader import EngineInputs, Reader
from .reduce import Reducer
from .select import RadixSelect, WindowSelect

__all__ = ["EngineInputs", "Executor", "MemorySink", "Plan", "RadixSelect", "Reader", "Reducer", "RunStats",
           "WindowSelect", "make_plan"]
