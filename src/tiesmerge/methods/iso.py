"""Iso-C and Iso-CTS, isotropic merging in common and task-specific subspaces (Marczak et al.,
ICML 2025)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from ..lazy import torch
from . import svd as linalg
from .base import ChunkContext, Requirements, fraction, method_config, option
from .tsv import EXCLUDE_DEFAULT, exclude_option, precision_option, scale_option


def _common_dims(r: int, n_models: int, common_fraction: float) -> tuple[int, int]:
    """(common, per task) dimensions of a rank-r matrix, as the reference sizes them: the common
    space floor(r * f), then the rest rounded to a multiple of T so each task gets the same
    share. Where rounding up would take more than r (small r, small f), the multiple of T
    is rounded down instead (the reference would slice with a negative index there)."""
    common = int(r * common_fraction)
    specific = round((r - common) / n_models) * n_models
    if specific > r:
        specific = (r // n_models) * n_models
    return r - specific, specific // n_models


@method_config
class IsoC:
    """Per 2-D weight: the summed task matrix M = sum_t tau_t, its singular values all replaced
    by their mean: delta = lam * mean(S) U V^T for M = U S V^T (thin SVD, r = min(rows, cols)
    values averaged). The spectrum becomes isotropic, so no direction of M dominates. Every
    other tensor, and every name matched by ``exclude``, is averaged, then scaled by lam.
    Embedding matrices are decomposed like any 2-D weight, as in the reference.

    Follows the authors' code (github.com/danielm1405/iso-merging, src/utils/iso.py, ``iso_c``);
    FusionBench's port has the same semantics. Deliberate differences: the default lam is
    1.0 (FusionBench's default); the authors select lam on validation over 0.1..3.0 (their
    ``linspace(0, 3, 31)[1:]``), the grid of ``tiesmerge tune``; SVDs run in float32 with a
    float64 retry where ill-conditioned; only M's numerical rank is flattened
    (``svd.numerical_rank``, capped by the adapters' own ranks where the inputs are adapters):
    for LoRA updates (M of rank T x 8 in a 384-wide matrix) the
    reference would give every null direction of M the mean singular value, adding arbitrary
    full-rank noise whose vectors depend on the SVD's precision; here the mean of the nonzero
    spectrum goes to M's own directions (the same nuclear norm). Full fine-tunes, whose M has
    full numerical rank, are unaffected. Every singular vector of M is used, so a randomized
    SVD would save nothing here: none is offered.
    """

    name: ClassVar[str] = "iso_c"
    paper: ClassVar[str] = "https://arxiv.org/abs/2502.04959"
    summary: ClassVar[str] = "Iso-C: the summed task matrices with their singular values flattened to the mean"

    lam: float = scale_option()
    exclude: str = exclude_option()
    svd_precision: str = precision_option()

    def check_tensors(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """exclude against the model's merged tensors (see :func:`.svd.check_exclude`)."""
        linalg.check_exclude(self.name, self.exclude, shapes, default=EXCLUDE_DEFAULT)

    def requirements(self) -> Requirements:
        return Requirements(whole_tensors=True, workspace=self.workspace, temporaries=0)

    def workspace(self, shape: tuple[int, ...], n_models: int) -> int:
        """Bytes beyond the planner's working set: the sum, its SVD, the recombination."""
        if len(shape) != 2:
            return 0
        m, n = shape
        return 4 * 3 * m * n + linalg.svd_bytes(m, n)

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """tau (T, rows, cols) or (T, *S) -> (rows, cols) or (*S)."""
        if linalg.matrix_shape(tuple(tau.shape[1:]), ctx.name, linalg.exclude_pattern(self.exclude)) is None:
            return tau.mean(dim=0).mul_(self.lam)
        bound = linalg.known_rank(ctx.ranks)  # adapters: the sum of their ranks; full fine-tunes: None
        # (rows, r), (r,), (r, cols)
        u, s, vh = linalg.svd(tau.sum(dim=0), used=bound, precision=self.svd_precision, what=repr(ctx.name))
        # r for a full fine-tune; the sum of the ranks for LoRA
        rank = linalg.numerical_rank(s, tuple(tau.shape[1:]), bound=bound)
        if rank == 0:
            return tau.mean(dim=0).mul_(self.lam)  # zeros
        return (u[:, :rank] @ vh[:rank]).mul_(s[:rank].mean() * self.lam)  # (rows, cols)


@method_config
class IsoCTS:
    """Per 2-D weight (r = min(rows, cols), T tasks): the top k_c singular triplets of the summed
    task matrix M = sum_t tau_t span the common subspace (k_c about r * common_fraction, the rest
    of r rounded to a multiple of T); each task's tau_t, projected off the common left subspace
    (tau_t - U_c U_c^T tau_t), gives its top (r - k_c) / T triplets; the task-specific and common
    left vectors, concatenated (rows, r), and right vectors (r, cols) are replaced by their
    orthogonal polar factors, and every singular value by the mean of the r concatenated ones:
    delta = lam * mean(S) polar(U) polar(V). Every other tensor, and every name matched by
    ``exclude``, is averaged, then scaled by lam. Embedding matrices are decomposed like any
    2-D weight, as in the reference.

    Follows the authors' code (github.com/danielm1405/iso-merging, src/utils/iso.py, ``iso_cts``,
    common_space_fraction 0.8 as their README runs it); FusionBench's port has the same
    semantics. Deliberate differences: the default lam is 1.0 (FusionBench's default); the
    authors select lam on validation over 0.1..3.0, the grid of ``tiesmerge tune``; where the
    rest of r would round up past r (tiny matrices, tiny fractions) it is rounded down; SVDs
    run in float32 with a float64 retry where ill-conditioned; the common space and each task's
    share stop at their matrices' numerical rank (``svd.numerical_rank``; see Iso-C: only
    low-rank updates such as LoRA's are affected). 80 % of M's spectrum is used,
    so a randomized SVD would save little: none is offered.
    """

    name: ClassVar[str] = "iso_cts"
    paper: ClassVar[str] = "https://arxiv.org/abs/2502.04959"
    summary: ClassVar[str] = ("Iso-CTS: the summed task matrices' top subspace plus each task's own, "
                              "orthogonalised, with a flat spectrum")

    lam: float = scale_option()
    common_fraction: float = option(0.8, "fraction of each matrix's rank given to the common subspace (the rest "
                                    "is shared equally by the tasks)", unit="fraction, (0, 1]", check=fraction)
    exclude: str = exclude_option()
    svd_precision: str = precision_option()

    def notices(self) -> list[str]:
        """common_fraction 1 leaves no task-specific directions: the merge is Iso-C's (hp87a c83: said nothing, where
        consensus' k = 0 says its own)."""
        if self.common_fraction == 1:
            return ["common_fraction = 1 gives the whole rank to the common subspace and none to the tasks' own, so "
                    "the merge is iso_c's; the paper's Iso-CTS uses 0.8"]
        return []

    def check_tensors(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """exclude against the model's merged tensors (see :func:`.svd.check_exclude`)."""
        linalg.check_exclude(self.name, self.exclude, shapes, default=EXCLUDE_DEFAULT)

    def requirements(self) -> Requirements:
        return Requirements(whole_tensors=True, workspace=self.workspace, temporaries=0)

    def workspace(self, shape: tuple[int, ...], n_models: int) -> int:
        """Bytes beyond the planner's working set: the sum, the concatenated factors, the
        projection's temporaries and the largest SVD."""
        if len(shape) != 2:
            return 0
        m, n = shape
        r = min(m, n)
        return 4 * (4 * m * n + 2 * m * r + 2 * r * n) + linalg.svd_bytes(m, n)

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """tau (T, rows, cols) or (T, *S) -> (rows, cols) or (*S)."""
        dims = linalg.matrix_shape(tuple(tau.shape[1:]), ctx.name, linalg.exclude_pattern(self.exclude))
        if dims is None:
            return tau.mean(dim=0).mul_(self.lam)
        n, r = tau.shape[0], min(dims)
        common, per_task = _common_dims(r, n, self.common_fraction)
        prec = self.svd_precision
        bound = linalg.known_rank(ctx.ranks)  # adapters: the sum of their ranks; full fine-tunes: None
        u, s, vh = linalg.svd(tau.sum(dim=0), used=common, precision=prec, what=repr(ctx.name))
        common = min(common, linalg.numerical_rank(s, dims, bound=bound))  # never M's rounding-noise directions
        u_c = u[:, :common]  # (rows, k_c)
        us, ss, vs = [], [], []
        for t in range(n):
            if per_task == 0:
                break
            specific = tau[t] - u_c @ (u_c.T @ tau[t])  # (rows, cols): off the common left subspace
            u_t, s_t, vh_t = linalg.svd(specific, used=per_task, precision=prec, what=f"{ctx.name!r} (task {t})")
            # what the common space leaves of a low-rank task: its numerical rank, not rounding noise
            kept = min(per_task, linalg.numerical_rank(s_t, dims, scale=float(s[0]),
                                                       bound=ctx.ranks[t] if ctx.ranks else None))
            us.append(u_t[:, :kept])
            ss.append(s_t[:kept])
            vs.append(vh_t[:kept])
        if common + sum(len(x) for x in ss) == 0:  # every task vector of this matrix is zero
            return tau.mean(dim=0).mul_(self.lam)
        # the reference's order: task-specific blocks first, then the common space
        u_all = torch.cat([*us, u_c], dim=1)  # (rows, K), K = r for a full fine-tune
        v_all = torch.cat([*vs, vh[:common]], dim=0)  # (K, cols)
        mean = torch.cat([*ss, s[:common]]).mean()
        u_orth = linalg.polar(u_all, precision=prec, what=f"{ctx.name!r} U")
        v_orth = linalg.polar(v_all, precision=prec, what=f"{ctx.name!r} V")
        return (u_orth @ v_orth).mul_(mean * self.lam)
