"""Evaluation: frozen-head encoders, rank classification, suite results.

Submodules: ``encoder`` (sentence encoder + frozen cosine heads), ``finetune``, ``suite_eval``
(accuracy, normalized accuracy), ``results`` (tables), ``rank_classification`` (the paper's
protocol for language models). A task's examples are plain ``(text, label index)`` pairs; the
benchmark's own tasks (fetched and parsed from registry packages) live in the separate
``tiesmerge_bench`` package, which this library never imports.
"""

from .rank_classification import ChoiceExample, rank_classification_accuracy, score_choices
from .results import ResultRow, ResultsTable
from .suite_eval import SuiteResult, evaluate_encoder, task_accuracy

__all__ = ["ChoiceExample", "ResultRow", "ResultsTable", "SuiteResult", "evaluate_encoder",
           "rank_classification_accuracy", "score_choices", "task_accuracy"]
