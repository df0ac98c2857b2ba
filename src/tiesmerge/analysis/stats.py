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

from dataclasses import dataclass

import numpy as np
import torch

from ..methods import ops

__all__ = [
    "MAX_MODELS",
    "MAGNITUDE_BINS",
    "magnitude_counts",
    "bin_midpoints",
    "kept_mask",
    "sign_pattern_codes",
    "PatternTables",
    "pattern_tables",
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


def magnitude_counts(tau: torch.Tensor) -> torch.Tensor:
    """(n, 2^16) int64: per model, how many |tau| fall in each magnitude bin.

    A bin is the high 16 bits of |tau|'s float32 bit pattern: non-negative floats order like
    their bits, so bins are ordered by magnitude and one bin spans a relative width of 2^-7.
    These are exactly the counts of the radix select's first pass.
    """
    n = tau.shape[0]
    bins = (tau.abs().view(torch.int32) >> 16).to(torch.int64)  # (n, B) in [0, 2^15)
    index = bins + torch.arange(n, device=tau.device).view(n, 1) * MAGNITUDE_BINS  # (n, B)
    return torch.bincount(index.reshape(-1), minlength=n * MAGNITUDE_BINS).view(n, MAGNITUDE_BINS)


def bin_midpoints() -> np.ndarray:
    """(2^16,) float64: the middle of each magnitude bin's range (its lower edge where the upper
    one is not finite); a bin's mass is its count times this, to within half the bin's width."""
    edges = (torch.arange(MAGNITUDE_BINS + 1, dtype=torch.int64) << 16).to(torch.int32)  # 2^31 wraps: sign bit
    values = edges.view(torch.float32).double().numpy()
    low, high = values[:-1], values[1:]
    with np.errstate(invalid="ignore"):  # the Inf and NaN bit patterns at the top
        mid = np.where(np.isfinite(high) & (high > low), (low + high) / 2, low)
    return np.where(np.isfinite(mid), mid, 0.0)  # they weigh nothing (inputs are checked finite)


def kept_mask(tau: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(n, B) bool: the entries model t keeps (its top-k); exact zeros never count as kept,
    since a trimmed zero votes for no sign and is never averaged in."""
    return (tau.abs() >= ops.broadcast_per_model(thresholds, tau)) & (tau != 0)


def sign_pattern_codes(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(B,) int64: each entry's sign pattern sum_t state_t * 3^t (state 0 not kept, 1 kept
    positive, 2 kept negative)."""
    n = tau.shape[0]
    # int32 arithmetic: 3^12 fits, and it halves the temporaries of the widest step
    state = kept.to(torch.int32) + (kept & (tau < 0)).to(torch.int32)  # (n, B) in {0, 1, 2}
    powers = (3 ** torch.arange(n, dtype=torch.int32, device=tau.device)).view(n, 1)  # (n, 1)
    return (state * powers).sum(0, dtype=torch.int64)


@dataclass(frozen=True)
class PatternTables:
    """Per sign pattern (index = code, 3^n of them): which models keep it positive and negative
    (bit masks), how many keep it, and whether all n models' kept values conflict."""

    positive: np.ndarray  # (3^n,) int64 bit masks
    negative: np.ndarray  # (3^n,) int64 bit masks
    kept_count: torch.Tensor  # (3^n,) int64
    conflict: torch.Tensor  # (3^n,) bool: both signs among the kept values of all n models


def pattern_tables(n: int, device: torch.device | str = "cpu") -> PatternTables:
    codes = np.arange(3**n, dtype=np.int64)
    positive = np.zeros(3**n, dtype=np.int64)
    negative = np.zeros(3**n, dtype=np.int64)
    count = np.zeros(3**n, dtype=np.int64)
    for t in range(n):
        state = (codes // 3**t) % 3
        positive |= (state == 1).astype(np.int64) << t
        negative |= (state == 2).astype(np.int64) << t
        count += state > 0
    conflict = (positive != 0) & (negative != 0)
    return PatternTables(positive, negative, torch.from_numpy(count).to(device), torch.from_numpy(conflict).to(device))


def subset_conflicts(pattern_counts: np.ndarray, tables: PatternTables, subset: tuple[int, ...]) -> dict[str, int]:
    """Counts, over every entry, for the models in ``subset``:

    ``conflicts``: entries where the subset's kept values hold both signs;
    ``kept_by_two_or_more``: entries kept by at least two of the subset's models (the only
    entries where a conflict is possible);
    ``kept_by_any``: entries kept by at least one.
    """
    mask = sum(1 << t for t in subset)
    pos, neg = tables.positive & mask, tables.negative & mask
    kept = pos | neg
    two = (kept & (kept - 1)) != 0  # at least two bits set
    return {"conflicts": int(pattern_counts[(pos != 0) & (neg != 0)].sum()),
            "kept_by_two_or_more": int(pattern_counts[two].sum()),
            "kept_by_any": int(pattern_counts[kept != 0].sum())}


def tensor_conflicts(pattern_counts: torch.Tensor, tables: PatternTables) -> dict[str, int]:
    """From a block's pattern histogram (3^n,), for all n models at once: entries with kept
    values of both signs, and entries kept by >= 2."""
    return {"conflicts": int(pattern_counts[tables.conflict].sum()),
            "kept_by_two_or_more": int(pattern_counts[tables.kept_count >= 2].sum())}


def mask_intersections(kept: torch.Tensor) -> torch.Tensor:
    """(n, n) int64: entries kept by both model s and model t (the diagonal: kept by t)."""
    k = kept.to(torch.float32)  # (n, B); the block is small enough for exact float32 counts
    return (k @ k.T).round().to(torch.int64)


def kept_mass(tau: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(4, n) float64: per model, the L1 mass and squared L2 mass of its kept entries, then of
    all its entries. (In float64: a square of a float32 value past 1.8e19 is Inf in float32.)"""
    magnitude = tau.abs().double()  # (n, B)
    kept_magnitude = magnitude * kept
    return torch.stack([kept_magnitude.sum(1), kept_magnitude.square().sum(1), magnitude.sum(1),
                        magnitude.square().sum(1)])


def merge_variants(tau: torch.Tensor, kept: torch.Tensor) -> dict[str, torch.Tensor]:
    """The merged task vector of one block, (B,) each, by the four merges the paper's Fig. 6
    compares (unit weights, lambda 1):

    averaging: the plain mean of the n task vectors;
    trim + disjoint mean: the mean of the kept values, whatever their signs (no election);
    elect + disjoint mean: the sign elected from the untrimmed vectors, the mean of the values
    that agree with it (no trimming);
    TIES: trim, elect, disjoint mean.

    In float64: the sums inside the means overflow float32 for values near its limit (±3e38 models reported nan
    means and stds, hp39 C32), and a float64 mean of float32 values is finite.
    """
    tau = tau.double()  # (n, B)
    trimmed = tau * kept  # (n, B)
    count = kept.sum(0, dtype=torch.float64)  # (B,)
    trim_mean = trimmed.sum(0) / count.clamp_min(1)  # (B,); 0 where nothing is kept
    elect_mean = ops.disjoint_aggregate(tau, ops.elect(tau, None, "mass"), None, "mean")
    ties = ops.disjoint_aggregate(trimmed, ops.elect(trimmed, None, "mass"), None, "mean")
    return dict(zip(VARIANTS, (tau.mean(0), trim_mean, elect_mean, ties)))


def influence_groups(codes: torch.Tensor, tables: PatternTables) -> torch.Tensor:
    """(B,) int64: how many models find the entry influential (keep it), capped at 2 (">1")."""
    return tables.kept_count[codes].clamp_max(2)


def agreement_groups(tau: torch.Tensor) -> torch.Tensor:
    """(B,) int64: j = the larger of the numbers of positive and negative task-vector values;
    sign agreement is j / n (0.5 ... 1.0 when no value is exactly 0)."""
    positive = (tau > 0).sum(0)
    negative = (tau < 0).sum(0)
    return torch.maximum(positive, negative).to(torch.int64)


def group_moments(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """(3, V, n_groups) float64: for each of V rows of ``values`` (V, B) and each group, the
    count, the sum of |values| and the sum of values^2 (mean and standard deviation of the
    magnitude follow from them). ``groups``: (B,) int64 in [0, n_groups)."""
    # in float64: a square of a float32 value past 1.8e19 is Inf in float32
    one_hot = torch.zeros(values.shape[1], n_groups, dtype=torch.float64, device=values.device)  # (B, G)
    one_hot.scatter_(1, groups.view(-1, 1), 1.0)
    magnitude = values.abs().double()  # (V, B)
    sums = torch.cat([magnitude, magnitude.square()]) @ one_hot  # (2V, G): one matmul for every variant
    counts = one_hot.sum(0).expand(values.shape[0], n_groups)  # (V, G)
    return torch.stack([counts, *sums.view(2, values.shape[0], n_groups)]).to(torch.float64)


def topk_mass_share(counts: np.ndarray, mass: np.ndarray, keep: int) -> float:
    """Share of one model's total mass held by its ``keep`` largest |tau|, from its magnitude
    histogram: ``counts`` (2^16,) from :func:`magnitude_counts`, ``mass`` (2^16,) each bin's
    mass (e.g. counts x midpoint for L1, counts x midpoint^2 for L2).

    Bins above the k-th largest value count whole; the bin holding it counts pro rata.
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
