"""Learning the merge from unlabeled inputs: AdaMerging (Yang et al., ICLR 2024), task-wise and
layer-wise, over any method's per-task vectors (over TIES's: AdaMerging++).

- :func:`adapt`: the verb (``tiesmerge adapt``): learn, then write the merged model like ``merge``.
- :mod:`.vectors`: each task's processed vector, through the merge engine.
- :mod:`.learn`: the coefficients, the entropy objective, Adam, checkpoints and resume.
- :mod:`.report`: the coefficients' heat map and the entropy curve.
"""

from .learn import GRANULARITIES, AdaptConfig, History, Merger, learn, total_entropy
from .run import AdaptResult, LearnedMerge, adapt, describe_adapt, read_task_data
from .vectors import TaskVectors, collect_task_vectors

__all__ = ["GRANULARITIES", "AdaptConfig", "AdaptResult", "History", "LearnedMerge", "Merger", "TaskVectors", "adapt",
           "collect_task_vectors", "describe_adapt", "learn", "read_task_data", "total_entropy"]
