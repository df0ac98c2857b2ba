"""Model Breadcrumbs (Davari & Belilovsky, ECCV 2024): drop each task vector's largest outliers and
its smallest entries, keep the middle, then sum (``breadcrumbs``) or take TIES's sign steps
(``breadcrumbs_ties``), as mergekit 0.1.5 offers them."""

from __future__ import annotations

from typing import ClassVar

from ..lazy import torch
from . import ops
from .base import (
    SCOPES,
    Band,
    ChunkContext,
    Cut,
    LinearKernel,
    Requirements,
    TiesKernel,
    TopK,
    finite,
    fraction,
    method_config,
    option,
    steps,
    unit_interval,
)
from .task_arithmetic import sum_kernel, warn_unnormalised, weighted_sum
from .ties import AGGREGATES, ELECT_RULES, ZERO_SIGNS

_PAPER = "https://arxiv.org/abs/2312.06795"
THRESHOLD_TIES = ("keep", "sort")
RESCALES = ("none", "l1")


def _density() -> float:
    return option(0.2, "fraction of each task vector's entries kept (the middle of the magnitudes)",
                  unit="fraction kept, (0, 1]", check=fraction, grid=(0.1, 0.2, 0.3, 0.5))


def _gamma() -> float:
    return option(0.01, "fraction of each task vector's largest-magnitude entries dropped as outliers "
                  "(mergekit's gamma; its default)", unit="fraction dropped, [0, 1]", check=unit_interval,
                  grid=(0.0, 0.01, 0.05))


def _threshold_ties() -> str:
    return option("keep", "which entries survive: 'keep': every entry with t_low <= |tau| < t_outlier, the "
                  "thresholds exact over the scope (ties kept, order-free); 'sort': mergekit 0.1.5's exact "
                  "counts per tensor in torch.sort's ascending order (needs scope=per_tensor)",
                  choices=THRESHOLD_TIES)


def _weights() -> tuple[float, ...] | None:
    return option(None, "per-model weights multiplying each masked task vector", unit="one per model",
                  per_model=True)


def mergekit_outlier_mask(tau_t: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """mergekit 0.1.5's ``magnitude_outliers`` mask of one whole tensor (*S) -> (*S) 0/1 float32:
    k = int(density * numel) kept, int(gamma * numel) outliers dropped (fewer if they would cut
    into k), the survivors a run of torch.sort's ascending |tau| order (``Band.positions``)."""
    numel = tau_t.numel()
    lo, hi = Band(density, gamma).positions(numel)
    order = torch.sort(tau_t.abs().reshape(-1), descending=False).indices  # (numel,)
    mask = torch.zeros(numel, dtype=tau_t.dtype, device=tau_t.device)
    mask[order[lo:hi]] = 1
    return mask.reshape(tau_t.shape)


def l1_rescale(tau_t: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """mergekit's ``rescale: true``: scale the masked tensor back to the whole tensor's L1 norm
    (left as it is when either norm is below 1e-7)."""
    before, after = tau_t.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def combine(masked: torch.Tensor, ctx: ChunkContext, *, lam: float, normalize: bool,
            ties: tuple[str, str, str] | None) -> torch.Tensor:
    """mergekit's generalized task arithmetic after the sparsification, (n, *S) -> (*S):
    weighted deltas w_t tau_t; with ``ties`` = (elect, zero_sign, aggregate), TIES's election and
    disjoint aggregate, else their sum, divided by sum_t w_t with ``normalize`` (a sum below
    1e-8 divides by 1); times ``lam``. The operations and their order are mergekit's."""
    if ties is not None:
        elect, zero_sign, aggregate = ties
        gamma = ops.resolve_zero_sign(ops.elect(masked, ctx.weights, elect), zero_sign)
        return ops.disjoint_aggregate(masked, gamma, ctx.weights, aggregate).mul_(lam)
    return weighted_sum(masked, ctx, lam=lam, normalize=normalize)


def per_task(masked: torch.Tensor, ctx: ChunkContext, *, ties: tuple[str, str] | None) -> torch.Tensor:
    """The per-task vectors behind :func:`combine` (AdaMerging's), (n, *S) -> (n, *S): w_t masked_t,
    with ``ties`` = (elect, zero_sign) only the values agreeing with the elected sign; no ``lam``
    and no division by the weights' sum (the learned coefficients take their place)."""
    if ties is None:
        return masked if ctx.weights is None else masked.mul_(ops.broadcast_per_model(ctx.weights, masked))
    gamma = ops.resolve_zero_sign(ops.elect(masked, ctx.weights, ties[0]), ties[1])
    return ops.agreeing(masked, gamma, ctx.weights)


class _BreadcrumbsBase:
    """The mask both methods share; fields are declared on the concrete classes."""

    density: float
    gamma: float
    scope: str
    threshold_ties: str
    rescale: str
    weights: tuple[float, ...] | None

    def unused_options(self) -> dict[str, str]:
        """gamma and rescale, where density 1 keeps every entry (mergekit's rule: no band is cut, outliers included,
        so the L1 norm is the task vector's own); threshold_ties there too, where no threshold is drawn."""
        if self.density < 1:
            return {}
        return {"gamma": "density 1 keeps every entry, outliers included (mergekit's rule)",
                "rescale": "density 1 keeps every entry, so the L1 norm restored is the one already there",
                "threshold_ties": "density 1 keeps every entry, so no threshold is drawn"}

    def _gamma(self) -> float:
        """The outliers' share that is dropped: gamma, or 1 - density where the two pass 1 together (see notices)."""
        return min(self.gamma, 1.0 - self.density) if self.density < 1 else self.gamma

    def notices(self) -> list[str]:
        """density + gamma past 1 (said once per merge, by methods.base.warn_unused)."""
        if self._gamma() >= self.gamma:
            return []
        return [f"density {self.density:g} + gamma {self.gamma:g} is past 1, so not both can hold: the smallest "
                f"{self.density:g} of each tensor is kept and only the rest, {1 - self.density:.3g}, dropped as "
                "outliers (mergekit's rule)"]

    def _problems(self) -> list[str]:
        problems = []
        if self.threshold_ties == "sort" and self.scope != "per_tensor":
            problems.append("threshold_ties='sort' (mergekit's exact counts) needs scope='per_tensor'")
        if self.rescale == "l1" and self.scope != "per_tensor":
            problems.append("rescale (mergekit's per-tensor L1 rescale) needs scope='per_tensor'")
        return problems

    def _requirements(self, kernel: TiesKernel | LinearKernel | None = None) -> Requirements:
        """``kernel``: the fused merge of mergekit's band (exact counts, no rescale) where it applies."""
        from ..errors import ConfigError

        problems = self._problems()
        if problems:
            raise ConfigError(problems)
        whole = self.threshold_ties == "sort" or self.rescale == "l1"
        # density + gamma past 1: both cannot hold; mergekit keeps the density (the band starts at the smallest entry)
        # and drops only the rest as outliers. The 'keep' rule cut gamma's outliers and so kept 1 - gamma (hp63a c47:
        # 50 % against sort's 89 %, without a word): both keep the density now, and it is said
        gamma = self._gamma()
        if self.threshold_ties == "sort" or self.density >= 1:
            fused = kernel if self.threshold_ties == "sort" and self.density < 1 and self.rescale == "none" else None
            return Requirements(scope=self.scope, whole_tensors=whole, weights=self.weights, kernel=fused)
        cuts = (Cut("outliers", TopK(gamma)),) if gamma > 0 else ()
        return Requirements(trim=TopK(min(1.0, self.density + gamma)), cuts=cuts, scope=self.scope,
                            whole_tensors=whole, weights=self.weights)

    def _mask(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """Each model's middle band, in place on tau (n, *S); rescaled with ``rescale``."""
        if self.density >= 1:  # mergekit: a density of 1 keeps the tensor as it is, outliers too
            return tau
        original = tau.clone() if self.rescale == "l1" else None
        if self.threshold_ties == "sort":
            for t in range(tau.shape[0]):
                tau[t].mul_(mergekit_outlier_mask(tau[t], self.density, self.gamma))
        else:
            keep = tau.abs() >= ops.broadcast_per_model(ctx.thresholds, tau)  # (n, *S): above the low cut
            if "outliers" in ctx.cuts:
                keep &= tau.abs() < ops.broadcast_per_model(ctx.cuts["outliers"], tau)  # below the outliers
            tau.mul_(keep)
        if original is not None:
            for t in range(tau.shape[0]):
                tau[t] = l1_rescale(original[t], tau[t])
        return tau


@method_config
class Breadcrumbs(_BreadcrumbsBase):
    """theta = base + lam * sum_t w_t m_t * tau_t (/ sum_t w_t with ``normalize_weights``), m_t keeping the
    entries of tau_t between its smallest (1 - density - gamma) and its largest gamma by |tau|.

    Follows mergekit 0.1.5's ``breadcrumbs`` with ``scope=per_tensor, threshold_ties=sort`` (bit
    for bit in float32, ``rescale=l1`` its rescale: true); the default (``keep``) cuts at exact
    thresholds, keeps every entry tied at a threshold and may run over the whole model (the
    paper masks per layer). Where mergekit keeps k = int(density n) exactly, ``keep`` keeps
    floor((density + gamma) n) minus the outliers. A density of 1 keeps everything, outliers
    included (mergekit's rule); where density + gamma pass 1, the density holds and only the largest
    1 - density are dropped as outliers (mergekit's rule too, under both threshold_ties rules).
    """

    name: ClassVar[str] = "breadcrumbs"
    paper: ClassVar[str] = _PAPER
    summary: ClassVar[str] = "drop each task vector's outliers and its smallest entries, then sum"

    density: float = _density()
    gamma: float = _gamma()
    lam: float = option(1.0, "scale of the summed masked task vectors (lambda)", unit="multiplier", check=finite,
                        grid=steps(0.3, 1.5, 0.1))
    weights: tuple[float, ...] | None = _weights()
    normalize_weights: bool = option(False, "divide by the sum of the weights (mergekit's normalize)")
    scope: str = option("per_tensor", "masks per tensor (mergekit, the paper's per layer) or over each "
                        "model's whole model", choices=SCOPES)
    threshold_ties: str = _threshold_ties()
    rescale: str = option("none", "after the mask: nothing, or scale each tensor back to its L1 norm (mergekit's "
                          "rescale: true)", choices=RESCALES)

    @property
    def weights_multiply(self) -> bool:
        """Whether lam * w_t scales model t's task vector (the executor's large-lam check): not when normalised."""
        return not self.normalize_weights

    def requirements(self) -> Requirements:
        # weights summing to 0 divide by 1, as dare_linear and task_arithmetic say (hp82a c09: silent here)
        warn_unnormalised(self.name, self.weights, self.normalize_weights)
        kernel = sum_kernel(self.weights, self.lam, self.normalize_weights, Band(self.density, self.gamma))
        return self._requirements(kernel)

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        return combine(self._mask(tau, ctx), ctx, lam=self.lam, normalize=self.normalize_weights, ties=None)

    def task_vectors(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        return per_task(self._mask(tau, ctx), ctx, ties=None)


@method_config
class BreadcrumbsTies(_BreadcrumbsBase):
    """theta = base + lam * disjoint_aggregate(m * tau, elect(m * tau)): Breadcrumbs' middle band in
    place of TIES's top-k trim, then TIES's sign election and disjoint merge.

    Follows mergekit 0.1.5's ``breadcrumbs_ties`` with ``scope=per_tensor, threshold_ties=sort``
    (bit for bit in float32): its election (the sign of the summed weighted deltas, + on a zero
    sum: ``zero_sign=positive``) and its ``normalize`` (default false: the agreeing weighted deltas
    summed, ``aggregate=sum``; true: ``aggregate=mean``). The mask as in ``breadcrumbs``.
    """

    name: ClassVar[str] = "breadcrumbs_ties"
    paper: ClassVar[str] = _PAPER
    summary: ClassVar[str] = "Breadcrumbs' middle band, then TIES's sign election and disjoint merge"

    density: float = _density()
    gamma: float = _gamma()
    lam: float = option(1.0, "scale of the merged task vector (lambda)", unit="multiplier", check=finite,
                        grid=steps(0.5, 2.0, 0.1))
    weights: tuple[float, ...] | None = _weights()
    elect: str = option("mass", "sign election: total mass (TIES, mergekit) or count of signs", choices=ELECT_RULES)
    zero_sign: str = option("positive", "sign elected where the vote is exactly 0 (mergekit: positive)",
                            choices=ZERO_SIGNS[:2])
    aggregate: str = option("sum", "how agreeing values combine (mergekit: sum, or mean with normalize)",
                            choices=AGGREGATES)
    scope: str = option("per_tensor", "masks per tensor (mergekit) or over each model's whole model", choices=SCOPES)
    threshold_ties: str = _threshold_ties()
    rescale: str = option("none", "after the mask: nothing, or scale each tensor back to its L1 norm (mergekit's "
                          "rescale: true)", choices=RESCALES)

    @property
    def weights_multiply(self) -> bool:
        """Whether lam * w_t scales model t's values (the executor's large-lam check): not under a weighted mean."""
        return self.aggregate != "mean"

    def requirements(self) -> Requirements:
        return self._requirements(TiesKernel(self.lam, self.elect, self.zero_sign, self.aggregate,
                                             band=Band(self.density, self.gamma)))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        return combine(self._mask(tau, ctx), ctx, lam=self.lam, normalize=False,
                       ties=(self.elect, self.zero_sign, self.aggregate))

    def task_vectors(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        return per_task(self._mask(tau, ctx), ctx, ties=(self.elect, self.zero_sign))
