"""DELLA-Merging (Deep, Bhardwaj & Poria, 2024): MagPrune, a random drop whose keep probability
grows with the entry's magnitude rank, then a rescale; followed by TIES's sign steps (``della``)
or a sum (``della_linear``), as mergekit 0.1.5 offers them."""

from __future__ import annotations

from typing import ClassVar

from ..errors import ConfigError
from ..lazy import torch
from . import ops
from .base import (
    ChunkContext,
    LinearKernel,
    Requirements,
    TiesKernel,
    finite,
    fraction,
    method_config,
    option,
    seed_value,
    steps,
    unit_interval,
)
from .breadcrumbs import combine, l1_rescale, per_task
from .dare import MIN_DENSITY
from .task_arithmetic import sum_kernel, warn_unnormalised
from .ties import AGGREGATES, ELECT_RULES, ZERO_SIGNS

_PAPER = "https://arxiv.org/abs/2406.11617"
RESCALES = ("inverse_p", "l1", "none")


def keep_probabilities(tau_t: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's keep probability of every entry of one whole tensor (*S) -> (*S) float32, with
    mergekit 0.1.5's operations: each row's (dim 1; a 1-D tensor is one row) entries ranked by
    |tau| in torch.argsort's ascending order, the rank r in 1..m mapped linearly onto
    [density - epsilon, density + epsilon]. A row of one entry gets density (mergekit divides
    0 by 0 there)."""
    if tau_t.numel() == 0:  # (0,), (3, 0, 2): no entry to rank (torch's min over an empty dim raises)
        return torch.empty(tau_t.shape, dtype=torch.float32, device=tau_t.device)
    rows = tau_t.reshape(1, -1) if tau_t.dim() < 2 else tau_t  # (rows, m, ...)
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(torch.float32) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    spread = (ranks - low) / (high - low)
    spread = torch.where(high > low, spread, torch.full_like(spread, 0.5)).clamp(0, 1)
    return ((density - epsilon) + spread * 2 * epsilon).reshape(tau_t.shape)


class _DellaBase:
    density: float
    epsilon: float
    rescale: str
    seed: int
    weights: tuple[float, ...] | None

    def unused_options(self) -> dict[str, str]:
        """epsilon, rescale and seed, where density 1 drops nothing (mergekit's rule: no draw, no rescale)."""
        why = "density 1 drops nothing, so no keep probability is drawn and nothing is rescaled (mergekit's rule)"
        return dict.fromkeys(("epsilon", "rescale", "seed"), why) if self.density >= 1 else {}

    def _requirements(self, kernel: TiesKernel | LinearKernel | None = None) -> Requirements:
        """``kernel``: the fused merge where nothing is dropped (density 1: mergekit's deterministic case)."""
        if self.density < 1 and not (0 < self.density - self.epsilon and self.density + self.epsilon < 1):
            raise ConfigError(f"density {self.density} +/- epsilon {self.epsilon} must lie in (0, 1) "
                              "(keep probabilities)")
        if self.density < 1 and self.density - self.epsilon < MIN_DENSITY:
            # a keep probability that rounds to 0 in float32 kept nothing and divided by 0 (inverse_p): "the merge
            # overflowed" (hp76a c37, density 1e-46); one below 2^-24 is kept at the draw's least step, 2^-24
            # (each printed whole: epsilon 0.19999998 as 0.2 read "0.2 - 0.2 = 2e-08", hp78a c05)
            raise ConfigError(f"density {self.density!r} - epsilon {self.epsilon!r} = {self.density - self.epsilon:g}: "
                              f"the smallest keep probability is below {MIN_DENSITY:g}, the least DELLA's 24-bit "
                              "random draw can keep entries at (a smaller one rounds to 0 in float32: every entry "
                              "dropped, and inverse_p divides by it)",
                              hint=f"give a density of at least epsilon + {MIN_DENSITY:g} (or a smaller epsilon)")
        # ranks run along each row and the L1 rescale over the tensor: each tensor is merged whole;
        # the random drop stays on the torch path (its ranks need every entry's place in the sort)
        if self.density >= 1:
            return Requirements(scope="per_tensor", whole_tensors=True, weights=self.weights, kernel=kernel)
        # the torch path's memory, measured (8 float32 models of 30522 x 384: 1.79 GiB above the inputs,
        # where the planner's elementwise default of 10 (n, E) temporaries said 4.82 GiB): the TIES steps
        # hold about 3 (n, E) float32 temporaries besides tau, and MagPrune, one model at a time, its
        # argsorts' int64 ranks, sort buffers and the hash's int64 counters (about 64 bytes an entry)
        return Requirements(scope="per_tensor", whole_tensors=True, weights=self.weights,
                            temporaries=3, workspace=_magprune_workspace)

    def _magprune(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """Drop each model's entries at random with MagPrune's probabilities, rescale; (n, *S) in place.
        Model t draws from stream (seed, t, tensor): the same drops on every device and run."""
        if self.density >= 1:  # mergekit: nothing dropped, nothing rescaled
            return tau
        for t in range(tau.shape[0]):
            probs = keep_probabilities(tau[t], self.density, self.epsilon)  # (*S)
            uniforms = ops.hash_uniform(self.seed + 7919 * t, ctx.stream, ctx.offset, probs.numel(),
                                        tau.device).view(probs.shape)
            mask = (uniforms < probs).to(tau.dtype)
            if self.rescale == "l1":
                tau[t] = l1_rescale(tau[t], tau[t] * mask)
            elif self.rescale == "inverse_p":  # by the draw's own keep probability, p up to its step of 2^-24:
                # 1/p scaled a p of 3e-8 (kept at 2^-24) 2x too much (hp77a c22)
                tau[t].mul_(mask).div_(ops.draw_keep_probability(probs))
            else:
                tau[t].mul_(mask)
        return tau


MAGPRUNE_BYTES_PER_ENTRY = 64  # one model's MagPrune on the torch path: int64 ranks twice, sort buffers, hash


def _magprune_workspace(shape: tuple[int, ...], n_models: int) -> int:
    """Bytes MagPrune's torch path holds for one tensor beyond the planner's (n, E) working set."""
    numel = 1
    for s in shape:
        numel *= s
    return MAGPRUNE_BYTES_PER_ENTRY * numel


def _density() -> float:
    return option(0.5, "mean keep probability of each task-vector entry (1 - DELLA's drop rate p)",
                  unit="fraction kept, (0, 1]", check=fraction, grid=(0.3, 0.5, 0.7))


def _epsilon() -> float:
    return option(0.15, "spread of the keep probabilities: density - epsilon for each row's smallest |tau| "
                  "to density + epsilon for its largest (mergekit's default)", unit="probability",
                  check=unit_interval, grid=(0.05, 0.1, 0.15))


def _rescale() -> str:
    return option("inverse_p", "after the drop: divide each kept entry by its keep probability (the paper, "
                  "unbiased), restore each tensor's L1 norm (mergekit's rescale: true), or nothing",
                  choices=RESCALES)


def _seed() -> int:
    return option(0, "seed of the counter-based random numbers", unit="integer", check=seed_value)


def _weights() -> tuple[float, ...] | None:
    return option(None, "per-model weights multiplying each pruned task vector", unit="one per model",
                  per_model=True)


@method_config
class Della(_DellaBase):
    """theta = base + lam * disjoint_aggregate(magprune(tau), elect(magprune(tau))).

    Follows mergekit 0.1.5's ``della``: keep probabilities from each row's magnitude ranks
    (``keep_probabilities``), its sign election (+ on a zero sum) and ``normalize`` (default
    true: ``aggregate=mean``). Differs on purpose: the random draws are counter-based (the same
    on every device and chunking; mergekit calls torch.bernoulli), and the default rescale is
    the paper's 1/p_i per kept entry (``rescale=l1`` is mergekit's).
    """

    name: ClassVar[str] = "della"
    paper: ClassVar[str] = _PAPER
    summary: ClassVar[str] = "drop entries at random, less likely the larger they are; rescale; TIES's sign steps"

    density: float = _density()
    epsilon: float = _epsilon()
    lam: float = option(1.0, "scale of the merged task vector (lambda)", unit="multiplier", check=finite,
                        grid=steps(0.5, 2.0, 0.1))
    rescale: str = _rescale()
    seed: int = _seed()
    weights: tuple[float, ...] | None = _weights()
    elect: str = option("mass", "sign election: total mass or count of signs", choices=ELECT_RULES)
    zero_sign: str = option("positive", "sign elected where the vote is exactly 0 (mergekit: positive)",
                            choices=ZERO_SIGNS[:2])
    aggregate: str = option("mean", "how agreeing values combine (mergekit's normalize: mean, else sum)",
                            choices=AGGREGATES)

    @property
    def weights_multiply(self) -> bool:
        """Whether lam * w_t scales model t's values (the executor's large-lam check): not under a weighted mean."""
        return self.aggregate != "mean"

    def requirements(self) -> Requirements:
        return self._requirements(TiesKernel(self.lam, self.elect, self.zero_sign, self.aggregate))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        return combine(self._magprune(tau, ctx), ctx, lam=self.lam, normalize=False,
                       ties=(self.elect, self.zero_sign, self.aggregate))

    def task_vectors(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        return per_task(self._magprune(tau, ctx), ctx, ties=(self.elect, self.zero_sign))


@method_config
class DellaLinear(_DellaBase):
    """theta = base + lam * sum_t w_t magprune(tau_t) (/ sum_t w_t with ``normalize_weights``).

    Follows mergekit 0.1.5's ``della_linear`` (its ``normalize``, default false, is
    ``normalize_weights``); differs as ``della``.
    """

    name: ClassVar[str] = "della_linear"
    paper: ClassVar[str] = _PAPER
    summary: ClassVar[str] = "drop entries at random, less likely the larger they are; rescale; sum"

    density: float = _density()
    epsilon: float = _epsilon()
    lam: float = option(1.0, "scale of the summed task vectors (lambda)", unit="multiplier", check=finite,
                        grid=steps(0.3, 1.5, 0.1))
    rescale: str = _rescale()
    seed: int = _seed()
    weights: tuple[float, ...] | None = _weights()
    normalize_weights: bool = option(False, "divide by the sum of the weights (mergekit's normalize)")

    @property
    def weights_multiply(self) -> bool:
        """Whether lam * w_t scales model t's task vector (the executor's large-lam check): not when normalised."""
        return not self.normalize_weights

    def requirements(self) -> Requirements:
        # weights summing to 0 divide by 1, as dare_linear and task_arithmetic say (hp82a c06: silent here)
        warn_unnormalised(self.name, self.weights, self.normalize_weights)
        return self._requirements(sum_kernel(self.weights, self.lam, self.normalize_weights))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        return combine(self._magprune(tau, ctx), ctx, lam=self.lam, normalize=self.normalize_weights, ties=None)

    def task_vectors(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        return per_task(self._magprune(tau, ctx), ctx, ties=None)
