"""Weights whose divisor can nearly cancel: what scale a weighted merge can reach, said before it runs.

A weighted mean divides by a sum of weights. Where the weights have opposite signs that sum can be near 0 and the
"mean" lies far past every model; mergekit's rule divides a sum of exactly 0 by 1. The executor calls
:func:`warn_if_weights_cancel` once per merge, beside its other warnings about scales (``LARGE_LAM``).
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

from ..errors import MergeWarning

LARGE_LAM = 100.0  # a scale of the merged task vector no merge means (tune's grids stop at 3.0)


def _mean_amplification(weights: Sequence[float]) -> float | None:
    """How many times a weighted mean over the models that agree in sign can exceed the largest task vector entry:
    max over subsets S of Σ_S |w_i| / |Σ_S w_i|, the divisor as the merge computes it: float32 weights summed in
    float32, a sum of 0 divided by 1, as mergekit does (hp87b c77: 1, -0.999999999 were said "2e+09 times" from the
    exact sum, where float32's is 0 and the merge moved 1.4 times). 1 for weights of one sign. Under 16 models every
    subset in the models' order, as torch adds them (float32_sum); from 16 on, subsets counted by how many of each
    distinct weight they hold while those are at most 16,384 (twelve 1s and a -1 are 26, hp84a c51), their divisor
    the float32 of the float32 weights' sum; past that a bound where one exists, else None, unbounded as far as is
    known (a subset summing near 0 is a subset-sum search: hp80a c03)."""
    import numpy as np

    w32 = np.asarray(weights, dtype=np.float32)  # (n,): the merge's weights tensor
    if len(weights) < 16:
        n = len(weights)
        held = (np.arange(1, 1 << n)[:, None] >> np.arange(n)) & 1  # (2^n - 1, n): every non-empty subset
        total = np.zeros(len(held), dtype=np.float32)
        for i in range(n):  # in the models' order, rounded to float32 at each step, as torch's reduction adds them
            total = (total + np.where(held[:, i] == 1, w32[i], np.float32(0))).astype(np.float32)
        mass = (held * np.abs(w32.astype(np.float64))).sum(axis=1)
        divisor = np.where(total == 0, 1.0, np.abs(total.astype(np.float64)))
        return max(1.0, float((mass / divisor).max()))
    counts = Counter(float(v) for v in w32)
    if math.prod(c + 1 for c in counts.values()) > 1 << 14:  # a bound, where one sign's smallest weight outweighs the
        # other sign's whole mass (hp81a c02: twelve 1s and a -0.001 were said "without bound"): a subset holding
        # some of it sums at least that difference
        positive, negative = [w for w in weights if w > 0], [-w for w in weights if w < 0]
        for few, many in ((positive, negative), (negative, positive)):
            if few and min(few) > sum(many):
                return max(1.0, (min(few) + sum(many)) / (min(few) - sum(many)))
        return None
    worst = 1.0
    values = list(counts)
    for taken in itertools.product(*(range(counts[v] + 1) for v in values)):
        if any(taken):  # k copies of a weight v as k·v: 16,383 models of one weight are 16,384 short sums
            total = float(np.float32(math.fsum(v * k for v, k in zip(values, taken))))
            mass = math.fsum(abs(v) * k for v, k in zip(values, taken))
            worst = max(worst, mass / (abs(total) if total else 1.0))
    return worst


def warn_if_weights_cancel(method: Any, lam: float, weights: Sequence[float]) -> None:
    """Weights of opposite signs where a divisor sums them: under an elected weighted mean (ties, dare_ties, della,
    breadcrumbs_ties with aggregate mean) the agreeing models' weights, and (1000, -1000) multiplied the task vectors
    by 1000, silently (hp79a c30); under a normalized linear merge (task_arithmetic, dare_linear, della_linear,
    breadcrumbs with normalize) all of them (1, -0.999: 1000 times, hp80a c21). Negative weights alone under an
    elected mean change nothing: the division by the agreeing weights undoes their sign (hp80a c25)."""
    elected = hasattr(method, "elect") and getattr(method, "aggregate", None) == "mean"
    if not elected and not (getattr(method, "normalize_weights", False) and method.name != "average"):
        return  # average says its own (_warn_if_far); sums without a divisor scale by the weights themselves
    negative = [w < 0 for w in weights]
    shown = _shown(weights)
    if not any(negative):
        return
    if all(negative) and not elected:  # the division by their sum gives the positive weights' merge exactly: said,
        # as the elected mean's case is (hp88a c70: weights -1, -2 merged as 1, 2 without a word)
        warnings.warn(MergeWarning(
            f"{method.name}: every weight is negative ({shown}), and normalize_weights divides the weighted sum by "
            "the weights' sum, which undoes their sign: the merge is the one with the weights' magnitudes; to "
            "subtract task vectors, turn normalize_weights off"), stacklevel=3)
        return
    if elected:  # what a negative weight does under an elected mean, said once per merge
        listed = [str(k) for k, n in enumerate(negative) if n]
        models = f"{method.name}: model(s) {', '.join(listed[:8])}{', ...' if len(listed) > 8 else ''}"
        if getattr(method, "sign_from", None) is not None:
            # the sign is the reference's, not elected from the weighted task vectors, so a weight's sign is not
            # undone: w·τ agrees with the reference where τ opposes it (hp84a c32: said to change nothing, the merge
            # kept the entries that oppose the reference, 23% agreeing with it)
            warnings.warn(MergeWarning(
                f"{models} have a negative weight ({shown}); with sign_from, an entry is kept where the weighted task "
                "vector agrees with the reference's sign, so a negative weight keeps that model's entries that oppose "
                "the reference (and the mean's division by the weights leaves them opposed in the merge): give "
                "positive weights to follow the reference"), stacklevel=3)
        elif all(negative):
            warnings.warn(MergeWarning(
                f"{method.name}: every weight is negative ({shown}), and the weighted mean divides by the agreeing "
                "weights' sum, which undoes their sign: negative weights do not negate task vectors here (the merge "
                "is the one with the weights' magnitudes, but where the sign vote ties and zero_sign decides); to "
                "subtract task vectors, use task_arithmetic with negative weights"), stacklevel=3)
        else:  # among positive ones, undone where its model's entry is elected alone: that model's own task vector,
            # added, not subtracted (hp85a c23: no word)
            warnings.warn(MergeWarning(
                f"{models} have a negative weight ({shown}), and the weighted mean divides by the agreeing weights' "
                "sum, which undoes a weight's sign: where such a model's entry is elected alone, the merge keeps its "
                "own task vector (added, not subtracted); to subtract task vectors, use task_arithmetic with negative "
                "weights"), stacklevel=3)
        if all(negative):
            return  # one sign: no divisor can cancel
        # weights of both signs can also nearly cancel in the divisor, with sign_from too (hp86a c08: 1, -0.999
        # reached 940 times, said only as "can also nearly cancel")
        amplification = _mean_amplification(weights)
        where = ("where the weighted task vectors agree in sign, their weights can nearly cancel in the mean's "
                 "divisor (summed in float32; a sum of 0 divides by 1, as mergekit does)")
    else:  # the divisor the merge uses: torch's float32 sum, 1 below mergekit's cut (hp82a c87: an exact sum of 56
        # was said where the merge divided by float32's 48)
        from ..methods.ops import float32_sum

        total = float32_sum(weights)
        amplification = math.fsum(abs(w) for w in weights) / (abs(total) if abs(total) >= 1e-8 else 1.0)
        where = "the weights nearly cancel in the divisor that normalizes them" + (
            f" (they sum to 0 as written, but to {total:.3g} in float32, in which the merge divides: over mergekit's "
            "cut of 1e-8)" if math.fsum(weights) == 0 and total else "")  # (hp83a c23: the cause unsaid)
    if amplification is not None and abs(lam) * amplification <= LARGE_LAM:
        return
    scale = (f"which scales the merged task vector up to {abs(lam) * amplification:.4g} times" if amplification
             is not None else f"which with {len(weights)} models can scale the merged task vector without bound")
    warnings.warn(MergeWarning(
        f"{method.name}: weights of opposite signs ({shown}): {where}, {scale}, far past every model; give weights "
        "of one sign (to subtract a task vector, use task_arithmetic with a negative weight, unnormalized)"),
        stacklevel=3)


def _shown(weights: Sequence[float]) -> str:
    """The weights as the warning names them: each to 10 digits (-1.0000001 printed as -1 read as a sum of 0, hp81a
    c04); past 8, the models of the rarer sign by number (the first 8 of twelve 1s and a -0.001 showed no negative
    weight, c24)."""
    if len(weights) <= 8:
        return ", ".join(f"{w:.10g}" for w in weights)
    negative = [k for k, w in enumerate(weights) if w < 0]
    positive = [k for k, w in enumerate(weights) if w > 0]
    rare, sign = (negative, "negative") if len(negative) <= len(positive) else (positive, "positive")
    listed = ", ".join(f"model {k}: {weights[k]:.10g}" for k in rare[:8]) + (", ..." if len(rare) > 8 else "")
    return f"{len(weights)} weights, {len(rare)} {sign}: {listed}"
