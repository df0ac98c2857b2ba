"""TSV-M, Task Singular Vectors: Merge (Gargiulo et al., CVPR 2025)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import ClassVar

from ..lazy import torch
from . import svd as linalg
from .base import (
    ChunkContext,
    Requirements,
    finite,
    fraction,
    method_config,
    non_negative_int,
    option,
    seed_value,
    steps,
)

# the authors' code selects alpha (our lam) on validation over numpy.linspace(0, 3, 31)[1:]
LAM_GRID = steps(0.1, 3.0, 0.1)


# the options every SVD method (TSV-M, Iso-C, Iso-CTS) shares, declared once
def scale_option() -> float:
    return option(1.0, "scale of the merged task vector (the paper's alpha)", unit="multiplier", check=finite,
                  grid=LAM_GRID)


EXCLUDE_DEFAULT = "text_projection"  # the reference's: CLIP's text projection is averaged


def exclude_option() -> str:
    return option(EXCLUDE_DEFAULT, "regular expression of 2-D tensor names to average instead "
                  "(the reference averages CLIP's text_projection); empty: none", unit="regex", check=linalg.regex)


def precision_option() -> str:
    return option("auto", "SVD precision: float32 with a float64 retry where ill-conditioned, or one forced",
                  choices=linalg.PRECISIONS)


@method_config
class TsvMerge:
    """Per 2-D weight: each task's tau_t truncated to its top k = floor(r * rank_fraction) singular
    triplets (r = min(rows, cols); rank_fraction 1/T for T tasks, as the reference has it), the
    concatenated left vectors U = [U_1..U_T] (rows, T k) and right vectors V = [V_1; ..; V_T]
    (T k, cols) replaced by their orthogonal polar factors (U = P S Q^T -> P Q^T, the whitening
    the reference computes with a second SVD), recombined with the concatenated singular values:
    delta = lam * polar(U) diag(S_1..S_T) polar(V). Every other tensor (biases, norms, 1-D and
    n-D parameters) and every name matched by ``exclude`` is averaged, then scaled by lam.
    Embedding matrices are 2-D and decomposed like any weight, as the reference does with CLIP's
    positional and token embeddings (``exclude`` "embed" averages them instead;
    ``randomized_above`` makes their SVDs cheaper).

    Follows the authors' code (github.com/AntoAndGar/task_singular_vectors, TSVM_utils.py,
    ``compute_and_sum_svd_mem_reduction``); the same function is in the Iso-C authors' code.
    Deliberate differences: (1) the polar factors are taken of the (rows, T k) and (T k, cols)
    blocks instead of the zero-padded (rows, r) and (r, cols) matrices (the same product when
    the blocks have full rank; it differs only where the padded SVD picks arbitrary vectors);
    (2) a matrix with r < T (no triplet per task; e.g. a 2-class head with 8 tasks) is averaged,
    where the reference returns zero for it; (3) the default lam is 1.0 (FusionBench's
    default, the scale at which each task keeps its own singular values); the authors select
    lam on validation over 0.1..3.0, the grid of ``tiesmerge tune``; (4) SVDs run in float32
    with a float64 retry where ill-conditioned, and optionally randomized above a size;
    (5) a task keeps at most its matrix's numerical rank (``svd.numerical_rank``): a LoRA
    update of rank 8 gives 8 triplets, not r/T of which all but 8 are rounding noise (whose
    arbitrary vectors would change the orthogonalisation of the others; the reference keeps
    them, and its result then depends on the SVD's precision). Full fine-tunes are unaffected.

    TSV-C (the paper's compression: each task's truncated factors stored, one reconstructed
    task vector per task at evaluation) yields one model per task, not a merge: not offered.
    """

    name: ClassVar[str] = "tsv_m"
    paper: ClassVar[str] = "https://arxiv.org/abs/2412.00081"
    summary: ClassVar[str] = "TSV-M: each task's top singular vectors, decorrelated by orthogonalisation, summed"

    lam: float = scale_option()
    rank_fraction: float | None = option(None, "fraction of each matrix's rank kept per task (default 1/T for T "
                                               "tasks, the paper's choice)", unit="fraction, (0, 1]",
                                         check=fraction)
    exclude: str = exclude_option()
    svd_precision: str = precision_option()
    randomized_above: int = option(0, "matrices with more entries than this use a seeded randomized SVD "
                                   "of the top triplets (0: never)", unit="entries", check=non_negative_int)
    power_iters: int = option(2, "power iterations of the randomized SVD (each multiplies the matrix twice; a few "
                              "suffice: the error falls geometrically)", unit="count, [0, 100]",
                              check=non_negative_int)
    seed: int = option(0, "seed of the randomized SVD's sketches (one stream per tensor)", unit="integer",
                       check=seed_value)

    def unused_options(self) -> dict[str, str]:
        """power_iters and seed, where no SVD is randomized (randomized_above 0)."""
        why = "randomized_above 0 makes every SVD exact, so no sketch is drawn or refined"
        return dict.fromkeys(("power_iters", "seed"), why) if self.randomized_above == 0 else {}

    def check_tensors(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """exclude against the model's merged tensors (see :func:`.svd.check_exclude`); a randomized_above that no
        decomposed matrix passes (its options then change nothing: hp63a c04) is said."""
        linalg.check_exclude(self.name, self.exclude, shapes, default=EXCLUDE_DEFAULT)
        pattern = linalg.exclude_pattern(self.exclude)
        sizes = [m * n for name, shape in shapes.items()
                 if (dims := linalg.matrix_shape(tuple(shape), name, pattern)) is not None for m, n in [dims]]
        import warnings

        from ..errors import MergeWarning

        ranks = [min(dims) for name, shape in shapes.items()
                 if (dims := linalg.matrix_shape(tuple(shape), name, pattern)) is not None]
        none_kept = [r for r in ranks if self.rank_fraction is not None and self.rank_per_task(r, 1) == 0]
        if none_kept:  # (hp69a c41: rank_fraction 0.01 on 32 x 32 matrices averaged every one without a word)
            warnings.warn(MergeWarning(
                f"{self.name}: rank_fraction {self.rank_fraction:g} keeps no singular triplet of {len(none_kept):,} of "
                f"the {len(ranks):,} matrices it decomposes (rank {max(none_kept):,} or less: floor(rank x "
                f"{self.rank_fraction:g}) is 0), so those are averaged, not merged by their singular vectors; "
                f"rank_fraction {math.ceil(1000 / min(none_kept)) / 1000:g} or more keeps one of each"), stacklevel=3)
        if self.randomized_above > 0 and sizes and max(sizes) <= self.randomized_above:
            warnings.warn(MergeWarning(
                f"{self.name}: randomized_above = {self.randomized_above:,} is not used: no matrix it decomposes has "
                f"more entries (the largest has {max(sizes):,}), so every SVD is exact, and power_iters and seed "
                "change nothing"), stacklevel=3)

    def requirements(self) -> Requirements:
        return Requirements(whole_tensors=True, workspace=self.workspace, temporaries=0)

    def workspace(self, shape: tuple[int, ...], n_models: int) -> int:
        """Bytes beyond the planner's working set: the concatenated factors, the largest SVD
        (a task's, or a polar factor's) and the recombination's temporaries."""
        if len(shape) != 2:
            return 0
        m, n = shape
        r = min(m, n)
        return 4 * (m * r + r * n + 2 * m * n) + max(linalg.svd_bytes(m, n), linalg.svd_bytes(m, r),
                                                     linalg.svd_bytes(r, n))

    def rank_per_task(self, r: int, n_models: int) -> int:
        """Triplets each task keeps of a rank-r matrix: floor(r * rank_fraction), exactly."""
        if self.rank_fraction is None:
            return r // n_models
        return min(r, math.floor(Fraction(repr(float(self.rank_fraction))) * r))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """tau (T, rows, cols) or (T, *S) -> (rows, cols) or (*S)."""
        factors = self._factors(tau, ctx)
        if factors is None:
            return tau.mean(dim=0).mul_(self.lam)
        u_orth, s, v_orth, _ = factors
        return (u_orth * s).matmul(v_orth).mul_(self.lam)  # (rows, cols)

    def task_vectors(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """(T, *S) -> (T, *S): each task's share of the merge before ``lam``, whose sum times ``lam`` is
        :meth:`merge`'s result: task t's own triplets, in the decorrelated bases (polar(U)[:, block t]
        diag(S_t) polar(V)[block t, :]), and tau_t / T for what is averaged. What AdaMerging (tiesmerge adapt)
        weighs per task and layer, with lam as the coefficients' start."""
        factors = self._factors(tau, ctx)
        if factors is None:
            return tau / tau.shape[0]
        u_orth, s, v_orth, kept = factors
        out = torch.zeros_like(tau, dtype=torch.float32)  # (T, rows, cols)
        start = 0
        for t, k in enumerate(kept):
            block = slice(start, start + k)
            out[t] = (u_orth[:, block] * s[block]).matmul(v_orth[block])  # (rows, k) (k, cols)
            start += k
        return out

    def _factors(self, tau: torch.Tensor, ctx: ChunkContext
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]] | None:
        """polar(U) (rows, K), the concatenated singular values (K,), polar(V) (K, cols) and the triplets each task
        kept (summing to K) of a 2-D weight; None where the tensor is averaged instead."""
        n = tau.shape[0]
        dims = linalg.matrix_shape(tuple(tau.shape[1:]), ctx.name, linalg.exclude_pattern(self.exclude))
        k = self.rank_per_task(min(dims), n) if dims else 0
        if dims is None or k == 0:
            return None
        us, ss, vs = [], [], []
        generator = None
        for t in range(n):
            what = f"{ctx.name!r} (task {t})"
            if 0 < self.randomized_above < tau[t].numel():
                if generator is None:  # one stream per tensor: the same draws whatever else is merged
                    generator = torch.Generator(device=tau.device).manual_seed((self.seed << 32) ^ ctx.stream)
                u, s, vh = linalg.randomized_svd(tau[t], k, generator=generator, power_iters=self.power_iters,
                                                 precision=self.svd_precision, what=what)
            else:
                u, s, vh = linalg.svd(tau[t], used=k, precision=self.svd_precision, what=what)
            bound = ctx.ranks[t] if ctx.ranks else None  # an adapter's r; None for a full fine-tune
            kept = min(k, linalg.numerical_rank(s, tuple(tau[t].shape), bound=bound))  # a rank-8 LoRA update keeps 8
            us.append(u[:, :kept])  # (rows, kept)
            ss.append(s[:kept])  # (kept,)
            vs.append(vh[:kept])  # (kept, cols)
        if not sum(len(x) for x in ss):  # every task vector of this matrix is zero
            return None
        u_orth = linalg.polar(torch.cat(us, dim=1), precision=self.svd_precision, what=f"{ctx.name!r} U")  # (rows, K)
        v_orth = linalg.polar(torch.cat(vs, dim=0), precision=self.svd_precision, what=f"{ctx.name!r} V")  # (K, cols)
        return u_orth, torch.cat(ss), v_orth, [len(x) for x in ss]
