"""Fused CPU kernels (numba) for the hot paths: the top-k histograms and the TIES merge.

The torch path runs a merge as a dozen elementwise passes over (n, E) float32 temporaries;
these kernels make one pass per chunk, element by element, with nothing larger than the
output allocated, and use every core. They compute exactly what :mod:`tiesmerge.methods.ops`
computes (float32, same rules); the tests hold the two paths to each other. When numba is not
installed, or for a method or device they do not cover, the engine uses the torch path.
"""

from __future__ import annotations

import os

import numpy as np
import torch

try:  # optional: the engine falls back to torch without it
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised where numba is absent
    numba = None

__all__ = ["available", "histogram_pass", "ties_merge_chunk", "ELECT_CODES", "ZERO_CODES", "AGGREGATE_CODES"]

ELECT_CODES = {"mass": 0, "count": 1}
ZERO_CODES = {"zero": 0, "positive": 1, "majority": 2}
AGGREGATE_CODES = {"mean": 0, "sum": 1, "max": 2}
_BLOCK = 16384  # entries per work item: small enough to balance threads, large enough to amortise


def available() -> bool:
    """True when numba is importable and TIESMERGE_KERNELS is not "0" (the switch lets a
    benchmark time the torch path on the same machine)."""
    return numba is not None and os.environ.get("TIESMERGE_KERNELS", "1") != "0"


if numba is not None:

    @njit(parallel=True, cache=True, nogil=True)
    def _hist_kernel(base, models, stage, high, hist):  # pragma: no cover - compiled
        # base (E,) f32, models (n, E) f32, high (n,) i64, hist (threads, n, 65536) i64
        n, size = models.shape
        blocks = (size + _BLOCK - 1) // _BLOCK
        for blk in prange(blocks):
            tid = numba.get_thread_id()
            start = blk * _BLOCK
            stop = min(size, start + _BLOCK)
            buf = np.empty(stop - start, np.float32)
            bits = buf.view(np.uint32)
            for t in range(n):
                for i in range(start, stop):
                    buf[i - start] = abs(models[t, i] - base[i])
                if stage == 0:
                    for j in range(stop - start):
                        hist[tid, t, bits[j] >> 16] += 1
                else:
                    want = high[t]
                    for j in range(stop - start):
                        if (bits[j] >> 16) == want:
                            hist[tid, t, bits[j] & 0xFFFF] += 1

    @njit(parallel=True, cache=True, nogil=True)
    def _ties_kernel(base, models, thresholds, weights, lam, elect, zero, fill, aggregate, out):  # pragma: no cover
        # base (E,) f32, models (n, E) f32, thresholds/weights (n,) f32, out (E,) f32
        n, size = models.shape
        blocks = (size + _BLOCK - 1) // _BLOCK
        for blk in prange(blocks):
            start = blk * _BLOCK
            stop = min(size, start + _BLOCK)
            for i in range(start, stop):
                b = base[i]
                vote = np.float32(0.0)
                for t in range(n):
                    v = models[t, i] - b
                    if abs(v) >= thresholds[t]:
                        if elect == 0:
                            vote += weights[t] * v
                        elif v != 0:
                            vote += weights[t] * (np.float32(1.0) if v > 0 else np.float32(-1.0))
                gamma = np.float32(1.0) if vote > 0 else (np.float32(-1.0) if vote < 0 else np.float32(0.0))
                if gamma == 0:
                    if zero == 0:
                        out[i] = b
                        continue
                    gamma = np.float32(1.0) if zero == 1 else np.float32(fill)
                    if gamma == 0:
                        out[i] = b
                        continue
                total = np.float32(0.0)
                denom = np.float32(0.0)
                best = np.float32(0.0)
                for t in range(n):
                    v = models[t, i] - b
                    if abs(v) >= thresholds[t]:
                        wv = weights[t] * v
                        if wv != 0 and (wv > 0) == (gamma > 0):
                            total += wv
                            denom += weights[t]
                            if abs(wv) > best:
                                best = abs(wv)
                if aggregate == 0:
                    merged = total / denom if denom != 0 else np.float32(0.0)
                elif aggregate == 1:
                    merged = total
                else:
                    merged = best * gamma
                out[i] = b + np.float32(lam) * merged


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()


def histogram_pass(base32: torch.Tensor, models32: torch.Tensor, stage: int, high: torch.Tensor,
                   hist: torch.Tensor) -> None:
    """Add one chunk's counts to ``hist`` (n, 65536) int64: high 16 bits of |m - b| (stage 0),
    or the low 16 bits of the entries whose high bits equal ``high[t]`` (stage 1)."""
    n = models32.shape[0]
    local = np.zeros((numba.config.NUMBA_NUM_THREADS, n, 65536), np.int64)
    _hist_kernel(_numpy(base32.reshape(-1)), _numpy(models32.reshape(n, -1)), stage,
                 _numpy(high.to(torch.int64)), local)
    hist += torch.from_numpy(local.sum(0))


def ties_merge_chunk(base32: torch.Tensor, models32: torch.Tensor, thresholds: torch.Tensor,
                     weights: torch.Tensor | None, lam: float, elect: str, zero_sign: str, majority: float | None,
                     aggregate: str) -> torch.Tensor:
    """base + lam * TIES(models - base) for one chunk, in float32: (*S), (n, *S) -> (*S)."""
    n = models32.shape[0]
    w = torch.ones(n, dtype=torch.float32) if weights is None else weights.to(torch.float32).cpu()
    out = np.empty(base32.numel(), np.float32)
    _ties_kernel(_numpy(base32.reshape(-1)), _numpy(models32.reshape(n, -1)), _numpy(thresholds.cpu().float()),
                 _numpy(w), float(lam), ELECT_CODES[elect], ZERO_CODES[zero_sign],
                 float(majority or 0.0), AGGREGATE_CODES[aggregate], out)
    return torch.from_numpy(out).view(base32.shape)
