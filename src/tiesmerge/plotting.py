"""The reports' figures and pages: matplotlib without writes outside the output, PNG bytes, and
self-contained HTML (figures embedded) with one shared style.

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

__all__ = ["pyplot", "png", "html_table", "html_figure", "html_page"]


def pyplot(purpose: str, *, required: bool = True) -> Any:
    """``matplotlib.pyplot`` with the Agg backend (no screen), or a typed error naming ``purpose``
    when matplotlib is not installed (``required=False``: None instead)."""
    import os
    import sys

    if "matplotlib" not in sys.modules:  # the folder is read when matplotlib is first imported
        private_folder_for("MPLCONFIGDIR", "tiesmerge-matplotlib-")
    # tiesmerge draws with Agg whatever the environment says: a user's MPLBACKEND naming a backend that does not
    # exist made the import itself fail (a ValueError from matplotlib's settings), reported as a bug of ours
    backend = os.environ.pop("MPLBACKEND", None) if "matplotlib" not in sys.modules else None
    try:
        matplotlib = _import_matplotlib()
    except ImportError:
        if not required:
            return None
        raise ConfigError(f"{purpose} need matplotlib",
                          hint="pip install 'tiesmerge[analyze]' (or matplotlib)") from None
    finally:
        if backend is not None:
            os.environ["MPLBACKEND"] = backend  # the user's setting stays theirs (other code in the process)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plain(text: str) -> str:
    """A user's text (a task name, a model's path, a tensor's name) drawn as it is: matplotlib reads ``$...$`` as
    mathtext, and a name such as ``$x^{$`` failed to draw after a whole adapt run (hp45 c39)."""
    return str(text).replace("$", r"\$")


# matplotlib's settings file, looked up in the working folder first when matplotlib is imported
SETTINGS_FILE = "matplotlibrc"


def _import_matplotlib() -> Any:
    """Import matplotlib from an empty working folder of our own, then come back.

    matplotlib reads ``./matplotlibrc`` before any other settings file, at import: run inside a
    downloaded model's folder, such a file could ask for LaTeX text (every report then failed as
    "unexpected RuntimeError ... bug" where latex is not installed), and a FIFO of that name blocked
    the import forever. The figures are drawn with the user's own settings files
    (``$MATPLOTLIBRC``, their config folder) or matplotlib's defaults, never the working folder's.
    The working folder changes only for the import itself (one step of the report, after the
    reading threads are done)."""
    import os
    import sys
    import warnings

    if "matplotlib" in sys.modules:  # imported by the caller's own code already: its settings are theirs
        import matplotlib

        return matplotlib
    if os.path.lexists(SETTINGS_FILE) and not os.path.isdir(SETTINGS_FILE):  # neither call blocks on a FIFO
        from .errors import MergeWarning

        warnings.warn(f"{os.path.abspath(SETTINGS_FILE)} is not read: a settings file in the working folder (a "
                      "downloaded model's, perhaps) must not change the reports; the figures use your own "
                      "matplotlib settings ($MATPLOTLIBRC) or matplotlib's defaults", MergeWarning, stacklevel=3)
    try:
        back = os.open(".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # no working folder to come back to (removed, unreadable): matplotlib's lookup fails there too
        import matplotlib

        return matplotlib
    from .scratch import discard, private_folder

    try:
        # named with this host and process (scratch.py): a run killed during the import leaves it for the next run
        # to remove (hp42 C62: tempfile's own name said nothing of whose it was, and killed runs' folders stayed)
        empty = private_folder("tiesmerge-matplotlib-")
        try:
            os.chdir(empty)
            try:
                import matplotlib
            finally:
                os.fchdir(back)
        finally:
            discard(empty)
    finally:
        os.close(back)
    return matplotlib


def png(fig: Any, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (laid out tight), then cleared."""
    import io
    import warnings

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # a label holding a control character (a task named by a stranger) has no glyph:
        warnings.simplefilter("ignore", UserWarning)  # one matplotlib warning per glyph would flood stderr
        fig.tight_layout()
        fig.savefig(buffer, format="png", dpi=dpi)
    fig.clf()
    return buffer.getvalue()


# ---------------------------------------------------------------- self-contained HTML pages

_STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
          "margin:1em 0;font-size:0.85em}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
          "td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#555}.foot{color:#666}")


def html_table(head: list[str], rows: list[list[str]]) -> str:
    """A table of text cells (escaped), the first column left-aligned."""
    import html

    cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def html_figure(image: bytes, alt: str, caption: str | None = None) -> str:
    """A PNG embedded in the page (base64), so the report is one file that can be mailed or uploaded."""
    import base64
    import html

    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return (f"<figure><img alt=\"{html.escape(alt)}\" src=\"data:image/png;base64,{base64.b64encode(image).decode()}\">"
            f"{cap}</figure>")


def html_page(title: str, parts: list[str]) -> str:
    """One self-contained page of ``parts`` (HTML fragments) with the reports' shared style."""
    import html

    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")
