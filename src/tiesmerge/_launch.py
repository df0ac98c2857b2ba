"""The ``tiesmerge`` console script: the command's modules imported with the cyclic garbage collector paused.

Importing the command line (its modules, numpy, yaml) allocates some hundred thousand objects, and the
collector traversed them again and again as they accumulated: ``tiesmerge methods`` took 0.49 s with it
running and 0.43 s with it paused (medians of 15 runs each, interleaved, farm-bench, 2-core machine under
load), and numba's import with the kernels is paused the same way (engine.fused). Modules live as long as
the process, so they are frozen out of the collector's reach once imported (``gc.freeze``); what the
command then allocates is collected as usual.
"""

from __future__ import annotations

import gc

# typing is not imported: this module is imported before entry()'s Ctrl-C guard starts, and a Ctrl-C inside
# typing's import (re, enum) printed a traceback (hostile pass 33, C154; the package's own __init__: pass 25, N1)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import NoReturn

__all__ = ["entry"]


def entry() -> NoReturn:  # pragma: no cover - exercised by the installed `tiesmerge` script
    """Import the command line with the collector paused, then run it (``tiesmerge.cli.main.entry``)."""
    gc.disable()
    try:
        from .cli.main import entry as run
    except KeyboardInterrupt:  # Ctrl-C in the first instant, before the command's handlers: nothing started yet
        import sys

        print("error: interrupted; no output directory was left behind", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        gc.freeze()
        gc.enable()
    run()
