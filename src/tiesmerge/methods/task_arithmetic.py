"""Task arithmetic (Ilharco et al., ICLR 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from . import ops
from .base import ChunkContext, LinearKernel, Requirements, finite, method_config, option, steps

if TYPE_CHECKING:
    import torch


@method_config
class TaskArithmetic:
    """theta = base + lam * sum_t w_t tau_t. The TIES paper's no-validation lam is 0.4."""

    name: ClassVar[str] = "task_arithmetic"
    paper: ClassVar[str] = "https://arxiv.org/abs/2212.04089"
    summary: ClassVar[str] = "add the scaled sum of the task vectors to the base"
    weights_multiply: ClassVar[bool] = True  # lam * w_t scales model t's task vector (the executor's large-lam check)

    lam: float = option(0.4, "scale of the summed task vectors (lambda)", unit="multiplier", check=finite,
                        grid=steps(0.1, 1.0, 0.1))  # the TIES paper's search for this baseline
    weights: tuple[float, ...] | None = option(None, "per-model weights multiplying each task vector",
                                               unit="one per model", per_model=True)

    def requirements(self) -> Requirements:
        return Requirements(weights=self.weights, kernel=LinearKernel(self.weights, scale=self.lam))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        if ctx.weights is not None:
            tau = tau.mul_(ops.broadcast_per_model(ctx.weights, tau))
        return tau.sum(dim=0).mul_(self.lam)

    def task_vectors(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """(n, *S) -> (n, *S): w_t tau_t (AdaMerging's vectors; ``lam`` is what it learns)."""
        return tau if ctx.weights is None else tau * ops.broadcast_per_model(ctx.weights, tau)
