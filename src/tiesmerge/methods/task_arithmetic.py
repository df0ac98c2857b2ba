"""Task arithmetic (Ilharco et al., ICLR 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from . import ops
from .base import Band, ChunkContext, LinearKernel, Requirements, finite, method_config, option, steps

if TYPE_CHECKING:
    import torch


def weighted_sum(tau: torch.Tensor, ctx: ChunkContext, *, lam: float, normalize: bool) -> torch.Tensor:
    """(n, *S) -> (*S): sum_t w_t tau_t, divided by sum_t w_t with ``normalize`` (a sum below 1e-8 divides by 1),
    times ``lam``: mergekit's generalized task arithmetic without a consensus, its operations in its order."""
    weighted = tau if ctx.weights is None else tau.mul_(ops.broadcast_per_model(ctx.weights, tau))
    total = weighted.sum(dim=0)
    if normalize:
        divisor = float(ctx.weights.sum()) if ctx.weights is not None else float(tau.shape[0])
        total = total.div_(1.0 if abs(divisor) < 1e-8 else divisor)
    return total.mul_(lam)


def sum_kernel(weights: tuple[float, ...] | None, lam: float, normalize: bool, band: Band | None = None
               ) -> LinearKernel | None:
    """The fused kernel of :func:`weighted_sum` (``band``: each tau_t masked to Breadcrumbs' band first): sum_t
    w_t tau_t (/ the weights' float32 sum, as torch computes it for fewer than 16 models), * lam; None (the torch
    path) where normalizing without weights or with 16 or more."""
    if not normalize:
        return LinearKernel(weights, scale=lam, band=band)
    if weights is None or len(weights) >= 16:
        return None
    divisor = ops.float32_sum(weights)
    return LinearKernel(weights, scale=lam, divisor=1.0 if abs(divisor) < 1e-8 else divisor, band=band)


@method_config
class TaskArithmetic:
    """theta = base + lam * sum_t w_t tau_t (/ sum_t w_t with ``normalize_weights``, mergekit's ``normalize``, after
    the sum, as mergekit divides). The TIES paper's no-validation lam is 0.4."""

    name: ClassVar[str] = "task_arithmetic"
    paper: ClassVar[str] = "https://arxiv.org/abs/2212.04089"
    summary: ClassVar[str] = "add the scaled sum of the task vectors to the base"
    lam: float = option(0.4, "scale of the summed task vectors (lambda)", unit="multiplier", check=finite,
                        grid=steps(0.1, 1.0, 0.1))  # the TIES paper's search for this baseline
    weights: tuple[float, ...] | None = option(None, "per-model weights multiplying each task vector",
                                               unit="one per model", per_model=True)
    normalize_weights: bool = option(False, "divide the weighted sum by the sum of the weights (mergekit's "
                                            "normalize: the division after the sum, in float32, as mergekit does)")

    @property
    def weights_multiply(self) -> bool:
        """Whether lam * w_t scales model t's task vector (the executor's large-lam check): not when normalised
        (hp80a c22: weights 1000, 1000 normalized were said to scale a task vector 1000 times)."""
        return not self.normalize_weights

    def requirements(self) -> Requirements:
        warn_unnormalised(self.name, self.weights, self.normalize_weights)
        return Requirements(weights=self.weights, kernel=sum_kernel(self.weights, self.lam, self.normalize_weights))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        return weighted_sum(tau, ctx, lam=self.lam, normalize=self.normalize_weights)

    def task_vectors(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """(n, *S) -> (n, *S): w_t tau_t (AdaMerging's vectors; ``lam`` is what it learns)."""
        return tau if ctx.weights is None else tau * ops.broadcast_per_model(ctx.weights, tau)


def warn_unnormalised(method: str, weights: tuple[float, ...] | None, normalize: bool) -> None:
    """normalize_weights with weights summing to (nearly) 0 divides by 1, as mergekit does: the sum is then not
    normalised at all, and that is said (hp40b C77: silent, where average and mergekit's linear refuse such weights)."""
    if not normalize or not weights or abs(ops.float32_sum(weights)) >= 1e-8:
        return
    import warnings

    from ..errors import MergeWarning

    shown = ", ".join(f"{w:.10g}" for w in weights)  # (-0.999999999 as -1 read as an exact cancel: hp82a c117)
    total = ops.float32_sum(weights)
    said = "0" if total == 0 else f"{total:g}, below mergekit's cut of 1e-8"  # (hp63a c31: 2e-30 said as 0)
    warnings.warn(MergeWarning(f"{method}: normalize_weights with weights that sum to {said} ({shown}) divides by 1, "
                               "as mergekit does: the weighted sum is not normalised"), stacklevel=4)
