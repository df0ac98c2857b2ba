"""DARE: drop and rescale (Yu et al., 2023), followed by task arithmetic or by TIES's sign steps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..errors import ConfigError
from . import ops
from .base import ChunkContext, as_tuple, check_choice, check_finite, check_fraction, check_weights, option
from .ties import AGGREGATES, ELECT_RULES

_DARE_PAPER = "https://arxiv.org/abs/2311.03099"


def _dare(tau: torch.Tensor, drop_rate: float, seed: int, ctx: ChunkContext) -> torch.Tensor:
    """Drop each entry of every model's chunk with probability ``drop_rate``; (n, *S) in place.

    Model t uses random stream (seed, t, tensor): the same entries drop whatever the chunking
    or the device.
    """
    n, per_model = tau.shape[0], tau[0].numel()
    uniforms = torch.stack([
        ops.hash_uniform(seed + 7919 * t, ctx.stream, ctx.offset, per_model, tau.device).view(tau.shape[1:])
        for t in range(n)
    ])  # (n, *S)
    return ops.dare_drop(tau, drop_rate, uniforms)


def _check_dare(problems: list[str], name: str, drop_rate: object, seed: object) -> None:
    check_fraction(problems, name, "drop_rate", drop_rate, closed_low=True, closed_high=False)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        problems.append(f"{name}: seed must be a non-negative integer, got {seed!r}")


@dataclass(frozen=True)
class DareLinear:
    """theta = base + lam * sum_t w_t dare(tau_t)."""

    name: ClassVar[str] = "dare_linear"
    paper: ClassVar[str] = _DARE_PAPER
    summary: ClassVar[str] = "randomly drop task-vector entries, rescale the rest, then sum"

    drop_rate: float = option(0.9, "probability of dropping each task-vector entry", unit="probability, [0, 1)")
    lam: float = option(1.0, "scale of the summed task vectors (lambda)", unit="multiplier")
    seed: int = option(0, "seed of the counter-based random numbers", unit="integer")
    weights: tuple[float, ...] | None = option(None, "per-model weights multiplying each task vector", unit="one per model")

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", as_tuple(self.weights))
        problems: list[str] = []
        _check_dare(problems, self.name, self.drop_rate, self.seed)
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
        raise NotImplementedError("dare_linear elects no sign")

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        dropped = _dare(tau, self.drop_rate, self.seed, ctx)  # (n, *S)
        if ctx.weights is not None:
            dropped = dropped.mul_(ops.broadcast_per_model(ctx.weights, dropped))
        return dropped.sum(dim=0).mul_(self.lam)


@dataclass(frozen=True)
class DareTies:
    """theta = base + lam * disjoint_aggregate(dare(tau), elect(dare(tau))): DARE in place of
    TIES's magnitude trim. An exact-zero vote elects 0 (as TIES's default)."""

    name: ClassVar[str] = "dare_ties"
    paper: ClassVar[str] = _DARE_PAPER
    summary: ClassVar[str] = "randomly drop and rescale, then TIES's sign election and disjoint mean"

    drop_rate: float = option(0.9, "probability of dropping each task-vector entry", unit="probability, [0, 1)")
    lam: float = option(1.0, "scale of the merged task vector (lambda)", unit="multiplier")
    seed: int = option(0, "seed of the counter-based random numbers", unit="integer")
    elect: str = option("mass", "sign election: total mass or count of signs", choices=ELECT_RULES)
    aggregate: str = option("mean", "how agreeing values combine", choices=AGGREGATES)
    weights: tuple[float, ...] | None = option(None, "per-model weights, as in ties", unit="one per model")

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", as_tuple(self.weights))
        problems: list[str] = []
        _check_dare(problems, self.name, self.drop_rate, self.seed)
        check_finite(problems, self.name, "lam", self.lam)
        check_choice(problems, self.name, "elect", self.elect, ELECT_RULES)
        check_choice(problems, self.name, "aggregate", self.aggregate, AGGREGATES)
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
        raise NotImplementedError("dare_ties resolves zero votes to 0")

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        dropped = _dare(tau, self.drop_rate, self.seed, ctx)  # (n, *S)
        gamma = ops.elect(dropped, ctx.weights, self.elect)
        return ops.disjoint_aggregate(dropped, gamma, ctx.weights, self.aggregate).mul_(self.lam)
