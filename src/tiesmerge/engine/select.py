"""Exact streaming top-k thresholds: the m-th largest |tau| of each model, over any number of chunks.

Non-negative float32 values order like their bit patterns read as integers, so the m-th
largest value can be found digit by digit: one pass histograms the high 16 bits of every
|tau| (2^16 bins per model), which pins the bin that holds the m-th largest; a second pass
histograms the low 16 bits of the entries in that bin. Memory is O(n * 2^16) whatever the
model size, and the answer is exact, so ties at the threshold are all kept.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["RadixSelect", "kth_largest"]

_BINS = 1 << 16
_BLOCK = 1 << 18  # columns per histogram block: about 9 n MB of temporaries for n models


def kth_largest(magnitudes: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep``-th largest entry of a flat float32 tensor (+inf when ``keep`` is 0)."""
    if keep <= 0:
        return torch.tensor(float("inf"), device=magnitudes.device)
    return magnitudes.kthvalue(magnitudes.numel() - keep + 1).values


class RadixSelect:
    """Find, for model t, the ``keep[t]``-th largest |tau_t| over a stream of chunks.

    Usage: for every pass while ``not done``: call ``observe`` on every chunk of the scope,
    then ``end_pass``; finally read ``thresholds``. At most two passes.

    >>> sel = RadixSelect([2], device="cpu")
    >>> x = torch.tensor([[0.5, -3.0, 2.0, 1.0]])
    >>> while not sel.done:
    ...     sel.observe(x); sel.end_pass()
    >>> sel.thresholds()
    tensor([2.])
    """

    def __init__(self, keep: list[int], device: torch.device | str) -> None:
        self.keep = torch.tensor(keep, dtype=torch.int64)
        self.n = len(keep)
        self.device = torch.device(device)
        self._stage = 0  # 0: high 16 bits, 1: low 16 bits, 2: done
        self._hist = torch.zeros(self.n * _BINS, dtype=torch.int64, device=self.device)
        self._offsets = (torch.arange(self.n, device=self.device) * _BINS).view(self.n, 1)  # (n, 1)
        self._high = torch.zeros(self.n, dtype=torch.int64)  # chosen high bin per model
        self._rank = torch.zeros(self.n, dtype=torch.int64)  # rank still to find inside that bin
        self._bits = torch.zeros(self.n, dtype=torch.int64)
        if bool((self.keep <= 0).all()):
            self._stage = 2

    @property
    def done(self) -> bool:
        return self._stage == 2

    def observe(self, tau: torch.Tensor) -> None:
        """Count one chunk. tau: (n, *S) float32 (signs are ignored)."""
        flat = tau.reshape(self.n, -1)  # (n, L)
        # int64 bin indices cost 8 bytes per entry and model; blocks of columns keep those
        # temporaries at a fixed size whatever the chunk's size
        for start in range(0, flat.shape[1], _BLOCK):
            self._observe_block(flat[:, start:start + _BLOCK])

    def _observe_block(self, block: torch.Tensor) -> None:
        bits = block.abs().view(torch.int32).to(torch.int64)  # (n, B), sign bit is 0
        high = bits >> 16  # (n, B) in [0, 2^15)
        if self._stage == 0:
            index = high + self._offsets
        else:
            match = high == self._high.to(self.device).view(self.n, 1)  # (n, B)
            index = ((bits & 0xFFFF) + self._offsets)[match]
        self._hist += torch.bincount(index.reshape(-1), minlength=self.n * _BINS)

    @property
    def stage(self) -> int:
        """0 while counting high 16 bits, 1 while counting low 16 bits inside the chosen bins."""
        return self._stage

    @property
    def chosen_high(self) -> torch.Tensor:
        """(n,) int64: the high-16-bit bin of each model's threshold (meaningful in stage 1)."""
        return self._high

    def add_counts(self, count: Callable[[torch.Tensor], None]) -> None:
        """Let ``count(hist)`` add a chunk's counts to the (n, 2^16) int64 histogram of the
        current stage (a fused kernel computes them without materialising |tau|)."""
        count(self._hist.view(self.n, _BINS))

    def end_pass(self) -> None:
        hist = self._hist.view(self.n, _BINS).cpu()
        # at_or_above[t, b] = number of entries of model t in bins >= b
        at_or_above = hist.flip(1).cumsum(1).flip(1)  # (n, 2^16)
        target = self.keep if self._stage == 0 else self._rank
        chosen = (at_or_above >= target.view(-1, 1)).sum(1) - 1  # last bin still holding the target rank
        chosen = chosen.clamp_min(0)
        above = at_or_above.gather(1, chosen.view(-1, 1)).view(-1) - hist.gather(1, chosen.view(-1, 1)).view(-1)
        if self._stage == 0:
            self._high = chosen
            self._rank = self.keep - above  # rank of the threshold among the chosen bin's entries
            self._stage = 1
        else:
            self._bits = (self._high << 16) | chosen
            self._stage = 2
        self._hist.zero_()

    def thresholds(self) -> torch.Tensor:
        """(n,) float32: keep entries with |tau| >= threshold; +inf where nothing is kept."""
        if not self.done:
            raise RuntimeError("RadixSelect.thresholds() before the passes finished")
        values = self._bits.to(torch.int32).view(torch.float32).clone()
        return values.masked_fill_(self.keep <= 0, float("inf"))
