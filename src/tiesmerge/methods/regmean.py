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


# float32's epsilon: the statistics are stored in float32, so each entry of a Gram matrix carries a relative error
# of about this much, and an eigenvalue of the diagonally scaled sum below (in features) times it is noise
_GRAM_EPS = 2.0**-23


def _spectrum_if_singular(lhs: torch.Tensor, alpha: float
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None:
    """None where ``lhs`` (in, in), a sum of Gram matrices, is well conditioned; else (its diagonal scaling D^-1/2
    (in,), the eigenvalues (in,) and eigenvectors (in, in) of the scaled S = D^-1/2 lhs D^-1/2, the threshold below
    which an eigenvalue is noise). Scaled to a unit diagonal, its entries are at most 1 and their float32 error about
    _GRAM_EPS whatever the features' scales (outlier features included); alpha's diagonal share keeps every scaled
    eigenvalue >= 1 - alpha, so no alpha below 1 by more than the threshold pays for this check (the default 0.95
    never does). A Cholesky pivot bounds the smallest eigenvalue from above: a pivot above the threshold costs one
    factorization and no eigendecomposition."""
    threshold = lhs.shape[0] * _GRAM_EPS
    if 1.0 - alpha > threshold:
        return None
    scale = torch.diagonal(lhs).rsqrt()  # (in,): every diagonal entry is > 0 here (unseen features were set to n)
    scaled = lhs * scale[:, None] * scale[None, :]  # (in, in), unit diagonal
    factor, info = torch.linalg.cholesky_ex(scaled)
    if int(info) == 0 and float(torch.diagonal(factor).square().min()) > threshold:
        return None
    values, vectors = torch.linalg.eigh(scaled)  # (in,), (in, in)
    return None if bool((values > threshold).all()) else (scale, values, vectors, threshold)


def _least_squares_or_mean(rhs: torch.Tensor, mean: torch.Tensor, scale: torch.Tensor, values: torch.Tensor,
                           vectors: torch.Tensor, threshold: float) -> torch.Tensor:
    """Of the x (in, rows) that solve lhs x = rhs (in, rows) as well as any, the one closest to ``mean`` (in, rows),
    the models' mean, measured in the inputs' scale (the metric of D = diag(lhs), which keeps RegMean's invariance
    to rescaling an input feature): x = mean + D^-1/2 S^+ D^-1/2 (rhs - lhs mean), S = D^-1/2 lhs D^-1/2 given by
    its spectrum (``values``, ``vectors``), eigenvalues below ``threshold`` taken as 0. An input direction no
    example spans keeps the mean instead of rounding noise."""
    keep = values > threshold
    v_r = vectors[:, keep]  # (in, r)
    y = v_r @ ((v_r.T @ (rhs * scale[:, None])) / values[keep][:, None])  # (in, rows): S y = D^-1/2 rhs on the range
    y_mean = mean / scale[:, None]  # D^1/2 mean
    y = y + y_mean - v_r @ (v_r.T @ y_mean)  # the mean's part outside the range
    return y * scale[:, None]  # x = D^-1/2 y


@method_config
class RegMean:
    """For each linear weight W (out, in): W = (sum_t W_t G~_t)(sum_t G~_t)^-1.

    G_t = X_t^T X_t / N_t is the Gram matrix of the layer's inputs on model t's data
    (``tiesmerge stats gram``); G~_t multiplies its off-diagonal entries by ``alpha``
    (alpha = 1 is exact RegMean: the weight that best reproduces every model's outputs on its
    own inputs, in least squares). Solved with ``torch.linalg.solve`` in float64, never by an
    explicit inverse. Where the summed matrix is numerically singular (alpha = 1 with statistics
    of too few or collinear examples), the directions the data determines are solved in least
    squares and the others take the models' mean, with a warning. Every other parameter (biases,
    norms, embeddings, layers without a Gram matrix in some model) is averaged. An input feature
    that no model's data ever activates (a zero row and column of sum_t G~_t) has no regression
    target; its column is averaged too.
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
        singular = _spectrum_if_singular(lhs, self.alpha)
        if singular is None:
            solution = torch.linalg.solve(lhs, rhs)  # (in, rows)
        else:
            solution = _least_squares_or_mean(rhs, tau64.mean(dim=0).T, *singular)
            kept = int((singular[1] > singular[3]).sum())
            warnings.warn(MergeWarning(
                f"regmean: tensor {ctx.name!r}: the summed Gram matrix determines only {kept} of its "
                f"{lhs.shape[0]} input directions (alpha {self.alpha:g}, too few or collinear examples in the "
                "statistics); those the data leaves open take the models' mean, as unseen inputs do; alpha < 1 "
                "(the default 0.95) or statistics from more examples avoid this"), stacklevel=3)
        return solution.T.to(tau.dtype)
