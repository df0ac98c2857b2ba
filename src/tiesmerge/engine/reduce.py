"""Reductions: what a merge must know about a whole scope before it merges any of it.

* **Cuts** (:meth:`Reducer.thresholds`): each model's exact top-k threshold of |tau| over a
  scope, the whole model or one tensor. Counting passes (:class:`~.select.WindowSelect`)
  narrow a window of bit patterns until each threshold is pinned; a scope too large to count
  twice cheaply starts from a bracket estimated on a seeded sample, so one pass usually
  suffices. The fused kernel counts raw rows; the torch path counts task vectors. A
  per-tensor scope held in one chunk is counted in memory (:meth:`Reducer.thresholds_in_memory`).
* **Sums** (:meth:`Reducer.sums`): the reductions a method declares (TIES's majority sign),
  one pass after the cuts, the partial sums added in float64.
* **Statistics normalisation** (:func:`rms_scales`): one pass over each model's statistics.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import InvalidTensorError
from ..io.checkpoint import Checkpoint
from ..lazy import torch
from ..methods.base import ChunkContext, Reduction, TopK
from . import fused
from .plan import SAMPLED_NUMEL, Chunk
from .reader import ChunkRows, RawRows, Reader, widen
from .select import WindowSelect, bracket_from_sample, kth_largest

__all__ = ["Reducer", "rms_scales"]

MEMORY_SAMPLE_RUNS, MEMORY_SAMPLE_RUN = 256, 256  # the sample of a tensor held in memory (per-tensor scope)
_KERNEL_HIST_BYTES = 32 << 20  # cap on the per-thread window histograms of a counting pass



TIES_EXCESS = 1.5  # entries kept past this multiple of k (and 1% of the scope): said


def _warn_if_ties_keep_far_more(kept: np.ndarray, asked: np.ndarray, numel: int) -> None:
    """Keeping every entry that ties at the threshold (TIES's default, the authors' code) keeps far more than the
    density when many entries share one magnitude (fine-tunes of base ± 0.01: density 0.2 kept 90%, hp40b C76).
    ``kept``/``asked`` (n,): entries over every scope of the run (a per-tensor scope's too: hp42 C57 found it said
    under the global scope only), ``numel`` their size."""
    import warnings

    from ..errors import MergeWarning

    over = [t for t in range(len(kept)) if kept[t] > TIES_EXCESS * asked[t] + 0.01 * numel]
    if not over or not numel:
        return
    shown = ", ".join(f"model {t} {kept[t] / numel:.1%} (asked {asked[t] / numel:.1%})"
                      for t in over[:4]) + (f" and {len(over) - 4} more" if len(over) > 4 else "")
    warnings.warn(MergeWarning(f"many entries tie at the trim's threshold, and keeping every tie keeps far more than "
                               f"the density: {shown}; threshold_ties=sort (--threshold-ties sort) keeps exactly k, "
                               "in mergekit's order"), stacklevel=3)


class Reducer:
    """Computes cuts and sums over scopes of a merge's chunks, reading through ``reader``."""

    def __init__(self, reader: Reader, *, tally: Callable[[str, float], None] | None = None) -> None:
        self.reader = reader
        self.n = reader.n
        self._tally = tally or (lambda what, since: None)
        self.passes = 0  # whole-scope passes made by the last streaming call
        # entries kept (ties at the threshold included) and asked for, per model, over every scope cut so far
        self.kept_total = np.zeros(self.n, np.int64)
        self.asked_total = np.zeros(self.n, np.int64)
        self.numel_total = 0

    def _account(self, kept: Sequence[int], asked: Sequence[int], numel: int,
                 thresholds: Sequence[float] | None = None) -> None:
        # at a threshold of 0 the "ties" kept are zeros, which change nothing: an adapter that leaves this tensor
        # alone is no excess (hp55 c84: a false warning, and --threshold-ties sort changed no bit)
        kept = np.asarray(kept, np.int64)
        if thresholds is not None:
            kept = np.where(np.asarray(thresholds, np.float64) > 0, kept, np.asarray(asked, np.int64))
        self.kept_total += kept
        self.asked_total += np.asarray(asked, np.int64)
        self.numel_total += numel

    def warn_ties_excess(self) -> None:
        """Said once, after the run: see :func:`_warn_if_ties_keep_far_more`."""
        _warn_if_ties_keep_far_more(self.kept_total, self.asked_total, self.numel_total)

    # ------------------------------------------------------------------ cuts
    def _kernel_bins(self) -> int:
        """Window bins per model for the counting kernel: the per-thread histograms stay
        under ``_KERNEL_HIST_BYTES`` (2^18 bins for a few models on a few cores)."""
        kernels = fused.load()
        per_bin = 24 * self.n * max(1, kernels.numba.config.NUMBA_NUM_THREADS if kernels else 1)
        return 1 << max(12, min(18, (_KERNEL_HIST_BYTES // per_bin).bit_length() - 1))

    def count(self, selector: WindowSelect, chunk: Chunk, payload: RawRows | list[torch.Tensor]) -> None:
        """Count one chunk into ``selector``: the fused kernel on raw rows, else torch on task vectors."""
        if isinstance(payload, RawRows):
            finite = [True]
            models = payload.inputs[:1 + self.n]  # the base and the models: never the reference

            def run(*counts: np.ndarray) -> None:
                finite[0] = fused.load().count_pass(models, *counts)

            clock = time.perf_counter()
            selector.add_counts(run)
            self._tally("count_kernel", clock)
            if not finite[0]:
                self.reader.raise_not_finite(chunk, payload.tensors())
        else:
            selector.observe(self.reader.task_vectors(chunk, payload).tau)

    def thresholds(self, chunks: Sequence[Chunk], numel: int, top: TopK) -> np.ndarray:
        """Exact per-model thresholds (n,) float32 over the scope made of ``chunks`` (``numel``
        entries), streamed; ``self.passes`` counts the passes it took."""
        keep = top.keep_counts(numel, self.n)
        bracket = None
        if numel > SAMPLED_NUMEL and keep[0] > 0:  # smaller scopes: two passes cost little
            clock = time.perf_counter()
            sample, groups = self.reader.sample(chunks, numel)
            bracket = bracket_from_sample(sample, groups, keep, numel)
            self._tally("sample", clock)
        use_kernels = any(self.reader.raw(c.job) for c in chunks)
        selector = WindowSelect(keep, self.reader.device, bins=self._kernel_bins() if use_kernels else 1 << 16,
                                bracket=bracket)
        while not selector.done:
            for chunk, payload in self.reader.stream(chunks):
                self.count(selector, chunk, payload)
            selector.end_pass()
        self.passes = selector.passes
        self._account(selector.kept, selector.keep, numel, selector.thresholds_array())
        return selector.thresholds_array()

    def thresholds_in_memory(self, chunk: Chunk, payload: RawRows | list[torch.Tensor], rows: ChunkRows | None,
                             top: TopK) -> np.ndarray:
        """Thresholds (n,) of a per-tensor scope held in one chunk: counting passes over raw rows
        in memory (from a bracket sampled in memory when the tensor is large enough to be worth
        it), or a k-th value of the task vectors ``rows`` on the torch path."""
        numel = chunk.job.numel
        keep = top.keep_counts(numel, self.n)
        if not isinstance(payload, RawRows):
            assert rows is not None
            flat = rows.tau.reshape(self.n, -1).abs()  # (n, numel)
            found = np.array([float(kth_largest(flat[t], keep[t])) for t in range(self.n)], np.float32)
            self._account([int((flat[t] >= float(found[t])).sum()) if keep[t] else 0 for t in range(self.n)], keep,
                          numel, found)
            return found
        bracket = None
        if numel >= 4 * MEMORY_SAMPLE_RUNS * MEMORY_SAMPLE_RUN and keep[0] > 0:
            rng = np.random.default_rng(numel)
            starts = rng.integers(0, numel - MEMORY_SAMPLE_RUN, MEMORY_SAMPLE_RUNS)
            index = (starts[:, None] + np.arange(MEMORY_SAMPLE_RUN)).reshape(-1)  # one gather for all runs
            picked = np.stack([a[index] for a in payload.inputs[:1 + self.n]])  # (n + 1, S) raw
            values = widen(picked, payload.dtype)  # (n + 1, S) float32
            sample = np.nan_to_num(np.abs(values[1:] - values[0]), nan=np.inf)
            groups = np.repeat(np.arange(MEMORY_SAMPLE_RUNS) % 16, MEMORY_SAMPLE_RUN)
            bracket = bracket_from_sample(sample, groups, keep, numel)
        # per-thread histograms are cleared and summed per tensor: one bin per 256 entries keeps
        # that under the counting itself, and bins of up to 2^8 patterns still record min/max
        bins = min(self._kernel_bins(), max(1 << 10, 1 << max(0, (numel // 256).bit_length() - 1)))
        selector = WindowSelect(keep, "cpu", bins=bins, bracket=bracket)
        while not selector.done:
            self.count(selector, chunk, payload)
            selector.end_pass()
        self._account(selector.kept, selector.keep, numel, selector.thresholds_array())
        return selector.thresholds_array()

    # ------------------------------------------------------------------ sums
    @staticmethod
    def sums_of(rows: ChunkRows, reductions: Sequence[Reduction], ctx: ChunkContext) -> list[torch.Tensor]:
        """Each reduction's partial sum over one chunk, float64 (a method may trim tau in
        place, so every reduction but the last gets a copy)."""
        partial = []
        for i, reduction in enumerate(reductions):
            tau = rows.tau if i == len(reductions) - 1 else rows.tau.clone()
            partial.append(reduction.per_chunk(tau, ctx).double())
        return partial

    @staticmethod
    def finish(reductions: Sequence[Reduction], totals: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {r.name: (r.finish(total) if r.finish is not None else total).float()
                for r, total in zip(reductions, totals, strict=True)}

    def sums(self, chunks: Sequence[Chunk], reductions: Sequence[Reduction],
             context: Callable[[Chunk, ChunkRows], ChunkContext]) -> dict[str, torch.Tensor]:
        """The finished reductions over the scope made of ``chunks``: one streaming pass."""
        totals: list[torch.Tensor] | None = None
        for chunk, payload in self.reader.stream(chunks):
            rows = self.reader.task_vectors(chunk, payload)
            partial = self.sums_of(rows, reductions, context(chunk, rows))
            totals = partial if totals is None else [a + b for a, b in zip(totals, partial, strict=True)]
        if totals is None:  # an empty scope
            totals = [torch.zeros((), dtype=torch.float64) for _ in reductions]
        self.passes = 1
        return self.finish(reductions, totals)


def rms_scales(kind: str, stats: Sequence[Checkpoint], names: Sequence[dict[str, str]]) -> list[float]:
    """1 / (root mean square of each model's statistics over the whole model): one pass."""
    scales = []
    for k, checkpoint in enumerate(stats):
        total, count = 0.0, 0
        for stored in names[k].values():
            value = checkpoint.read(stored)
            total += float(value.double().pow(2).sum())
            count += value.numel()
        if not total > 0:
            raise InvalidTensorError(f"{checkpoint.label}: every {kind} value is 0, so it cannot be "
                                     "normalized by its scale", hint="use normalize: none, or recompute them")
        scales.append((total / count) ** -0.5)
    return scales
