"""Named tensor operations that the merge methods compose. Pure math, no I/O.

Shapes: ``tau`` is the stack of task-vector chunks, ``(n, *S)`` float32, one row per model;
every function returns ``(*S)`` or ``(n, *S)`` as stated. ``weights`` is ``(n,)`` float32.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

from ..lazy import torch

__all__ = [
    "keep_count",
    "broadcast_per_model",
    "trim_at",
    "trim_sorted_k",
    "elect",
    "resolve_zero_sign",
    "disjoint_aggregate",
    "hash_uniform",
    "as_float32",
    "dare_drop",
    "dare_keep_from",
    "dare_keep_probability",
    "draw_keep_probability",
    "sign",
]


def float32_sum(values: tuple[float, ...] | list[float]) -> float:
    """The float32 sum torch computes for a float32 vector, e.g. mergekit's ``weight.sum()``; a fused kernel's
    divisor must be these bits. Under 16 entries torch adds from 0, in order (done here without torch); from 16 on
    it keeps several partial sums, so torch itself is asked (hp82a c87: a sequential sum of 0 warned "divides by
    1" where the merge divided by torch's 48)."""
    if len(values) >= 16:
        import torch

        return float(torch.tensor(list(values), dtype=torch.float32).sum())
    import struct

    def f32(x: float) -> float:
        return struct.unpack("f", struct.pack("f", x))[0]

    total = 0.0
    for v in values:
        total = f32(total + f32(v))  # the float32 operands' sum, exact in a double, rounded once
    return total


def keep_count(numel: int, density: float) -> int:
    """How many entries of a trim scope of ``numel`` entries survive at ``density``.

    ``floor(density * numel)`` in exact rational arithmetic (``density`` as written, so
    0.29 of 100 keeps 29, where the float product would give 28).

    >>> keep_count(100, 0.29)
    29
    """
    return min(numel, math.floor(Fraction(repr(float(density))) * numel))


def broadcast_per_model(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``(n,)`` -> ``(n, 1, ..., 1)`` so it broadcasts against ``like`` of shape ``(n, *S)``."""
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


def trim_at(tau: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero, in place, every entry of model t with ``|tau| < thresholds[t]``; return ``tau``.

    Entries equal to the threshold are kept (ties are kept, so the result does not depend on
    the order of the entries). A threshold of +inf keeps nothing.
    tau: (n, *S); thresholds: (n,).
    """
    keep = tau.abs() >= broadcast_per_model(thresholds, tau)  # (n, *S) bool
    return tau.mul_(keep)


def trim_sorted_k(tau: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Keep exactly ``keep[t]`` entries of model t, the first ``keep[t]`` of its entries sorted
    by descending |tau| with ``torch.argsort`` (mergekit's magnitude trim, ties at the threshold
    in the sort's own order); zero the rest, in place; return ``tau``.

    Entries equal to the threshold are chosen by the sort, so which of them survive is torch's
    choice, not a property of the values: use this only to reproduce mergekit.
    tau: (n, *S), the whole trim scope; keep: (n,).
    """
    flat = tau.reshape(tau.shape[0], -1)  # (n, numel), a view
    for t in range(flat.shape[0]):
        mask = torch.zeros(flat.shape[1], dtype=flat.dtype, device=flat.device)  # (numel,)
        mask[torch.argsort(flat[t].abs(), descending=True)[: int(keep[t])]] = 1
        flat[t].mul_(mask)
    return tau


def resolve_zero_sign(gamma: torch.Tensor, zero_sign: str, majority: float | None = None) -> torch.Tensor:
    """Give entries whose elected sign is exactly 0 the sign ``zero_sign`` asks for, in place.

    ``zero``: stay 0 (the paper: nothing is elected, the merged value is 0).
    ``positive``: +1 (PEFT, mergekit).
    ``majority``: ``majority``, the sign of the sum of elected signs over the whole trim scope
    (the authors' code); the engine computes it in a reduction pass.
    """
    if zero_sign == "zero":
        return gamma
    fill = 1.0 if zero_sign == "positive" else majority
    if fill is None:
        raise ValueError("zero_sign='majority' needs the scope's majority sign")
    return gamma.masked_fill_(gamma == 0, fill)


def elect(trimmed: torch.Tensor, weights: torch.Tensor | None, rule: str) -> torch.Tensor:
    """Elected sign per entry, in {-1, 0, +1}: ``(n, *S) -> (*S)``.

    ``mass``: sgn(sum_t w_t tau_t), the sign with the larger total magnitude (paper).
    ``count``: sgn(sum_t w_t sgn(tau_t)), the majority of signs (PEFT's "frequency").
    """
    votes = trimmed if rule == "mass" else trimmed.sign()
    if weights is not None:
        votes = votes * broadcast_per_model(weights, votes)
    return votes.sum(dim=0).sign_()


def agreeing(trimmed: torch.Tensor, gamma: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Each model's weighted values that agree with ``gamma`` (others 0): ``(n, *S) -> (n, *S)``,
    the per-task vectors whose sum is ``disjoint_aggregate(..., "sum")`` (AdaMerging++'s vectors)."""
    weighted = trimmed if weights is None else trimmed * broadcast_per_model(weights, trimmed)
    return weighted * ((weighted.sign() == gamma) & (weighted != 0))


def disjoint_aggregate(
    trimmed: torch.Tensor, gamma: torch.Tensor, weights: torch.Tensor | None, aggregate: str
) -> torch.Tensor:
    """Aggregate, per entry, only the non-zero values whose sign equals ``gamma``: ``(n, *S) -> (*S)``.

    ``mean``: sum_{t in A} w_t tau_t / sum_{t in A} w_t, A = models whose weighted value
    w_t tau_t agrees with gamma (paper: weights 1); zeros never count and an entry with no
    agreeing value is 0; where the agreeing weights sum to 0 (negative weights) the sum is
    divided by 1, as mergekit does. Agreement is judged on the weighted value, the same quantity the
    election summed, so a negative weight votes and agrees consistently (as mergekit does).
    ``sum``: sum_{t in A} w_t tau_t (FusionBench's default).
    ``max``: gamma * max_{t in A} |w_t tau_t|.
    """
    w = None if weights is None else broadcast_per_model(weights, trimmed)
    weighted = trimmed if w is None else trimmed * w  # (n, *S)
    agree = (weighted.sign() == gamma) & (weighted != 0)  # (n, *S)
    selected = weighted * agree  # (n, *S)
    if aggregate == "sum":
        return selected.sum(dim=0)
    if aggregate == "max":
        return selected.abs().amax(dim=0).mul_(gamma)
    total = selected.sum(dim=0)
    denom = agree.sum(dim=0, dtype=trimmed.dtype) if w is None else (agree * w).sum(dim=0)
    # a zero sum of agreeing weights divides by 1, as mergekit does: with no agreeing value the total is 0 anyway,
    # and agreeing models of weights +w and −w (their weighted values agree) keep their sum, not 0 (hp37b M02)
    return total.div_(denom.masked_fill_(denom == 0, 1.0))


_MASK32 = 0xFFFFFFFF


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def hash_uniform(seed: int, stream: int, offset: int, numel: int, device: torch.device | str) -> torch.Tensor:
    """``numel`` uniform floats in [0, 1) for flat positions ``offset .. offset+numel-1``.

    Counter-based: the value at a position depends only on (seed, stream, position), never on
    how the tensor is chunked or on the device, so a row-chunked merge on CPU and a whole-tensor
    merge on a GPU drop exactly the same entries.
    """
    key = _fmix32(torch.tensor([(seed * 0x9E3779B1 + stream) & _MASK32], dtype=torch.int64, device=device))
    pos = torch.arange(offset, offset + numel, dtype=torch.int64, device=device)
    x = _fmix32(((pos & _MASK32) ^ key) & _MASK32)
    x = _fmix32((x + (pos >> 32) * 0x27D4EB2F + key) & _MASK32)
    # the top 24 bits: float32 holds k * 2^-24 exactly, so the result stays below 1 (rounding
    # x * 2^-32 to float32 gives 1.0 for the 128 largest hashes)
    return (x >> 8).to(torch.float32).mul_(2.0**-24)


DRAW_STEPS = 1 << 24  # hash_uniform's values: k * 2^-24, k = 0 .. 2^24 - 1


def as_float32(value: float) -> float:
    """``value`` rounded to float32, as torch rounds a Python float compared with a float32 tensor."""
    return struct.unpack("f", struct.pack("f", value))[0]


def dare_keep_from(drop_rate: float) -> int:
    """The least k whose uniform k * 2^-24 is kept (u >= drop_rate, the rate rounded to float32 as torch compares a
    Python float with a float32 tensor): k >= ceil(float32(drop_rate) * 2^24), an integer test."""
    return min(max(math.ceil(as_float32(drop_rate) * DRAW_STEPS), 0), DRAW_STEPS)


def dare_keep_probability(drop_rate: float) -> float:
    """The probability that DARE's draw keeps an entry: (2^24 - keep_from) / 2^24, which is 1 - drop_rate up to the
    draw's step of 2^-24. Kept entries are rescaled by its inverse, so the merge is unbiased at every rate (1 / (1 -
    drop_rate) scaled them 2x too much where the step rounds the keep probability from 3e-8 up to 6e-8: hp77a c02)."""
    return (DRAW_STEPS - dare_keep_from(drop_rate)) / DRAW_STEPS


def dare_drop(tau: torch.Tensor, drop_rate: float, uniforms: torch.Tensor) -> torch.Tensor:
    """DARE (Yu et al. 2023): drop each entry with probability ``drop_rate``, rescale the rest
    by 1 / P(keep) (:func:`dare_keep_probability`, 1 / (1 - drop_rate) up to the draw's step)
    so the expected task vector is unchanged. In place on ``tau``.

    tau: (n, *S); uniforms: (n, *S) from :func:`hash_uniform`.
    """
    kept = dare_keep_probability(drop_rate)
    if kept == 0.0:  # a rate that rounds to 1 in float32 (refused by the option's check): nothing kept
        return tau.zero_()
    keep = uniforms >= drop_rate
    return tau.mul_(keep).mul_(1.0 / kept)


def draw_keep_probability(probs: torch.Tensor) -> torch.Tensor:
    """(*S) float32 keep probabilities p -> the probability that ``uniforms < p`` keeps an entry with
    :func:`hash_uniform`'s uniforms: ceil(p * 2^24) / 2^24 (exact in float32), p up to the draw's step."""
    return torch.ceil(probs * DRAW_STEPS).clamp_(max=DRAW_STEPS).div_(DRAW_STEPS)


def sign(total: torch.Tensor) -> torch.Tensor:
    """sgn of a reduction's total (TIES's majority sign: the sign of the summed elected signs)."""
    return total.sign()
