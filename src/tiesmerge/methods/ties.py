"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023)."""

from __future__ import annotations

import dataclasses
import os
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
    check_densities,
    check_finite,
    check_fraction,
    check_weights,
    option,
)

SCOPES = ("global", "per_tensor")
ELECT_RULES = ("mass", "count")
ZERO_SIGNS = ("zero", "positive", "majority")
AGGREGATES = ("mean", "sum", "max")
THRESHOLD_TIES = ("keep", "sort")


@dataclass(frozen=True)
class Ties:
    """theta = base + lam * disjoint_aggregate(trim(tau), elect(trim(tau))).

    Weights w_t (default all 1) scale model t's trimmed task vector before the election and
    the aggregation; a model agrees when its weighted value has the elected sign; with
    ``aggregate="mean"`` the result is sum_A w_t tau_t / sum_A w_t over the agreeing models A
    (mergekit's ``normalize: true``). Trimming ranks each model's own |tau|, so weights never
    change which entries are kept.

    ``sign_from`` replaces the election with a sign vector from elsewhere (the paper's
    Tables 3 and 5): gamma = sgn(theta_ref - theta_base) of another model fine-tuned from the
    same base, e.g. a multitask model. The engine then reads that model beside the others and
    hands its task vector to ``merge`` as the last row of ``tau`` (see :meth:`reference_model`);
    it is never trimmed, weighted or averaged in.
    """

    name: ClassVar[str] = "ties"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.01708"
    summary: ClassVar[str] = "TIES-Merging: trim each task vector, elect a sign per entry, average the agreeing values"

    density: float = option(0.2, "fraction of each task vector's entries kept, by magnitude", unit="fraction kept, (0, 1]")
    lam: float = option(1.0, "scale of the merged task vector (lambda)", unit="multiplier")
    scope: str = option("global", "trim threshold over each model's whole model or per tensor", choices=SCOPES)
    elect: str = option("mass", "sign election: total mass (paper) or count of signs", choices=ELECT_RULES)
    zero_sign: str = option("zero", "sign elected where the vote is exactly 0", choices=ZERO_SIGNS)
    aggregate: str = option("mean", "how agreeing values combine", choices=AGGREGATES)
    weights: tuple[float, ...] | None = option(None, "per-model weights (see the docstring)", unit="one per model")
    densities: tuple[float, ...] | None = option(None, "per-model fractions kept, overriding density "
                                                 "(mergekit's per-model density)", unit="one per model, (0, 1]")
    threshold_ties: str = option("keep", "entries equal to the trim threshold: keep them all (paper, order-free) "
                                 "or keep exactly max(1, k) in torch.argsort's order (mergekit; per-tensor scope)",
                                 choices=THRESHOLD_TIES)
    sign_from: str | None = option(None, "take the elected sign from this model's task vector instead of electing "
                                   "(e.g. a multitask model; paper Tables 3 and 5)", unit="model directory")

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", as_tuple(self.weights))
        object.__setattr__(self, "densities", as_tuple(self.densities))
        if isinstance(self.sign_from, os.PathLike):
            object.__setattr__(self, "sign_from", os.fspath(self.sign_from))
        problems: list[str] = []
        check_fraction(problems, self.name, "density", self.density)
        check_finite(problems, self.name, "lam", self.lam)
        check_choice(problems, self.name, "scope", self.scope, SCOPES)
        check_choice(problems, self.name, "elect", self.elect, ELECT_RULES)
        check_choice(problems, self.name, "zero_sign", self.zero_sign, ZERO_SIGNS)
        check_choice(problems, self.name, "aggregate", self.aggregate, AGGREGATES)
        check_weights(problems, self.name, self.weights, None)
        check_densities(problems, self.name, self.densities, None)
        check_choice(problems, self.name, "threshold_ties", self.threshold_ties, THRESHOLD_TIES)
        if self.threshold_ties == "sort" and self.scope != "per_tensor":
            problems.append(f"{self.name}: threshold_ties='sort' (mergekit's exact k) needs scope='per_tensor'")
        if self.sign_from is not None and (not isinstance(self.sign_from, str) or not str(self.sign_from)):
            problems.append(f"{self.name}: sign_from must be the path of a model directory, got {self.sign_from!r}")
        if problems:
            raise ConfigError(problems)

    def check(self, n_models: int) -> list[str]:
        problems: list[str] = []
        check_weights(problems, self.name, self.weights, n_models)
        check_densities(problems, self.name, self.densities, n_models)
        return problems

    def reference_model(self) -> str | None:
        """A model the engine reads after the merged ones and passes as the last row of tau."""
        return None if self.sign_from is None else str(self.sign_from)

    def trim_spec(self) -> TrimSpec:
        return TrimSpec(self.density, self.scope, self.densities, at_least_one=self.threshold_ties == "sort")

    def needs_majority_sign(self) -> bool:
        return self.zero_sign == "majority"

    def _trim_and_elect(self, tau: torch.Tensor, ctx: ChunkContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(trimmed (n, *S), gamma (*S) before the zero-sign rule); tau is (n, *S), or (n + 1, *S)
        with the reference model's task vector last when ``sign_from`` is set."""
        if self.sign_from is None:
            trimmed = self._trim(tau, ctx)  # (n, *S), in place
            return trimmed, ops.elect(trimmed, ctx.weights, self.elect)
        gamma = tau[-1].sign()  # (*S): the reference's signs, untrimmed
        merged_only = dataclasses.replace(  # the reference is never trimmed: drop its row of each count
            ctx, thresholds=None if ctx.thresholds is None else ctx.thresholds[:-1],
            keep=None if ctx.keep is None else ctx.keep[:-1])
        return self._trim(tau[:-1], merged_only), gamma  # trimmed (n, *S)

    def elected_sign_sum(self, tau: torch.Tensor, ctx: ChunkContext) -> float:
        """Sum of the elected signs (zeros left 0) of one chunk: the majority reduction."""
        return float(self._trim_and_elect(tau, ctx)[1].sum())

    def _trim(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        if self.threshold_ties == "keep":
            return ops.trim_at(tau, ctx.thresholds)
        if ctx.keep is None:
            raise ValueError("threshold_ties='sort' needs the whole tensor in one chunk (its keep counts)")
        return ops.trim_sorted_k(tau, ctx.keep)

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        trimmed, gamma = self._trim_and_elect(tau, ctx)
        gamma = ops.resolve_zero_sign(gamma, self.zero_sign, ctx.majority)
        merged = ops.disjoint_aggregate(trimmed, gamma, ctx.weights, self.aggregate)  # (*S)
        return merged.mul_(self.lam)
