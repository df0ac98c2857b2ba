"""Simple averaging of the fine-tuned models (Wortsman et al., model soups)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from . import ops
from .base import ChunkContext, LinearKernel, Requirements, method_config, nonzero_sum, option

if TYPE_CHECKING:
    import torch


@method_config
class Average:
    """theta = sum_t w_t theta_t / sum_t w_t (plain mean when no weights are given).

    Computed as base + weighted mean of the task vectors, which is the same thing.
    """

    name: ClassVar[str] = "average"
    paper: ClassVar[str] = "https://arxiv.org/abs/2203.05482"
    summary: ClassVar[str] = "mean of the fine-tuned models"

    weights: tuple[float, ...] | None = option(None, "per-model weights, normalised to sum 1", unit="one per model",
                                               per_model=True, check_all=nonzero_sum)

    def requirements(self) -> Requirements:
        if self.weights is None:  # the mean: the sum over n, as torch's mean computes it
            return Requirements(kernel=LinearKernel(mean=True))
        normalised = tuple(w / sum(self.weights) for w in self.weights)
        return Requirements(weights=normalised, kernel=LinearKernel(normalised))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        if ctx.weights is None:
            return tau.mean(dim=0)
        return (tau * ops.broadcast_per_model(ctx.weights, tau)).sum(dim=0)  # weights normalised to sum 1
