"""tiesmerge: merge models fine-tuned from one base with TIES-Merging, streamed tensor by tensor.

>>> import tiesmerge                                                           # doctest: +SKIP
>>> tiesmerge.merge("base", ["ft-a", "ft-b"], "ties", density=0.2, output="merged")
"""

__version__ = "0.1.0"

from . import errors, methods  # noqa: E402
from .api import analyze, merge, plan_merge  # noqa: E402
from .io.checkpoint import open_checkpoint  # noqa: E402
from .registry import METHODS  # noqa: E402

__all__ = ["METHODS", "analyze", "errors", "merge", "methods", "open_checkpoint", "plan_merge", "__version__"]
