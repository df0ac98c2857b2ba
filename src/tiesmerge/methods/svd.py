"""Singular value decompositions for the SVD merge methods (TSV-M, Iso-C, Iso-CTS). Pure math.

* :func:`svd`: the thin SVD in float32, redone in float64 when float32 fails to converge, gives
  non-finite factors, or the spectrum the caller uses is ill-conditioned (its smallest used
  singular value below :data:`ILL_CONDITIONED` of the largest: float32's absolute error,
  about eps * s_max, is then more than 0.1 % of that value, and its singular vectors are
  unreliable). The factors come back in float32 either way: rounding accurate float64 vectors
  to float32 costs eps per entry, not eps * s_max / s_i.
* :func:`randomized_svd`: a seeded randomized range finder (Halko, Martinsson and Tropp 2011,
  Alg. 4.4: Gaussian sketch, power iterations re-orthonormalised by QR) for the top-k triplets
  of large matrices such as embeddings.
* :func:`polar`: the orthogonal polar factor P Q^T of X = P S Q^T, the orthogonal matrix
  nearest to X (Procrustes): how TSV-M and Iso-CTS orthogonalise concatenated singular vectors.
* :func:`svd_bytes`: the memory one SVD of an (m, n) matrix may need, for the planner.
* :func:`numerical_rank`: how many singular values stand above float32's rounding floor, past a
  cliff. A low-rank task vector (a LoRA adapter's B A: rank 8 in a 384 x 384 matrix) has only
  that many meaningful triplets; the others are rounding noise whose singular vectors are
  arbitrary (a float32 and a float64 SVD pick different ones; any change of the product's
  rounding moves them), so the methods never use them.

Shapes: x (m, n); r = min(m, n); U (m, r), S (r,), Vh (r, n).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..lazy import torch

if TYPE_CHECKING:
    import torch as torch_types

    from ..io.patterns import ModulePattern

__all__ = ["ILL_CONDITIONED", "PRECISIONS", "svd", "numerical_rank", "known_rank", "randomized_svd", "polar",
           "svd_bytes", "regex", "matrix_shape", "exclude_pattern", "check_exclude", "OVERSAMPLE"]

ILL_CONDITIONED = 1e-4  # s_used / s_max below this: redo in float64 (see the module docstring)
PRECISIONS = ("auto", "float32", "float64")  # auto: float32, float64 where needed
OVERSAMPLE = 10  # extra sketch columns of the randomized SVD (Halko et al. recommend 5-10)

log = logging.getLogger(__name__)

FLOAT32_EPS = 2.0**-23  # the task vectors arrive in float32 at best: their rounding sets the floor
CLIFF = 1e-4  # a drop this steep between adjacent singular values separates a low rank from rounding noise


def known_rank(ranks: Sequence[int | None] | None) -> int | None:
    """The structural bound on the rank of a sum of task vectors, from each one's (``ChunkContext.ranks``: a
    LoRA adapter's r): their sum, or None where any is unknown (a full fine-tune's)."""
    if ranks is None or any(r is None for r in ranks):
        return None
    return sum(ranks)


def numerical_rank(s: torch_types.Tensor, shape: tuple[int, ...], scale: float = 0.0,
                   bound: int | None = None) -> int:
    """The rank of an (m, n) matrix with singular values s (descending) as the merges use it. The
    rounding floor is max(m, n) * eps32 * max(s_0, scale) (numpy.linalg.matrix_rank's rule at float32,
    the inputs' precision); a matrix is taken as low-rank only where its spectrum drops off a cliff
    (s_k / s_k-1 < CLIFF, the steepest drop in it) into values that all lie below that floor: a LoRA
    update B A (rank 8 in 384 x 384: a drop of 1e-5 to 1e-7 after the 8th value, in a float32 or a
    float64 SVD). Its real small values above the cliff stay, though they may lie below the floor
    themselves. A spectrum that decays smoothly is kept whole, as the references keep it: full
    fine-tunes' task matrices do (adjacent values never more than 1e3 apart on the MiniLM benchmark,
    although 110 of 351 reach below the floor). ``scale``: the largest singular value of the matrices
    this one was computed from (a residual tau - U U^T tau carries their rounding, not its own); a
    matrix wholly below the floor, or zero, has rank 0. ``bound``: the rank the matrix's structure allows
    (``known_rank``; a LoRA update's r), which caps the answer: the cliff after a sum of low-rank updates
    can be shallower than CLIFF (2e-4 after the 64th value of eight rank-8 adapters' sum, measured on
    the LoRA benchmark), and the values past it are rounding noise all the same."""
    if bound is not None:
        return min(bound, numerical_rank(s, shape, scale))
    n = s.numel()
    if n == 0:
        return 0
    floor = max(shape[-2:]) * FLOAT32_EPS * max(float(s[0]), scale)
    if float(s[0]) <= floor:
        return 0
    if n == 1 or float(s[-1]) > floor:
        return n
    drops = s[1:] / s[:-1].clamp_min(torch.finfo(s.dtype).tiny)  # (n - 1,) s_k / s_k-1
    k = int(drops.argmin()) + 1
    return k if float(drops[k - 1]) < CLIFF and float(s[k]) <= floor else n


def _converges(x: torch_types.Tensor) -> tuple[torch_types.Tensor, ...] | None:
    """The thin SVD of x in its own dtype, or None where LAPACK/cuSOLVER did not converge. A wide
    matrix is decomposed as its transpose (tall): 2.3x less CPU for 1024 x 2816 in float32 on one
    thread (x = U S Vh  <=>  x^T = Vh^T S U^T)."""
    try:
        if x.shape[-2] < x.shape[-1]:
            u, s, vh = torch.linalg.svd(x.T, full_matrices=False)
            return vh.T, s, u.T
        return torch.linalg.svd(x, full_matrices=False)
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError: no convergence
        return None


def svd(x: torch_types.Tensor, *, used: int | None = None, precision: str = "auto",
        what: str = "") -> tuple[torch_types.Tensor, torch_types.Tensor, torch_types.Tensor]:
    """x (m, n) -> U (m, r), S (r,), Vh (r, n), float32 (see the module docstring).

    ``used``: how many leading singular triplets the caller uses (None: all r); only their
    conditioning decides the float64 retry. ``precision``: "auto", or "float32"/"float64" to
    force one. ``what`` names the matrix in the log and in the error where both precisions fail.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    x32 = x.float()
    if precision != "float64":
        factors = _converges(x32)
        if precision == "float32" and factors is not None:
            return _settle_rank(x, *factors)
        if factors is not None and _trustworthy(*factors, used):
            return factors
        log.debug("svd of %s %s: float32 %s, redone in float64", what or "a matrix", tuple(x.shape),
                  "did not converge" if factors is None else "ill-conditioned")
    factors = _converges(x.double())
    if factors is None:
        raise FloatingPointError(f"the SVD of {what or 'a matrix'} {tuple(x.shape)} did not converge in float64 "
                                 "either (non-finite or degenerate values?)")
    u, s, vh = factors
    return u.float(), s.float(), vh.float()


def _settle_rank(x: torch_types.Tensor, u: torch_types.Tensor, s: torch_types.Tensor, vh: torch_types.Tensor
                 ) -> tuple[torch_types.Tensor, torch_types.Tensor, torch_types.Tensor]:
    """Forced float32 factors of ``x``, with the singular values past ``x``'s rank set to 0 where float32 alone
    cannot tell: a spectrum that reaches the rounding floor without a cliff is, in float32, either a full
    fine-tune's smooth tail or a low-rank sum whose smallest real values (1e-3 of the largest) sit a few
    hundred times above float32's noise. float64's values (no vectors: the cheaper half of an SVD) decide, so
    the methods' numerical_rank counts the same rank in float32 as in float64."""
    shape = tuple(x.shape)
    floor = max(shape[-2:]) * FLOAT32_EPS * float(s[0]) if s.numel() else 0.0
    if not s.numel() or float(s[-1]) > floor or numerical_rank(s, shape) < s.numel():
        return u, s, vh  # nothing below the floor, or a clear cliff
    rank = numerical_rank(torch.linalg.svdvals(x.double()), shape)
    if rank < s.numel():
        s = s.clone()
        s[rank:] = 0.0  # rounding, not directions of x
    return u, s, vh


def _trustworthy(u: torch_types.Tensor, s: torch_types.Tensor, vh: torch_types.Tensor, used: int | None) -> bool:
    """Whether float32 factors are finite and the used spectrum is well-conditioned."""
    if not (bool(torch.isfinite(s).all()) and bool(torch.isfinite(u).all()) and bool(torch.isfinite(vh).all())):
        return False
    # only the triplets above the rounding floor are ever used: a LoRA update's noise triplets are
    # tiny by nature, not a sign that float32 failed
    k = min(s.numel() if used is None else used, numerical_rank(s, (u.shape[0], vh.shape[1])))
    if k == 0:
        return True
    largest = float(s[0])
    return largest == 0.0 or float(s[k - 1]) >= ILL_CONDITIONED * largest


def randomized_svd(x: torch_types.Tensor, k: int, *, generator: torch_types.Generator, power_iters: int = 2,
                   precision: str = "auto", what: str = "") -> tuple[torch_types.Tensor, ...]:
    """x (m, n) -> the top-k U (m, k), S (k,), Vh (k, n), float32, from a seeded Gaussian sketch.

    Sketch width l = k + OVERSAMPLE (at most r); each power iteration multiplies by x^T then x
    and re-orthonormalises by QR, sharpening the spectrum (error ~ (s_{l+1} / s_k)^(2q+1)).
    The small (l, n) projection is decomposed by :func:`svd`.
    """
    m, n = x.shape
    width = min(k + OVERSAMPLE, m, n)
    x32 = x.float()
    omega = torch.randn(n, width, generator=generator, device=x.device, dtype=torch.float32)  # (n, l)
    q, _ = torch.linalg.qr(x32 @ omega)  # (m, l)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(x32.T @ q)  # (n, l)
        q, _ = torch.linalg.qr(x32 @ z)  # (m, l)
    u_small, s, vh = svd(q.T @ x32, used=k, precision=precision, what=what)  # (l, l), (l,), (l, n)
    return (q @ u_small)[:, :k], s[:k], vh[:k]


def polar(x: torch_types.Tensor, *, precision: str = "auto", what: str = "") -> torch_types.Tensor:
    """x (m, n) -> P Q^T (m, n), x = P S Q^T: the nearest matrix with orthonormal columns (m >= n)
    or rows (m < n). Every singular vector is used, so its conditioning is that of all of S."""
    p, sv, qt = svd(x, precision=precision, what=what)
    if sv.numel() > 1 and float(sv[-1]) <= DEPENDENT * float(sv[0]):
        import warnings

        from ..errors import MergeWarning

        rank = int((sv > DEPENDENT * sv[0]).sum())
        tensor = what.removesuffix(" U").removesuffix(" V")  # one message for both factors of a tensor
        warnings.warn(MergeWarning(
            f"{tensor}: the tasks' singular vectors are linearly dependent (rank {rank} of the {sv.numel()} "
            "concatenated; tasks that share or oppose directions, e.g. one task vector the negative of another): "
            "their orthogonalisation is not unique, so the merge is arbitrary along those directions; TIES or task "
            "arithmetic suits such models"), stacklevel=4)
    return p @ qt


# singular vectors are unit vectors, so the concatenation's largest singular value is at most sqrt(T); one below
# this share of it is a dependence (tau and -tau, a task twice), not the ordinary overlap of tasks' subspaces
DEPENDENT = 1e-5


def svd_bytes(m: int, n: int) -> int:
    """Peak bytes of one :func:`svd` of an (m, n) matrix: the float32 attempt and the float64
    retry (12 bytes per element), each of the input's copy, U, S, Vh and LAPACK's divide and
    conquer workspace (gesdd: about 7 r^2 + max(m, n) + 10 r elements)."""
    r = min(m, n)
    return 12 * (m * n + m * r + r * n + 7 * r * r + max(m, n) + 11 * r)


def matrix_shape(shape: tuple[int, ...], name: str, exclude: ModulePattern | None) -> tuple[int, int] | None:
    """(m, n) if the SVD methods decompose a tensor of this shape and name: 2-D, non-empty and not
    matched by ``exclude``; else None (the tensor is averaged, as the references do)."""
    if len(shape) != 2 or 0 in shape or (exclude is not None and exclude.search(name)):
        return None
    return shape[0], shape[1]


def regex(value: object) -> str | None:
    """An option check: an empty string (nothing excluded) or a regular expression that the
    backtracking-free automaton runs (a pattern like ``((\\w|\\.)+)+!`` cannot hang the merge)."""
    if not isinstance(value, str):
        return "must be a regular expression (a string)"
    if value:
        from ..errors import CheckpointError
        from ..io.patterns import ModulePattern

        try:
            ModulePattern.compile(value, "exclude", anywhere=True)
        except CheckpointError as exc:
            shown = repr(value[:80])  # the message names the key; the option check names the option
            return exc.message[exc.message.find(shown) + len(shown) + 1:] if shown in exc.message else exc.message
    return None


def check_exclude(method: str, value: str, shapes: Mapping[str, tuple[int, ...]], default: str = "") -> None:
    """``exclude`` against the model's merged tensors (name -> shape): one matching no matrix (a typo: ``embd``; or
    only 1-D tensors, which are never decomposed) changes nothing, one matching every matrix (``.``) decomposes
    nothing, the merge a scaled mean: either is said, as a filter of slerp's is (the default, CLIP's
    text_projection, matches nothing in most models: no word then)."""
    import warnings

    from ..errors import MergeWarning

    pattern = exclude_pattern(value)
    if pattern is not None and pattern.clock is not None:  # each merge its own budget: the compiled pattern (and
        pattern.clock.spent = 0.0  # its names' answers) outlive a merge in a process (hp49 c24: later merges refused)
    matrices = [n for n, shape in shapes.items() if matrix_shape(tuple(shape), n, None) is not None]
    if pattern is None or not matrices:
        return
    hits = sum(1 for n in matrices if pattern.search(n))
    if hits == 0 and value != default:
        warnings.warn(MergeWarning(f"{method}: exclude {value!r} matches no matrix of the model (the 2-D tensors it "
                                   "decomposes; others are averaged anyway), so it changes nothing (a pattern is "
                                   "searched in each tensor's name, e.g. 'embed')"), stacklevel=3)
    elif hits == len(matrices):
        warnings.warn(MergeWarning(f"{method}: exclude {value!r} matches every matrix of the model, so none is "
                                   "decomposed: the merge is the models' mean scaled by lam"), stacklevel=3)


@functools.lru_cache(maxsize=64)
def exclude_pattern(value: str) -> ModulePattern | None:
    """``exclude``, compiled once, matched like ``re.search`` in time linear in the name."""
    from ..errors import ConfigError
    from ..io.patterns import MatchClock, ModulePattern

    if not value:
        return None
    # a recipe's exclude may be a stranger's: matched on the regex package under a time limit a name, all names
    # under one budget, each name once (hp48 c41: 160 s for a 60 KB model, in Python, twice)
    clock = MatchClock("exclude", "write exclude as a tensor name fragment or a plain regex (e.g. 'embed|lm_head')",
                       names="the model's tensor names", one="the tensor name", error=ConfigError,
                       elsewhere="no model's names need that", hang="")
    return ModulePattern.compile(value, "exclude", anywhere=True, clock=clock)
