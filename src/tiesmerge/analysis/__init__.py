"""Interference analysis (the paper's section 3 and 7): sign conflicts after trimming, the
redundancy of task vectors, and how each merge step changes merged magnitudes; streamed like
a merge, written as JSON, PNG plots and one HTML report."""

from .report import render_html, write_report
from .runner import DEFAULT_CURVE, AnalysisSettings, run_analysis
from .summary import summarise

__all__ = ["AnalysisSettings", "DEFAULT_CURVE", "run_analysis", "render_html", "summarise", "write_report"]
