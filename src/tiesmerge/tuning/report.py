"""A search's report: the results table (Markdown) and an HTML page with its plots.

Score against candidate (with the best so far), and each option's effect: the score against the
option's value, one panel per option (per-model options: one panel per model). The files go beside
the search's JSONL log, each written to a temporary name and renamed, so a report is never half there.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
from pathlib import Path

from ..plotting import html_figure, html_page, html_table, png, pyplot
from .driver import SearchResult
from .evaluator import format_score

__all__ = ["write_report", "render_figures"]


def _pyplot():
    return pyplot("the search report's plots")


def _png(fig) -> bytes:
    return png(fig, dpi=100)


def _effects(result: SearchResult) -> list[tuple[str, list[float]]]:
    """(panel title, the option's value per trial) for every searched coordinate."""
    panels = []
    for axis in result.space.axes:
        if axis.per_model:
            panels += [(f"{axis.name}[{t}]", [float(tr.options[axis.name][t]) for tr in result.trials])
                       for t in range(axis.per_model)]
        else:
            panels.append((axis.name, [float(tr.options[axis.name]) for tr in result.trials]))
    return panels


def render_figures(result: SearchResult) -> dict[str, bytes]:
    plt = _pyplot()
    scores = [t.score for t in result.trials]
    finite = [s if math.isfinite(s) else float("nan") for s in scores]
    running, best = [], -math.inf
    for s in scores:
        best = max(best, s) if math.isfinite(s) else best
        running.append(best if math.isfinite(best) else float("nan"))
    fig = plt.figure(figsize=(7, 3.4))
    ax = fig.add_subplot()
    ax.plot(range(len(scores)), finite, "o", ms=3, alpha=0.7, label="candidate")
    ax.plot(range(len(scores)), running, "-", color="C3", label="best so far")
    ax.axvline(result.best.index, color="C3", ls=":", lw=1)
    ax.set_xlabel("candidate")
    ax.set_ylabel("validation score")
    ax.set_title(f"{result.method}: {result.strategy} search, {len(scores)} candidates")
    ax.legend(loc="lower right")
    figures = {"score.png": _png(fig)}
    plt.close(fig)
    panels = _effects(result)
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = plt.figure(figsize=(3.2 * cols, 2.8 * rows))
    for n, (title, values) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, n + 1)
        ax.scatter(values, finite, s=10, alpha=0.7, c=range(len(values)), cmap="viridis")
        ax.scatter([values[result.best.index]], [result.best.score], marker="*", s=120, color="C3")
        ax.set_xlabel(title)
        ax.set_ylabel("score")
    figures["effects.png"] = _png(fig)
    plt.close(fig)
    return figures


def _markdown(result: SearchResult) -> str:
    best = result.best
    options = ", ".join(f"{k}={v}" for k, v in sorted(best.options.items()))
    reused = sum(t.reused for t in result.trials)
    return (f"# {result.method}: {result.strategy} search\n\n"
            f"Best: candidate {best.index}, score {format_score(best.score)} ({options}).\n\n"
            f"{len(result.trials)} candidate{'' if len(result.trials) == 1 else 's'}; {result.evaluations} scored"
            f"{f' ({result.log_checked} of them to check the log it resumed)' if result.log_checked else ''} and "
            f"{result.merges} merge{'' if result.merges == 1 else 's'} "  # (hp84b c57: "1 merges")
            "in this run, "
            f"{reused} scores taken from the log or an identical candidate; {result.seconds:.1f} s.\n\n"
            f"{result.table()}\n")


def _html(result: SearchResult, figures: dict[str, bytes], markdown: str) -> str:
    head = markdown.split("\n\n")
    lines = result.table().splitlines()
    # line 1 is the Markdown table's rule; "**best**" is Markdown emphasis, shown as plain text here
    rows = [[c.strip().strip("*") for c in line.strip("|").split("|")] for k, line in enumerate(lines) if k != 1]
    return html_page("tiesmerge search", [
        f"<h1>{html.escape(head[0].lstrip('# '))}</h1>", *(f"<p>{html.escape(p)}</p>" for p in head[1:3]),
        "<h2>Score by candidate, and each option's effect</h2>",
        *(html_figure(image, name) for name, image in figures.items()),
        "<h2>Every candidate</h2>", html_table(rows[0], rows[1:])])


def _write(path: Path, text: str) -> None:
    """A fresh temporary sibling renamed over ``path``: a planted link is replaced, never written through."""
    from ..paths import write_file

    write_file(path, text)


def write_report(result: SearchResult, directory: str | os.PathLike) -> Path:
    """Write ``results.md`` and ``report.html`` (plots inline) into ``directory``; return the HTML's path."""
    out = Path(directory)
    figures = render_figures(result)
    out.mkdir(parents=True, exist_ok=True)
    markdown = _markdown(result)
    from ..paths import SEARCH_STAMPS, file_stamp

    written: dict[str, object] = {}
    try:
        _write(out / "results.md", markdown)
        written["results.md"] = file_stamp(out / "results.md")
        _write(out / "report.html", _html(result, figures, markdown))
        written["report.html"] = file_stamp(out / "report.html")
        # what was written, so that a later run of the same search can tell a report the user edited since (their
        # notes in results.md) from its own, and stop before replacing it (paths.check_search_dir)
        _write(out / SEARCH_STAMPS, json.dumps(written))
    except BaseException:  # a full disk, a signal: a report left without its stamps would block the resume
        for name, stamp in written.items():
            with contextlib.suppress(OSError):
                if file_stamp(out / name) == stamp:
                    os.unlink(out / name)
        raise
    return out / "report.html"
