"""matplotlib for the reports' figures, without writes outside the output.

matplotlib keeps a config folder and a font cache (``~/.config/matplotlib``, ``~/.cache/matplotlib``,
or ``$MPLCONFIGDIR``) and writes its font list there on first use. tiesmerge promises to write
nothing outside its inputs, its output and its digest cache, so unless the user has set
``MPLCONFIGDIR`` themselves, matplotlib is pointed at a private temporary folder that is removed
when the process exits (the font list is rebuilt each time: about a second, only in a run that
plots).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError
from .scratch import private_folder_for

__all__ = ["pyplot"]


def pyplot(purpose: str, *, required: bool = True) -> Any:
    """``matplotlib.pyplot`` with the Agg backend (no screen), or a typed error naming ``purpose``
    when matplotlib is not installed (``required=False``: None instead)."""
    import sys

    if "matplotlib" not in sys.modules:  # the folder is read when matplotlib is first imported
        private_folder_for("MPLCONFIGDIR", "tiesmerge-matplotlib-")
    try:
        import matplotlib
    except ImportError:
        if not required:
            return None
        raise ConfigError(f"{purpose} need matplotlib",
                          hint="pip install 'tiesmerge[analyze]' (or matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
