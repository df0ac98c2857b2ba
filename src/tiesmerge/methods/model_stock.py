"""Model Stock (Jang, Yun & Han, ECCV 2024): move from the base toward the fine-tunes' average by
t = k cos / (1 + (k - 1) cos), cos the angle between the fine-tunes' task vectors, per tensor."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..errors import ConfigError, InvalidTensorError, MergeWarning
from ..lazy import torch
from .base import ChunkContext, Requirements, TensorKernel, method_config, option

if TYPE_CHECKING:
    from ..engine.whole import Reductions


@method_config
class ModelStock:
    """theta = t * mean_t(theta_t) + (1 - t) * theta_0, t = k cos / (1 + (k - 1) cos) per tensor
    (per row with ``filter_wise``), cos the mean over pairs of fine-tunes of the cosine between
    their task vectors (each clamped to [-1, 1], norms' product at least 1e-6), k the number of
    fine-tunes; where 1 + (k - 1) cos is below 1e-6 in magnitude, t = 0 (the base).

    Follows mergekit 0.1.5's ``model_stock`` operation for operation (float32, bit for bit; the
    models' own values are averaged). The paper defines the angle for two fine-tunes; the mean
    of pairwise cosines for more is mergekit's choice. Needs at least two fine-tuned models.
    """

    name: ClassVar[str] = "model_stock"
    paper: ClassVar[str] = "https://arxiv.org/abs/2403.19522"
    summary: ClassVar[str] = "interpolate base and fine-tunes' average by the angle between the fine-tunes"

    filter_wise: bool = option(False, "one t per row (output filter) instead of per tensor (mergekit's filter_wise)",
                               grid=(False, True))

    def requirements(self) -> Requirements:
        # per tensor: the fused engine (the same reductions on the same float32 values, one pass over the raw rows)
        kernel = None if self.filter_wise else TensorKernel("stock", self._coefficients)
        return Requirements(whole_tensors=True, base_values=True, model_values=True, kernel=kernel)

    def _coefficients(self, name: str, reductions: Reductions) -> tuple[float, float]:
        """The fused pass's (t, 1 - t) for one tensor, from its task vectors' reductions (engine.whole)."""
        k = len(reductions.operands)
        if k < 2:
            raise ConfigError(f"model_stock needs at least two fine-tuned models, got {k}",
                              hint="list two or more models besides the base")
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        dots = dict(zip(pairs, reductions.pair_sums(pairs), strict=True))  # in one pass of the kernels
        norms = [reductions.norms(i)[0] for i in range(k)]
        if any(np.isinf(n) for n in norms):  # a NaN norm is a NaN value, refused as such where the values are checked
            raise _norm_overflow(name)
        t = interpolation_f32(norms, lambda i, j: dots[(i, j)], reductions.numerics.sum,
                              on_singular=lambda: _warn_opposite(name))
        _warn_if_extrapolating(name, len(norms), float(t))
        return float(t), float(np.float32(1) - t)

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """tau, ctx.models (k, *S), ctx.base (*S) -> the merged model's values (*S)."""
        k = tau.shape[0]
        if k < 2:
            raise ConfigError(f"model_stock needs at least two fine-tuned models, got {k}",
                              hint="list two or more models besides the base")
        shape = ctx.base.shape

        def lift(x: torch.Tensor) -> torch.Tensor:
            """Rows the angle is taken over: the whole tensor, or each row (a vector is one row)."""
            if not self.filter_wise:
                return x.reshape(-1)
            return x.unsqueeze(0) if x.dim() == 1 else x

        w0 = lift(ctx.base)
        ws = [lift(ctx.models[i]) for i in range(k)]
        offsets = [lift(tau[i]) for i in range(k)]  # theta_t - theta_0, as mergekit subtracts them
        lengths = [torch.norm(offset, dim=-1) for offset in offsets]  # (...) each, once
        if any(bool(torch.isinf(n).any()) for n in lengths):  # a NaN norm is a NaN value, refused as such
            raise _norm_overflow(ctx.name)
        t = interpolation_from(lengths, lambda i, j: (offsets[i] * offsets[j]).sum(dim=-1),
                               on_singular=lambda: _warn_opposite(ctx.name))
        if self.filter_wise and t.numel() > 1:  # one t per row: how many rows extrapolate, not one row as the tensor's
            _warn_rows_extrapolating(k, t.reshape(-1))
        else:
            _warn_if_extrapolating(ctx.name, k, float(t.min()), float(t.max()))
        average = sum(ws) / k
        return (t * average + (1 - t) * w0).reshape(shape)


def _norm_overflow(name: str) -> InvalidTensorError:
    return InvalidTensorError(
        f"model_stock: tensor {name!r}: a task vector's norm is infinite (a value there is Inf, or about 1e19 or "
        "more), so the angle between the fine-tunes, and with it Model Stock's interpolation weight, cannot be "
        "computed",  # (hp67a c101: an Inf in an input was said as large finite values only)
        hint=f"check the inputs: tensor {name!r} of each model for Inf or huge values (a damaged file, a diverged "
             "training step, a wrong dtype read); --dtype does not help, the angle is computed in float32 as mergekit "
             "does")


def _warn_if_extrapolating(name: str, k: int, low: float, high: float | None = None) -> None:
    """Model Stock's t = k cos / (1 + (k - 1) cos) lies in [0, 1] for task vectors at an acute mean angle; nearly
    opposite ones (cos -> -1/(k-1)) send it far outside, and the merge extrapolates along the models' mean: computed
    as mergekit does, but said."""
    high = low if high is None else high
    if 0 <= low and high <= 1 or not (math.isfinite(low) and math.isfinite(high)):
        return
    worst = low if abs(low) > abs(high) or high <= 1 else high
    # t < 0 exactly where the mean cosine is negative (t = k cos / (1 + (k - 1) cos) inverted): a cosine just below 0
    # is task vectors at nearly a right angle (as unrelated models' are), one near -1/(k-1) task vectors nearly opposite
    cos = worst / (k - (k - 1) * worst)
    how = (f"are nearly orthogonal, at a slightly negative mean cosine ({cos:.3g})" if cos > -0.2 / (k - 1) else
           f"point nearly opposite ways (mean cosine {cos:.3g})")
    warnings.warn(MergeWarning(
        f"model_stock: tensor {name!r} gets t = {worst:.4g}, outside [0, 1]: its task vectors {how}, so the merge "
        "extrapolates along the models' mean rather than interpolating (mergekit computes the same); check that the "
        "models are fine-tunes of this base"), stacklevel=3)


def _warn_rows_extrapolating(k: int, t: torch.Tensor) -> None:
    """filter_wise: t (rows,) per row. Rows of unrelated task vectors scatter around cosine 0, so nearly every matrix
    of thousands of rows has some outside [0, 1]: said once for the merge (one message, whichever tensors: the
    command line prints a message once), with the worst t of the first tensor met, not a verdict per tensor."""
    if not bool(((t < 0) | (t > 1)).any()) or not bool(t.isfinite().all()):
        return
    warnings.warn(MergeWarning(
        "model_stock (filter_wise): some rows get t outside [0, 1] (their two task vectors at a negative cosine, as "
        "unrelated or barely trained rows often are), so those rows extrapolate along the models' mean rather than "
        "interpolating (mergekit computes the same); without filter_wise each tensor takes one t"), stacklevel=3)


def _warn_opposite(name: str) -> None:
    """Where 1 + (k - 1) cos vanishes (two task vectors exactly opposite: cos = -1), Model Stock's t is undefined and
    mergekit keeps the base: the same here, but said, as the extrapolating cases are."""
    warnings.warn(MergeWarning(
        f"model_stock: tensor {name!r}: its task vectors point exactly opposite ways (mean cosine -1/(k-1), k the "
        "number of models), where Model Stock's t = k cos / (1 + (k - 1) cos) is undefined: the tensor keeps the "
        "base's values, as mergekit does; check that the models are fine-tunes of this base"), stacklevel=4)


def interpolation_from(lengths: list[torch.Tensor], dots: Callable[[int, int], torch.Tensor],
                       on_singular: Callable[[], None] | None = None) -> torch.Tensor:
    """mergekit 0.1.5's t = k cos / (1 + (k - 1) cos) (0 where the denominator is below 1e-6 in magnitude), (..., 1),
    from the offsets' reductions: each offset's norm ``lengths[i]`` (...) and ``dots(i, j)``, the sum of
    offsets[i] * offsets[j] along the last dimension (...); cos the mean over pairs of each pair's cosine, clamped
    to [-1, 1], the norms' product at least 1e-6. The same calls on the same values give mergekit's bits, with each
    norm taken once (mergekit takes it per pair); the fused engine (engine.whole) passes its own reductions."""
    k = len(lengths)
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            norms = lengths[i] * lengths[j]
            cosines.append((dots(i, j) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (k - 1) * cos
    singular = denominator.abs() < 1e-6  # no finite estimate: keep the base
    if on_singular is not None and bool(singular.any()):
        on_singular()
    return torch.where(singular, torch.zeros_like(cos),
                       (k * cos) / torch.where(singular, torch.ones_like(denominator), denominator))


def interpolation_f32(lengths: list[np.float32], dots: Callable[[int, int], np.float32],
                      total: Callable[[np.ndarray], np.float32],
                      on_singular: Callable[[], None] | None = None) -> np.float32:
    """:func:`interpolation_from` for one tensor, in float32 scalars (the fused engine's: no torch needed):
    ``total`` is torch.sum's order, the mean of the pairs' cosines their sum divided by their count, as
    torch's CPU mean computes it."""
    f32 = np.float32
    k = len(lengths)
    cosines = []
    with np.errstate(all="ignore"):  # a NaN norm divides as torch's does
        for i in range(k):
            for j in range(i + 1, k):
                norms = lengths[i] * lengths[j]
                floor = norms if norms >= f32(1e-6) or np.isnan(norms) else f32(1e-6)  # clamp(min) keeps NaN
                cosines.append(np.clip(dots(i, j) / floor, f32(-1), f32(1)))
        cos = total(np.array(cosines, f32)) / f32(len(cosines))
        denominator = f32(1) + f32(k - 1) * cos
        if abs(denominator) < f32(1e-6):  # no finite estimate: keep the base
            if on_singular is not None:
                on_singular()
            return f32(0)
        return (f32(k) * cos) / denominator
