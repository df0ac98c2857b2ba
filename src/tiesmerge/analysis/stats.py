"""Interference statistics as small pure functions over blocks of stacked task vectors.

Every function takes ``tau``, a block of the n task vectors, ``(n, B)`` float32 (one row per
model, B entries of the same tensor), and returns counts or sums that add up over blocks, so a
runner can stream any model through them. ``thresholds`` is ``(n,)``: model t keeps the
entries with ``|tau_t| >= thresholds[t]`` (its top-k, the paper's "influential" parameters).

Sign patterns: after trimming, each model is in one of three states at an entry — not kept
(0), kept and positive (1), kept and negative (2). An entry's pattern is the base-3 number
``sum_t state_t * 3**t``; a histogram of patterns over the whole model answers every
sign-conflict question about every subset of the models exactly, with one pass.
"""

from __future__ import annotations

import numpy as np
import torch

from ..methods import ops

__all__ = [
    "MAX_MODELS",
    "MAGNITUDE_BINS",
    "magnitude_histograms",
    "kept_mask",
    "sign_pattern_codes",
    "pattern_signs",
    "subset_conflicts",
    "tensor_conflicts",
    "mask_intersections",
    "kept_mass",
    "merge_variants",
    "influence_groups",
    "agreement_groups",
    "group_moments",
    "topk_mass_share",
]

MAX_MODELS = 12  # 3^12 = 531,441 sign patterns: a 4 MiB histogram
MAGNITUDE_BINS = 1 << 16  # the high 16 bits of a float32: sign, exponent, 7 mantissa bits
VARIANTS = ("averaging", "trim + disjoint mean", "elect + disjoint mean", "TIES")


def magnitude_histograms(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per model, the count, L1 mass and squared-L2 mass of |tau| in each of 2^16 bins.

    A bin is the high 16 bits of |tau|'s float32 bit pattern: non-negative floats order like
    their bits, so bins are ordered by magnitude and one bin spans a relative width of 2^-7.
    Returns three ``(n, 2^16)`` tensors: int64 counts, float64 sums of |tau| and of tau^2.
    """
    n = tau.shape[0]
    magnitude = tau.abs()  # (n, B)
    bins = (magnitude.view(torch.int32) >> 16).to(torch.int64)  # (n, B) in [0, 2^15)
    index = (bins + torch.arange(n, device=tau.device).view(n, 1) * MAGNITUDE_BINS).reshape(-1)  # (n * B,)
    size = n * MAGNITUDE_BINS
    m64 = magnitude.reshape(-1).to(torch.float64)  # (n * B,)
    counts = torch.bincount(index, minlength=size)
    l1 = torch.bincount(index, weights=m64, minlength=size)
    l2 = torch.bincount(index, weights=m64 * m64, minlength=size)
    return counts.view(n, -1), l1.view(n, -1), l2.view(n, -1)


def kept_mask(tau: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(n, B) bool: the entries model t keeps (its top-k); exact zeros never count as kept,
    since a trimmed zero votes for no sign and is never averaged in."""
    return (tau.abs() >= ops.broadcast_per_model(thresholds, tau)) & (tau != 0)


def sign_pattern_codes(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(B,) int64: each entry's sign pattern sum_t state_t * 3^t (state 0 not kept, 1 kept
    positive, 2 kept negative)."""
    n = tau.shape[0]
    state = kept.to(torch.int64) * torch.where(tau > 0, 1, 2)  # (n, B) in {0, 1, 2}
    powers = (3 ** torch.arange(n, dtype=torch.int64, device=tau.device)).view(n, 1)  # (n, 1)
    return (state * powers).sum(0)


def pattern_signs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """For every one of the 3^n patterns, bit masks of the models kept positive and kept negative."""
    codes = np.arange(3**n, dtype=np.int64)
    positive = np.zeros(3**n, dtype=np.int64)
    negative = np.zeros(3**n, dtype=np.int64)
    for t in range(n):
        state = (codes // 3**t) % 3
        positive |= (state == 1).astype(np.int64) << t
        negative |= (state == 2).astype(np.int64) << t
    return positive, negative


def subset_conflicts(pattern_counts: np.ndarray, signs: tuple[np.ndarray, np.ndarray], subset: tuple[int, ...]
                     ) -> dict[str, int]:
    """Counts, over every entry, for the models in ``subset``:

    ``conflicts``: entries where the subset's kept values hold both signs;
    ``kept_by_two_or_more``: entries kept by at least two of the subset's models (the only
    entries where a conflict is possible);
    ``kept_by_any``: entries kept by at least one.
    """
    positive, negative = signs
    mask = sum(1 << t for t in subset)
    pos, neg = positive & mask, negative & mask
    kept = pos | neg
    two = (kept & (kept - 1)) != 0  # at least two bits set
    return {"conflicts": int(pattern_counts[(pos != 0) & (neg != 0)].sum()),
            "kept_by_two_or_more": int(pattern_counts[two].sum()),
            "kept_by_any": int(pattern_counts[kept != 0].sum())}


def tensor_conflicts(tau: torch.Tensor, kept: torch.Tensor) -> dict[str, int]:
    """For all n models at once: entries with kept values of both signs, and entries kept by >= 2."""
    positive = (kept & (tau > 0)).any(0)  # (B,)
    negative = (kept & (tau < 0)).any(0)  # (B,)
    return {"conflicts": int((positive & negative).sum()),
            "kept_by_two_or_more": int((kept.sum(0) >= 2).sum())}


def mask_intersections(kept: torch.Tensor) -> torch.Tensor:
    """(n, n) int64: entries kept by both model s and model t (the diagonal: kept by t)."""
    k = kept.to(torch.float32)  # (n, B); the block is small enough for exact float32 counts
    return (k @ k.T).round().to(torch.int64)


def kept_mass(tau: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) float64 each: the L1 mass and squared L2 mass of each model's kept entries."""
    magnitude = (tau.abs() * kept).to(torch.float64)  # (n, B)
    return magnitude.sum(1), (magnitude * magnitude).sum(1)


def merge_variants(tau: torch.Tensor, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """The merged task vector of one block, (B,) each, by the four merges the paper's Fig. 6
    compares (unit weights, lambda 1):

    averaging: the plain mean of the n task vectors;
    trim + disjoint mean: the mean of the kept values, whatever their signs (no election);
    elect + disjoint mean: the sign elected from the untrimmed vectors, the mean of the values
    that agree with it (no trimming);
    TIES: trim, elect, disjoint mean.
    """
    trimmed = tau * kept  # (n, B)
    count = kept.sum(0, dtype=torch.float32)  # (B,)
    trim_mean = trimmed.sum(0) / count.clamp_min(1)  # (B,); 0 where nothing is kept
    elect_mean = ops.disjoint_aggregate(tau, ops.elect(tau, None, "mass"), None, "mean")
    ties = ops.disjoint_aggregate(trimmed, ops.elect(trimmed, None, "mass"), None, "mean")
    return dict(zip(VARIANTS, (tau.mean(0), trim_mean, elect_mean, ties)))


def influence_groups(kept: torch.Tensor) -> torch.Tensor:
    """(B,) int64: how many models find the entry influential (keep it), capped at 2 (">1")."""
    return kept.sum(0).clamp_max(2).to(torch.int64)


def agreement_groups(tau: torch.Tensor) -> torch.Tensor:
    """(B,) int64: j = the larger of the numbers of positive and negative task-vector values;
    sign agreement is j / n (0.5 ... 1.0 when no value is exactly 0)."""
    positive = (tau > 0).sum(0)
    negative = (tau < 0).sum(0)
    return torch.maximum(positive, negative).to(torch.int64)


def group_moments(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(3, n_groups) float64: per group, the count, the sum of |values| and the sum of values^2
    (mean and standard deviation of the magnitude follow from them)."""
    magnitude = values.abs().to(torch.float64)
    return torch.stack([torch.bincount(groups, minlength=n_groups).to(torch.float64),
                        torch.bincount(groups, weights=magnitude, minlength=n_groups),
                        torch.bincount(groups, weights=magnitude * magnitude, minlength=n_groups)])


def topk_mass_share(counts: np.ndarray, mass: np.ndarray, keep: int) -> float:
    """Share of one model's total mass held by its ``keep`` largest |tau|, from its magnitude
    histogram (``counts``, ``mass``: (2^16,) as from :func:`magnitude_histograms`).

    Bins above the k-th largest value count whole; the bin holding it counts pro rata, so the
    answer is exact up to the spread of magnitudes inside that one bin (relative width 2^-7).
    """
    total = float(mass.sum())
    if total == 0 or keep <= 0:
        return 0.0
    at_or_above = np.cumsum(counts[::-1])[::-1]  # (2^16,) entries in bins >= b
    holding = int(np.nonzero(at_or_above >= keep)[0].max()) if (at_or_above >= keep).any() else 0
    above = int(at_or_above[holding] - counts[holding])  # entries in bins strictly above
    mass_above = float(mass[holding + 1:].sum())
    partial = mass[holding] * min(1.0, (keep - above) / counts[holding]) if counts[holding] else 0.0
    return min(1.0, (mass_above + float(partial)) / total)
