"""TIES-Merging: trim, elect sign, disjoint merge (Yadav et al., NeurIPS 2023)."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from . import ops
from .base import (
    SCOPES,
    ChunkContext,
    ModelPath,
    Reduction,
    Requirements,
    TiesKernel,
    TopK,
    finite,
    fraction,
    method_config,
    option,
    steps,
)

if TYPE_CHECKING:
    import torch

ELECT_RULES = ("mass", "count")
ZERO_SIGNS = ("zero", "positive", "majority")
AGGREGATES = ("mean", "sum", "max")
THRESHOLD_TIES = ("keep", "sort")


@method_config
class Ties:
    """theta = base + lam * disjoint_aggregate(trim(tau), elect(trim(tau))).

    Weights w_t (default all 1) scale model t's trimmed task vector before the election and
    the aggregation; a model agrees when its weighted value has the elected sign; with
    ``aggregate="mean"`` the result is sum_A w_t tau_t / sum_A w_t over the agreeing models A
    (mergekit's ``normalize: true``). Trimming ranks each model's own |tau|, so weights never
    change which entries are kept.

    ``sign_from`` replaces the election with a sign vector from elsewhere (the paper's
    Tables 3 and 5): gamma = sgn(theta_ref - theta_base) of another model fine-tuned from the
    same base, e.g. a multitask model. The engine reads it as the named reference input
    (``ctx.reference``): never trimmed, weighted or averaged in.
    """

    name: ClassVar[str] = "ties"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.01708"
    summary: ClassVar[str] = "TIES-Merging: trim each task vector, elect a sign per entry, average the agreeing values"

    density: float = option(0.2, "fraction of each task vector's entries kept, by magnitude",
                            unit="fraction kept, (0, 1]", check=fraction,
                            grid=(0.1, 0.2, 0.3))  # the paper's validation search (Appendix B.4)
    lam: float = option(1.0, "scale of the merged task vector (lambda)", unit="multiplier", check=finite,
                        grid=steps(0.8, 3.0, 0.1))
    scope: str = option("global", "trim threshold over each model's whole model or per tensor", choices=SCOPES)
    elect: str = option("mass", "sign election: total mass (paper) or count of signs", choices=ELECT_RULES)
    zero_sign: str = option("zero", "sign elected where the vote is exactly 0", choices=ZERO_SIGNS)
    aggregate: str = option("mean", "how agreeing values combine", choices=AGGREGATES)
    weights: tuple[float, ...] | None = option(None, "per-model weights (see the docstring)", unit="one per model",
                                               per_model=True)
    densities: tuple[float, ...] | None = option(None, "per-model fractions kept, overriding density "
                                                 "(mergekit's per-model density)", unit="one per model, (0, 1]",
                                                 check=fraction, per_model=True)
    threshold_ties: str = option("keep", "entries equal to the trim threshold: keep them all (paper, order-free) "
                                 "or keep exactly max(1, k) in torch.argsort's order (mergekit; per-tensor scope)",
                                 choices=THRESHOLD_TIES)
    sign_from: ModelPath | None = option(None, "take the elected sign from this model's task vector instead of "
                                         "electing (e.g. a multitask model; paper Tables 3 and 5)",
                                         unit="model directory")

    @property
    def weights_multiply(self) -> bool:
        """Whether lam * w_t scales model t's values (the executor's large-lam check): not under a weighted mean."""
        return self.aggregate != "mean"

    def unused_options(self) -> dict[str, str]:
        """density, where densities sets each model's fraction."""
        unused = {"density": "densities sets each model's fraction"} if self.densities is not None else {}
        if self.sign_from is not None:  # the sign is taken, not elected
            unused |= {"elect": "sign_from gives the sign, nothing is elected",
                       "zero_sign": "sign_from gives the sign, nothing is elected"}
        return unused

    def requirements(self) -> Requirements:
        exact_k = self.threshold_ties == "sort"
        majority = self.zero_sign == "majority"
        # the kernel elects (with mergekit's sort order too: the engine replays the sort's choice,
        # engine.exactk); with a reference the torch path runs
        kernel = None if self.sign_from is not None else TiesKernel(
            self.lam, self.elect, self.zero_sign, self.aggregate, majority_from="majority" if majority else None)
        return Requirements(
            trim=TopK(self.density, self.densities), scope=self.scope, exact_k=exact_k,
            reductions=(Reduction("majority", self._elected_sign_sum, ops.sign),) if majority else (),
            reference=self.sign_from, weights=self.weights, kernel=kernel)

    def _trim_and_elect(self, tau: torch.Tensor, ctx: ChunkContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(trimmed (n, *S) in place, gamma (*S) before the zero-sign rule)."""
        if self.threshold_ties == "sort":
            trimmed = ops.trim_sorted_k(tau, ctx.keep)
        else:
            trimmed = ops.trim_at(tau, ctx.thresholds)
        if self.sign_from is not None:
            return trimmed, ctx.reference.sign()  # the reference's signs, untrimmed
        return trimmed, ops.elect(trimmed, ctx.weights, self.elect)

    def _elected_sign_sum(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """The majority reduction's partial sum: the chunk's elected signs (zeros left 0), summed."""
        return self._trim_and_elect(tau, ctx)[1].sum()

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        trimmed, gamma = self._trim_and_elect(tau, ctx)
        majority = ctx.reduced.get("majority")
        gamma = ops.resolve_zero_sign(gamma, self.zero_sign, None if majority is None else float(majority))
        merged = ops.disjoint_aggregate(trimmed, gamma, ctx.weights, self.aggregate)  # (*S)
        return merged.mul_(self.lam)

    def task_vectors(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """(n, *S) -> (n, *S): each model's trimmed, weighted values that agree with the elected sign
        (AdaMerging++'s vectors: their sum is the ``aggregate="sum"`` merge before ``lam``)."""
        trimmed, gamma = self._trim_and_elect(tau, ctx)
        majority = ctx.reduced.get("majority")
        gamma = ops.resolve_zero_sign(gamma, self.zero_sign, None if majority is None else float(majority))
        return ops.agreeing(trimmed, gamma, ctx.weights)
