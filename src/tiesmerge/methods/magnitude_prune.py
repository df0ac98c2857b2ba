"""Magnitude pruning then task arithmetic: TIES without the sign election and the disjoint mean."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from . import ops
from .base import (
    ChunkContext,
    TrimSpec,
    as_tuple,
    check_choice,
    check_finite,
    check_fraction,
    check_weights,
    option,
)
from .ties import SCOPES


@dataclass(frozen=True)
class MagnitudePrune:
    """theta = base + lam * sum_t w_t trim(tau_t): keep each task vector's top ``density``
    fraction by magnitude and add them up (mergekit's task_arithmetic with magnitude
    sparsification; the paper's ablation without elect and disjoint mean)."""

    name: ClassVar[str] = "magnitude_prune"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.01708"
    summary: ClassVar[str] = "trim each task vector to its largest entries, then sum them"

    density: float = option(0.2, "fraction of each task vector's entries kept, by magnitude", unit="fraction kept, (0, 1]")
    lam: float = option(1.0, "scale of the summed trimmed task vectors (lambda)", unit="multiplier")
    scope: str = option("global", "trim threshold over each model's whole model or per tensor", choices=SCOPES)
    weights: tuple[float, ...] | None = option(None, "per-model weights multiplying each trimmed task vector", unit="one per model")

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", as_tuple(self.weights))
        problems: list[str] = []
        check_fraction(problems, self.name, "density", self.density)
        check_finite(problems, self.name, "lam", self.lam)
        check_choice(problems, self.name, "scope", self.scope, SCOPES)
        check_weights(problems, self.name, self.weights, None)
        if problems:
            raise ConfigError(problems)

    def check(self, n_models: int) -> list[str]:
        problems: list[str] = []
        check_weights(problems, self.name, self.weights, n_models)
        return problems

    def trim_spec(self) -> TrimSpec:
        return TrimSpec(self.density, self.scope)

    def needs_majority_sign(self) -> bool:
        return False

    def elected_sign_sum(self, tau: torch.Tensor, ctx: ChunkContext) -> float:
        raise NotImplementedError("magnitude pruning elects no sign")

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        trimmed = ops.trim_at(tau, ctx.thresholds)  # (n, *S)
        if ctx.weights is not None:
            trimmed = trimmed.mul_(ops.broadcast_per_model(ctx.weights, trimmed))
        return trimmed.sum(dim=0).mul_(self.lam)
