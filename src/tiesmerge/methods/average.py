"""Simple averaging of the fine-tuned models (Wortsman et al., model soups)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from . import ops
from .base import ChunkContext, as_tuple, check_weights, option


@dataclass(frozen=True)
class Average:
    """theta = sum_t w_t theta_t / sum_t w_t (plain mean when no weights are given).

    Computed as base + weighted mean of the task vectors, which is the same thing.
    """

    name: ClassVar[str] = "average"
    paper: ClassVar[str] = "https://arxiv.org/abs/2203.05482"
    summary: ClassVar[str] = "mean of the fine-tuned models"

    weights: tuple[float, ...] | None = option(None, "per-model weights, normalised to sum 1", unit="one per model")

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", as_tuple(self.weights))
        problems: list[str] = []
        check_weights(problems, self.name, self.weights, None)
        if self.weights is not None and sum(self.weights) == 0:
            problems.append("average: weights sum to 0")
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
        raise NotImplementedError("averaging elects no sign")

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        if ctx.weights is None:
            return tau.mean(dim=0)
        w = ops.broadcast_per_model(ctx.weights / ctx.weights.sum(), tau)
        return (tau * w).sum(dim=0)
