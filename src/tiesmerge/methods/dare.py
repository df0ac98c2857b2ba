"""DARE: drop and rescale (Yu et al., 2023), followed by task arithmetic or by TIES's sign steps."""

from __future__ import annotations

from typing import ClassVar

from ..lazy import torch
from . import ops
from .base import (
    ChunkContext,
    Requirements,
    TiesKernel,
    finite,
    method_config,
    option,
    probability,
    seed_value,
    steps,
)
from .task_arithmetic import warn_unnormalised, weighted_sum
from .ties import AGGREGATES, ELECT_RULES

_DARE_PAPER = "https://arxiv.org/abs/2311.03099"


# DARE's uniforms are multiples of 2^-24 below 1, kept where at least the drop rate rounded to float32
# (ops.hash_uniform, dare_drop; the fused kernel's integer test is the same): a rate that rounds to 1 there drops every
# entry of every model, however large (hp76a c09, c10: densities of 1e-10 to 1e-15 in mergekit recipes were taken).
# A rate rounds to 1 from 1 - 2^-25 up (ties to even); any lower rate keeps at least one step, 2^-24, and the kept
# entries are rescaled by the draw's own keep probability (ops.dare_keep_probability), so the merge stays unbiased
DROP_RATE_BOUND = 1.0 - 2.0 ** -25  # 0.99999997019767: refused from here on
MIN_DENSITY = 3e-8  # a round density above 2^-25 (2.98e-8): 1 - 3e-8 rounds to 1 - 2^-24 in float32, and is kept


def drop_rate_check(value: object) -> str | None:
    """A probability DARE's 24-bit draw can keep entries at: below 1 after float32's rounding too."""
    problem = probability(value)
    if problem is None and ops.dare_keep_probability(float(value)) == 0.0:  # type: ignore[arg-type]
        return (f"must be below 1 - 2^-25 = {DROP_RATE_BOUND:.14g} (a density of at least {MIN_DENSITY:g}): DARE "
                "draws uniform numbers in steps of 2^-24, and a drop rate this close to 1 rounds to 1 in float32, "
                "which drops every entry")
    return problem


def _drop_rate() -> float:
    """DARE's drop rate, the same option in both methods (a field object cannot be shared)."""
    return option(0.9, "probability of dropping each task-vector entry", unit="probability, [0, 1)",
                  check=drop_rate_check, grid=(0.7, 0.8, 0.9))


def _seed() -> int:
    return option(0, "seed of the counter-based random numbers", unit="integer", check=seed_value)


def _lam(what: str) -> float:
    return option(1.0, f"scale of the {what} (lambda)", unit="multiplier", check=finite, grid=steps(0.5, 2.0, 0.1))


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


@method_config
class DareLinear:
    """theta = base + lam * sum_t w_t dare(tau_t) (/ sum_t w_t with ``normalize_weights``, mergekit's ``normalize``:
    after the sum, by the weights' float32 sum, as mergekit divides)."""

    name: ClassVar[str] = "dare_linear"
    paper: ClassVar[str] = _DARE_PAPER
    summary: ClassVar[str] = "randomly drop task-vector entries, rescale the rest, then sum"

    drop_rate: float = _drop_rate()
    lam: float = _lam("summed task vectors")
    seed: int = _seed()
    weights: tuple[float, ...] | None = option(None, "per-model weights multiplying each task vector",
                                               unit="one per model", per_model=True)
    normalize_weights: bool = option(False, "divide the weighted sum by the sum of the weights (mergekit's "
                                            "normalize: the division after the sum, in float32, as mergekit does)")

    @property
    def weights_multiply(self) -> bool:
        """Whether lam * w_t scales model t's task vector (the executor's large-lam check): not when normalised."""
        return not self.normalize_weights

    def unused_options(self) -> dict[str, str]:
        """seed, where drop_rate 0 drops nothing (no random number is drawn)."""
        return {"seed": "drop_rate 0 drops nothing, so no random number is drawn"} if self.drop_rate == 0 else {}

    def requirements(self) -> Requirements:
        warn_unnormalised(self.name, self.weights, self.normalize_weights)
        return Requirements(weights=self.weights)

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        dropped = _dare(tau, self.drop_rate, self.seed, ctx)  # (n, *S)
        # mergekit's dare_linear after its drop (hp40b C61): w_t tau_t summed, / the weights' float32 sum with
        # normalize_weights (weights divided beforehand differ from mergekit's by a rounding), * lam
        return weighted_sum(dropped, ctx, lam=self.lam, normalize=self.normalize_weights)

    def task_vectors(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """(n, *S) -> (n, *S): w_t dare(tau_t)."""
        dropped = _dare(tau, self.drop_rate, self.seed, ctx)
        return dropped if ctx.weights is None else dropped.mul_(ops.broadcast_per_model(ctx.weights, dropped))


@method_config
class DareTies:
    """theta = base + lam * disjoint_aggregate(dare(tau), elect(dare(tau))): DARE in place of
    TIES's magnitude trim. An exact-zero vote elects 0 (as TIES's default)."""

    name: ClassVar[str] = "dare_ties"
    paper: ClassVar[str] = _DARE_PAPER
    summary: ClassVar[str] = "randomly drop and rescale, then TIES's sign election and disjoint mean"

    drop_rate: float = _drop_rate()
    lam: float = _lam("merged task vector")
    seed: int = _seed()
    elect: str = option("mass", "sign election: total mass or count of signs", choices=ELECT_RULES)
    aggregate: str = option("mean", "how agreeing values combine", choices=AGGREGATES)
    weights: tuple[float, ...] | None = option(None, "per-model weights, as in ties", unit="one per model",
                                               per_model=True)

    @property
    def weights_multiply(self) -> bool:
        """Whether lam * w_t scales model t's values (the executor's large-lam check): not under a weighted mean."""
        return self.aggregate != "mean"

    def unused_options(self) -> dict[str, str]:
        """seed, where drop_rate 0 drops nothing (no random number is drawn)."""
        return {"seed": "drop_rate 0 drops nothing, so no random number is drawn"} if self.drop_rate == 0 else {}

    def requirements(self) -> Requirements:
        # the fused TIES kernel draws the same counter-based uniforms (engine.kernels._hash_uniform)
        return Requirements(weights=self.weights, kernel=TiesKernel(self.lam, self.elect, "zero", self.aggregate,
                                                                    dare=(self.drop_rate, self.seed)))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        dropped = _dare(tau, self.drop_rate, self.seed, ctx)  # (n, *S)
        gamma = ops.elect(dropped, ctx.weights, self.elect)
        return ops.disjoint_aggregate(dropped, gamma, ctx.weights, self.aggregate).mul_(self.lam)

    def task_vectors(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """(n, *S) -> (n, *S): each model's dropped, weighted values that agree with the elected sign."""
        dropped = _dare(tau, self.drop_rate, self.seed, ctx)
        return ops.agreeing(dropped, ops.elect(dropped, ctx.weights, self.elect), ctx.weights)
