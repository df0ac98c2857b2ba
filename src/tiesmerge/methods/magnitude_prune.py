"""Magnitude pruning then task arithmetic: TIES without the sign election and the disjoint mean."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from . import ops
from .base import SCOPES, ChunkContext, Requirements, TopK, finite, fraction, method_config, option, steps

if TYPE_CHECKING:
    import torch


@method_config
class MagnitudePrune:
    """theta = base + lam * sum_t w_t trim(tau_t): keep each task vector's top ``density``
    fraction by magnitude and add them up (mergekit's task_arithmetic with magnitude
    sparsification; the paper's ablation without elect and disjoint mean)."""

    name: ClassVar[str] = "magnitude_prune"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.01708"
    summary: ClassVar[str] = "trim each task vector to its largest entries, then sum them"
    weights_multiply: ClassVar[bool] = True  # lam * w_t scales model t's task vector (the executor's large-lam check)

    density: float = option(0.2, "fraction of each task vector's entries kept, by magnitude",
                            unit="fraction kept, (0, 1]", check=fraction, grid=(0.1, 0.2, 0.3))
    lam: float = option(1.0, "scale of the summed trimmed task vectors (lambda)", unit="multiplier", check=finite,
                        grid=steps(0.8, 3.0, 0.1))
    scope: str = option("global", "trim threshold over each model's whole model or per tensor", choices=SCOPES)
    weights: tuple[float, ...] | None = option(None, "per-model weights multiplying each trimmed task vector",
                                               unit="one per model", per_model=True)

    def requirements(self) -> Requirements:
        return Requirements(trim=TopK(self.density), scope=self.scope, weights=self.weights)

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        trimmed = ops.trim_at(tau, ctx.thresholds)  # (n, *S)
        if ctx.weights is not None:
            trimmed = trimmed.mul_(ops.broadcast_per_model(ctx.weights, trimmed))
        return trimmed.sum(dim=0).mul_(self.lam)
