"""Exact streaming top-k thresholds: the m-th largest |tau| of each model, over any number of chunks.

Non-negative float32 values order like their bit patterns read as integers, so the m-th largest
value can be found by counting bit patterns. Each pass over the scope counts, per model, the
entries above a window of bit patterns ``[lo, hi]`` and histograms the entries inside it into
``bins`` bins; the bin that holds the m-th largest becomes the next window. Starting from the
whole float32 range with 2^16 bins this is a two-pass radix select. Starting from a *bracket*,
a narrow window estimated from a small sample of the scope (:func:`bracket_from_sample`), the
first pass usually pins the exact bit pattern at once: one pass instead of two. The answer is
exact either way (a bracket that misses only costs another pass), and ties at the threshold
are all kept. Memory: O(n * bins), whatever the model size.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..lazy import torch

__all__ = ["WindowSelect", "RadixSelect", "kth_largest", "bracket_from_sample", "MAX_FINITE_BITS"]

MAX_FINITE_BITS = 0x7F7FFFFF  # the largest finite float32, as bits
TRACK_MAX_SHIFT = 8  # bins at most 2^8 patterns wide also record their smallest and largest value
_BLOCK = 1 << 18  # columns per torch histogram block: about 9 n MB of temporaries for n models


def kth_largest(magnitudes: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep``-th largest entry of a flat float32 tensor (+inf when ``keep`` is 0)."""
    if keep <= 0:
        return torch.tensor(float("inf"), device=magnitudes.device)
    return magnitudes.kthvalue(magnitudes.numel() - keep + 1).values


def _bits(value: float) -> int:
    """The bit pattern of ``value`` rounded to float32."""
    return int(np.array(value, dtype=np.float32).view(np.uint32))


def bracket_from_sample(sample: np.ndarray, groups: np.ndarray, keep: list[int], numel: int,
                        z: float = 4.5) -> tuple[np.ndarray, np.ndarray]:
    """A window of bit patterns ``(lo, hi)`` per model that very likely holds the threshold.

    sample: (n, S) float32 |tau| drawn from the scope (runs of neighbouring entries);
    groups: (S,) int, the run-group of each sampled entry. The threshold's estimate is the
    sample quantile at the kept fraction; its spread is measured, not assumed: the quantile
    is recomputed in each group, and the window is ``z`` standard errors of the pooled
    estimate either side (or ``z`` binomial standard errors of the rank, if wider), so rows
    or tensors that differ in scale widen the window instead of breaking it.
    """
    n, size = sample.shape
    lo = np.zeros(n, np.uint32)
    hi = np.full(n, MAX_FINITE_BITS, np.uint32)
    order = np.argsort(groups, kind="stable")  # once: each group's entries become one slice
    labels, starts = np.unique(groups[order], return_index=True)
    bounds = list(zip(starts, [*starts[1:], size], strict=True))
    for t in range(n):
        if keep[t] <= 0 or size == 0:
            continue
        frac = keep[t] / numel  # kept fraction: the threshold is the (1 - frac) quantile
        rank = size * (1.0 - frac)
        spread = z * np.sqrt(size * frac * (1.0 - frac)) + 1.0  # binomial, in sample ranks
        k_lo = int(np.clip(np.floor(rank - spread), 0, size - 1))
        k_hi = int(np.clip(np.ceil(rank + spread), 0, size - 1))
        part = np.partition(sample[t], [k_lo, k_hi])  # O(S): no full sort
        low_v, high_v = float(part[k_lo]), float(part[k_hi])
        if len(labels) >= 4:
            by_group = sample[t, order]
            per_group = np.array([np.quantile(by_group[a:b], 1.0 - frac) for a, b in bounds])
            center = float(np.quantile(part, 1.0 - frac))
            half = z * float(per_group.std()) / np.sqrt(len(labels))
            low_v, high_v = min(low_v, center - half), max(high_v, center + half)
        lo[t] = _bits(max(0.0, low_v))
        hi[t] = min(_bits(min(high_v, 3.4e38)), MAX_FINITE_BITS)
    return lo, hi


class WindowSelect:
    """Find, for model t, the ``keep[t]``-th largest |tau_t| over a stream of chunks.

    Usage: while ``not done``: count every chunk of the scope (``observe`` with torch, or
    ``add_counts`` with a fused kernel), then ``end_pass``; finally read ``thresholds``.

    >>> sel = WindowSelect([2], device="cpu")
    >>> x = torch.tensor([[0.5, -3.0, 2.0, 1.0]])
    >>> while not sel.done:
    ...     sel.observe(x); sel.end_pass()
    >>> sel.thresholds(), sel.passes
    (tensor([2.]), 2)
    """

    def __init__(self, keep: list[int], device: torch.device | str, *, bins: int = 1 << 16,
                 bracket: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        self.keep = np.asarray(keep, dtype=np.int64)
        self.n = len(keep)
        self.device = device  # where the torch path counts (the kernels count on the CPU)
        self.max_bins = int(bins)
        self.lo = np.zeros(self.n, np.uint32)
        self.hi = np.full(self.n, MAX_FINITE_BITS, np.uint32)
        if bracket is not None:
            self.lo, self.hi = (np.asarray(b, dtype=np.uint32).copy() for b in bracket)
        self._found = self.keep <= 0  # nothing kept: the threshold is +inf, no pass needed
        self._bits = np.zeros(self.n, np.uint32)
        # entries at or above the threshold, where the pass that found it counted them (its bin held one value: the
        # ties), else the k asked: what keeping every tie keeps (hp40b C76)
        self.kept = self.keep.copy()
        self.passes = 0
        self._window_changed()

    # ------------------------------------------------------------------ state
    @property
    def done(self) -> bool:
        return bool(self._found.all())

    @property
    def bins(self) -> int:
        """Bins of the current pass: enough for the widest window, at most ``max_bins``."""
        return self._bins

    def _window_changed(self) -> None:
        # a model whose threshold is found counts into an empty window (lo > hi) from now on
        self.lo[self._found], self.hi[self._found] = 1, 0
        width = (self.hi.astype(np.int64) - self.lo.astype(np.int64) + 1).clip(min=1)
        self._bins = int(min(self.max_bins, 1 << int(np.ceil(np.log2(width.max())))))
        # the smallest shift that maps each window into the bins
        self.shift = np.array([max(0, int(w - 1).bit_length() - (self._bins.bit_length() - 1)) for w in width],
                              dtype=np.uint32)
        self._torch_counts: tuple[torch.Tensor, ...] | None = None  # made by the first observe()
        self._kernel_counts: tuple[np.ndarray, ...] | None = None  # made by the first add_counts()

    # ------------------------------------------------------------------ counting
    def observe(self, tau: torch.Tensor) -> None:
        """Count one chunk. tau: (n, *S) float32 (signs are ignored)."""
        if self._torch_counts is None:
            size = self.n * self._bins
            self._torch_counts = (torch.zeros(self.n, dtype=torch.int64, device=self.device),
                                  torch.zeros(size, dtype=torch.int64, device=self.device),
                                  torch.full((size,), 1 << 32, dtype=torch.int64, device=self.device),
                                  torch.zeros(size, dtype=torch.int64, device=self.device))
        above, hist, hmin, hmax = self._torch_counts
        flat = tau.reshape(self.n, -1)  # (n, L)
        lo = torch.from_numpy(self.lo.astype(np.int64)).to(self.device).view(self.n, 1)
        hi = torch.from_numpy(self.hi.astype(np.int64)).to(self.device).view(self.n, 1)
        shift = torch.from_numpy(self.shift.astype(np.int64)).to(self.device).view(self.n, 1)
        offsets = (torch.arange(self.n, device=self.device) * self._bins).view(self.n, 1)
        # int64 bin indices cost 8 bytes per entry and model; blocks of columns keep those
        # temporaries at a fixed size whatever the chunk's size
        for start in range(0, flat.shape[1], _BLOCK):
            bits = flat[:, start:start + _BLOCK].abs().view(torch.int32).to(torch.int64)  # (n, B), sign bit 0
            above += (bits > hi).sum(1)
            inside = (bits >= lo) & (bits <= hi)
            index = (((bits - lo) >> shift) + offsets)[inside]
            values = bits[inside]
            hist += torch.bincount(index, minlength=self.n * self._bins)
            hmin.scatter_reduce_(0, index, values, "amin")
            hmax.scatter_reduce_(0, index, values, "amax")

    def add_counts(self, count: Callable[..., None]) -> None:
        """Let a fused kernel count a chunk: ``count(lo, hi, shift, above, window, wmin, wmax)``
        adds to ``above`` (T, n) and ``window`` (T, n, bins), int64, and lowers/raises the
        bins' smallest/largest bit patterns ``wmin``/``wmax`` (T, n, bins), uint32; one row per
        kernel thread. The arrays live for the whole pass (allocated and reduced once)."""
        if self._kernel_counts is None:
            shape = (self._threads(), self.n, self._bins)
            self._kernel_counts = (np.zeros(shape[:2], np.int64), np.zeros(shape, np.int64),
                                   np.full(shape, 0xFFFFFFFF, np.uint32), np.zeros(shape, np.uint32))
        count(self.lo, self.hi, self.shift, *self._kernel_counts)

    @staticmethod
    def _threads() -> int:
        from . import kernels  # the kernels' per-thread rows

        return kernels.numba.config.NUMBA_NUM_THREADS if kernels.numba is not None else 1

    # ------------------------------------------------------------------ narrowing
    def end_pass(self) -> None:
        # per model: entries above the window, the window's histogram, and (looked up only for
        # the chosen bin) the bin's smallest and largest value, from the torch or kernel counts
        above = np.zeros(self.n, np.int64)
        hist = np.zeros((self.n, self._bins), np.int64)
        extremes: list[Callable[[int, int], tuple[int, int]]] = []
        if self._torch_counts is not None:
            t_above, t_hist, t_min, t_max = (x.cpu().numpy() for x in self._torch_counts)
            above += t_above
            hist += t_hist.reshape(self.n, self._bins)
            extremes.append(lambda t, b: (int(t_min[t * self._bins + b]), int(t_max[t * self._bins + b])))
        if self._kernel_counts is not None:
            k_above, k_hist, k_min, k_max = self._kernel_counts
            above += k_above.sum(0)
            hist += k_hist.sum(0)
            extremes.append(lambda t, b: (int(k_min[:, t, b].min()), int(k_max[:, t, b].max())))

        def bin_extremes(t: int, b: int) -> tuple[int, int]:
            pairs = [f(t, b) for f in extremes]
            return min(p[0] for p in pairs), max(p[1] for p in pairs)

        self.passes += 1
        for t in range(self.n):
            if self._found[t]:
                continue
            need = int(self.keep[t] - above[t])  # rank of the threshold counted from the window's top
            if need <= 0:  # the threshold lies above the window
                if self.hi[t] >= MAX_FINITE_BITS:
                    raise RuntimeError(f"top-k select: {above[t]} entries above every finite value (model {t})")
                self.lo[t], self.hi[t] = self.hi[t] + 1, MAX_FINITE_BITS
                continue
            at_or_above = np.cumsum(hist[t, ::-1])[::-1]  # entries in bins >= b
            holding = np.nonzero(at_or_above >= need)[0]
            if len(holding) == 0:  # the threshold lies below the window
                if self.lo[t] == 0:
                    raise RuntimeError(f"top-k select: fewer than {self.keep[t]} entries counted for model {t}")
                self.lo[t], self.hi[t] = 0, self.lo[t] - 1
                continue
            chosen = int(holding[-1])
            rank = need - (int(at_or_above[chosen]) - int(hist[t, chosen]))  # rank inside the chosen bin
            if self.shift[t] > TRACK_MAX_SHIFT:  # a coarse window: the whole bin is the next window
                low = int(self.lo[t]) + (chosen << int(self.shift[t]))
                self.lo[t], self.hi[t] = low, min(int(self.hi[t]), low + (1 << int(self.shift[t])) - 1)
                continue
            smallest, largest = bin_extremes(t, chosen)
            if smallest == largest or rank == 1 or rank == int(hist[t, chosen]):
                # one value in the bin, or the bin's largest/smallest is the one wanted: exact
                self._bits[t] = largest if rank == 1 else smallest if rank == int(hist[t, chosen]) else largest
                self._found[t] = True
                if smallest == largest and largest > 0:  # every entry of the bin ties at the threshold (zeros
                    # "kept" at a threshold of 0 add nothing: a partly fine-tuned model's unchanged weights)
                    self.kept[t] = int(above[t]) + int(at_or_above[chosen])
            else:  # the next window: the chosen bin, shrunk to the values seen in it
                self.lo[t], self.hi[t] = smallest, largest
        self._window_changed()

    def thresholds_array(self) -> np.ndarray:
        """(n,) float32: keep entries with |tau| >= threshold; +inf where nothing is kept."""
        if not self.done:
            raise RuntimeError("WindowSelect.thresholds() before the passes finished")
        values = self._bits.view(np.float32).copy()
        values[self.keep <= 0] = np.inf
        return values

    def thresholds(self) -> torch.Tensor:
        """:meth:`thresholds_array` as a torch tensor."""
        return torch.from_numpy(self.thresholds_array())


RadixSelect = WindowSelect  # the bracket-free form is the classic two-pass radix select
