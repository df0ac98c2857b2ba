"""Task arithmetic (Ilharco et al., ICLR 2023)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from . import ops
from .base import ChunkContext, as_tuple, check_finite, check_weights, option


@dataclass(frozen=True)
class TaskArithmetic:
    """theta = base + lam * sum_t w_t tau_t. The TIES paper's no-validation lam is 0.4."""

    name: ClassVar[str] = "task_arithmetic"
    paper: ClassVar[str] = "https://arxiv.org/abs/2212.04089"
    summary: ClassVar[str] = "add the scaled sum of the task vectors to the base"

    lam: float = option(0.4, "scale of the summed task vectors (lambda)", unit="multiplier")
    weights: tuple[float, ...] | None = option(None, "per-model weights multiplying each task vector", unit="one per model")

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", as_tuple(self.weights))
        problems: list[str] = []
        check_finite(problems, self.name, "lam", self.lam)
        check_weights(problems, self.name, self.weights, None)
        if problems:
            raise ConfigError(problems)

    def check(self, n_models: int) -> list[str]:
        problems: list[str] = []
        check_weights(problems, self.name, self.weights, n_models)
        return problems

    def trim_spec(self) -> None:
        return None

    def needs_majority_sign(self) -> bool:
        return False

    def elected_sign_sum(self, tau: torch.Tensor, ctx: ChunkContext) -> float:
        raise NotImplementedError("task arithmetic elects no sign")

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        if ctx.weights is not None:
            tau = tau.mul_(ops.broadcast_per_model(ctx.weights, tau))
        return tau.sum(dim=0).mul_(self.lam)
