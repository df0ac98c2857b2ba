"""Evaluation: offline benchmark data and scoring of merged models.

The real-text task data lives in :mod:`tiesmerge.evaluation.data`.
"""

__all__: list[str] = []
