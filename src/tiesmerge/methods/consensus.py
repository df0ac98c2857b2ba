"""Consensus merging with TALL masks (Wang et al., ICML 2024, "Localizing Task Information for
Improved Model Merging and Compression"): keep only the entries that at least k tasks consider
important, then add the masked multi-task vector."""

from __future__ import annotations

from typing import ClassVar

from ..lazy import torch
from . import ops
from .base import ChunkContext, Requirements, finite, method_config, non_negative_int, option, steps


def _non_negative(value: object) -> str | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0
    return finite(value) if ok else "must be a number >= 0"  # and within float32's range, like every multiplier


def tall_masks(tau: torch.Tensor, mtl: torch.Tensor, lambdas: torch.Tensor) -> torch.Tensor:
    """TALL mask of each task (n, *S) bool: m_t = |tau_t| > lambda_t |tau_MTL - tau_t|, the entries
    where task t's own change outweighs what the other tasks add there."""
    return tau.abs() > (mtl.unsqueeze(0) - tau).abs().mul_(ops.broadcast_per_model(lambdas, tau))


@method_config
class Consensus:
    """theta = base + lam * 1[sum_t m_t >= k] * tau_MTL, tau_MTL = sum_t w_t tau_t (task
    arithmetic's sum), m_t task t's TALL mask with lambda_t (``tall_lambda``, or one per model in
    ``tall_lambdas``).

    Follows the authors' code (the tall_masks repository; FusionBench's consensus task
    arithmetic): strict > in the mask, the mask taken against the unscaled sum of task vectors,
    k = 2 by default (k = 1 keeps every entry some task needs, k = n only those all need).
    The authors pick lambda_t per task on validation from 0.2..0.6; ``tiesmerge tune`` searches
    one shared ``tall_lambda`` on that grid. k = 0 keeps everything (task arithmetic).
    """

    name: ClassVar[str] = "consensus"
    paper: ClassVar[str] = "https://arxiv.org/abs/2405.07813"
    summary: ClassVar[str] = "task arithmetic on the entries at least k tasks' TALL masks keep"
    weights_multiply: ClassVar[bool] = True  # lam * w_t scales model t's task vector (the executor's large-lam check)

    k: int = option(2, "keep an entry when at least k tasks' TALL masks keep it", unit="tasks",
                    check=non_negative_int, grid=(1, 2, 3))
    tall_lambda: float = option(0.4, "TALL mask threshold lambda: task t keeps |tau_t| > lambda |tau_MTL - tau_t|",
                                unit="multiplier, >= 0", check=_non_negative, grid=(0.2, 0.3, 0.4, 0.5, 0.6))
    tall_lambdas: tuple[float, ...] | None = option(None, "one TALL lambda per model, overriding tall_lambda",
                                                    unit="one per model, >= 0", check=_non_negative, per_model=True)
    lam: float = option(0.4, "scale of the masked multi-task vector (task arithmetic's lambda)", unit="multiplier",
                        check=finite, grid=steps(0.1, 1.0, 0.1))
    weights: tuple[float, ...] | None = option(None, "per-model weights in the multi-task vector",
                                               unit="one per model", per_model=True)

    def notices(self) -> list[str]:
        """k = 0 (accepted: the paper's k counts from 1, and 0 is its no-mask limit) merges without any mask."""
        if self.k == 0:  # hostile pass 33, C76: it ran without a word
            return [f"k = 0 keeps every entry (each has at least 0 votes), so no mask is applied: the merge is task "
                    f"arithmetic with lam {self.lam:g}; the consensus merges of the paper use k = 2 or more"]
        lambdas = self.tall_lambdas if self.tall_lambdas is not None else (self.tall_lambda,)
        if lambdas and all(v == 0 for v in lambdas):  # every TALL mask all on (hp88a c69: no word)
            return [f"tall_lambda{'s' if self.tall_lambdas is not None else ''} = 0 makes each TALL mask keep every "
                    "entry its task vector changes, so with fine-tunes that change every entry each has every vote: "
                    f"the merge is task arithmetic with lam {self.lam:g}; the authors choose lambda from 0.2 to 0.6"]
        return []

    def unused_options(self) -> dict[str, str]:
        """tall_lambda, where tall_lambdas sets each model's."""
        if self.k == 0:  # every entry has at least 0 votes: no mask is computed
            why = "k = 0 keeps every entry, so no TALL mask is computed"
            return {"tall_lambda": why, "tall_lambdas": why}
        return {"tall_lambda": "tall_lambdas sets each model's lambda"} if self.tall_lambdas is not None else {}

    def requirements(self) -> Requirements:
        return Requirements(weights=self.weights)

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """tau (n, *S) -> lam * consensus mask * sum_t w_t tau_t (*S)."""
        n = tau.shape[0]
        if ctx.weights is not None:
            tau = tau.mul_(ops.broadcast_per_model(ctx.weights, tau))
        mtl = tau.sum(dim=0)  # (*S)
        values = self.tall_lambdas if self.tall_lambdas is not None else (self.tall_lambda,) * n
        lambdas = torch.tensor(values, dtype=tau.dtype, device=tau.device)
        votes = tall_masks(tau, mtl, lambdas).sum(dim=0)  # (*S) how many tasks keep each entry
        return mtl.mul_(votes >= self.k).mul_(self.lam)
