"""RegMean (Jin et al., ICLR 2023): merge linear layers by regression on their inputs' Gram matrices."""

from __future__ import annotations

import warnings
from typing import ClassVar

from ..errors import MergeWarning
from ..lazy import torch
from .base import ChunkContext, Requirements, SideInput, method_config, option, unit_interval


def shrink_off_diagonal(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """(..., d, d) -> alpha * G + (1 - alpha) * diag(G): off-diagonal entries times alpha."""
    diagonal = torch.diagonal(gram, dim1=-2, dim2=-1)  # (..., d)
    return (gram * alpha).diagonal_scatter(diagonal, dim1=-2, dim2=-1)


@method_config
class RegMean:
    """For each linear weight W (out, in): W = (sum_t W_t G~_t)(sum_t G~_t)^-1.

    G_t = X_t^T X_t / N_t is the Gram matrix of the layer's inputs on model t's data
    (``tiesmerge stats gram``); G~_t multiplies its off-diagonal entries by ``alpha``
    (alpha = 1 is exact RegMean: the weight that best reproduces every model's outputs on its
    own inputs, in least squares). Solved with ``torch.linalg.solve`` in float64, never by an
    explicit inverse. Every other parameter (biases, norms, embeddings, layers without a
    Gram matrix in some model) is averaged. An input feature that no model's data ever
    activates (a zero row and column of sum_t G~_t) has no regression target; its column is
    averaged too.
    Row chunks need only the same rows of each W_t and each full Gram matrix, and the solve
    runs on task vectors: W = base + (sum_t tau_t G~_t)(sum_t G~_t)^-1.
    """

    name: ClassVar[str] = "regmean"
    paper: ClassVar[str] = "https://arxiv.org/abs/2212.09849"
    summary: ClassVar[str] = "RegMean: linear layers by least squares on their inputs' Gram matrices, the rest averaged"

    alpha: float = option(0.95, "scale of the Gram matrices' off-diagonal entries (1 = exact RegMean)",
                          unit="fraction, [0, 1]", check=unit_interval)

    def requirements(self) -> Requirements:
        return Requirements(statistics=SideInput("gram", rows=False))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """tau (n, rows, in), ctx.statistics (n, in, in) Gram matrices -> (rows, in)."""
        if ctx.statistics is None or tau.dim() != 3:
            return tau.mean(dim=0)
        n = tau.shape[0]
        silent = [k for k in range(n) if not bool(ctx.statistics[k].any())]
        if silent and len(silent) < n:  # every one zero: the plain mean below, nothing lost
            warnings.warn(MergeWarning(
                f"regmean: tensor {ctx.name!r}: the Gram statistic of model(s) {', '.join(map(str, silent))} is all "
                "zeros (the layer saw no nonzero input in their data, or the file was edited), so they have no say "
                "on this tensor; recompute their statistics on data that reaches it"), stacklevel=3)
        grams = shrink_off_diagonal(ctx.statistics.double(), self.alpha)  # (n, in, in)
        tau64 = tau.double()
        lhs = grams.sum(dim=0)  # (in, in)
        rhs = torch.einsum("tij,trj->ir", grams, tau64)  # (in, rows) = sum_t G~_t tau_t^T
        unseen = torch.diagonal(lhs) == 0  # (in,): features no model's data activates
        if bool(unseen.any()):
            # their rows and columns of lhs are zero (a PSD matrix with a zero diagonal entry);
            # n * x = sum_t tau_t there makes those columns the plain mean
            lhs[unseen, unseen] = float(n)
            rhs[unseen] = tau64[:, :, unseen].sum(dim=0).T
        solution = torch.linalg.solve(lhs, rhs)  # (in, rows)
        return solution.T.to(tau.dtype)
