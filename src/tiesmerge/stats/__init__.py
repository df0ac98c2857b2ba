"""Statistics computed from data that some merge methods need, stored as files shaped like the model.

- :func:`fisher_information`: diagonal Fisher per parameter (Fisher merging).
- :func:`gram_matrices`: X^T X / N of every Linear layer's inputs (RegMean).
- :func:`save_stats` / :func:`load_stats` / :func:`open_stats`: safetensors + a JSON manifest.
"""

from .files import (
    MANIFEST_NAME,
    STATS_KINDS,
    Statistics,
    StatsManifest,
    StatsSource,
    files_digest,
    load_stats,
    model_digest,
    open_stats,
    save_stats,
)
from .fisher import FISHER_KINDS, PER_EXAMPLE, fisher_information
from .gram import gram_matrices

__all__ = ["FISHER_KINDS", "MANIFEST_NAME", "PER_EXAMPLE", "STATS_KINDS", "Statistics", "StatsManifest",
           "StatsSource", "files_digest", "fisher_information", "gram_matrices", "load_stats", "model_digest",
           "open_stats", "save_stats"]
