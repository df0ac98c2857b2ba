"""Fisher merging (Matena & Raffel, NeurIPS 2022): a Fisher-weighted mean of the models."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .base import FLOAT32_TINY, ChunkContext, Requirements, SideInput, method_config, option, positive

if TYPE_CHECKING:
    import torch

NORMALIZATIONS = ("none", "rms")


def _float32_floor(value: Any) -> str | None:
    """A positive number float32 holds as a normal number: a floor below 1.2e-38 is 0 (or a subnormal flushed to 0)
    where the merge computes, and every entry with all Fisher values 0 was 0 / 0 (hp64b c07: "the merge
    overflowed", with advice about a lam fisher has not)."""
    return positive(value) or (f"must be at least {FLOAT32_TINY:.3g} (float32's smallest normal number; the merge "
                               "computes in float32, where a smaller floor is 0)" if value < FLOAT32_TINY else None)


@method_config
class Fisher:
    """theta = sum_t F_t theta_t / sum_t F_t, per entry, with F_t floored at ``epsilon``.

    F_t is model t's diagonal Fisher information (``tiesmerge stats fisher``). The floor keeps
    the quotient defined where no model's Fisher is positive: there every model weighs
    epsilon, so the entry is the plain mean. ``normalize="rms"`` first divides each model's
    Fisher by its root mean square over the whole model, so a model whose log-likelihood has
    larger gradients overall (fewer classes, a harder task) does not outweigh the others
    everywhere; every model's Fisher then has mean square 1, and epsilon is the same relative
    floor for each. A tensor that some model has no Fisher for is averaged.
    Computed on task vectors: sum_t F_t theta_t / sum_t F_t = base + sum_t F_t tau_t / sum_t F_t.
    """

    name: ClassVar[str] = "fisher"
    paper: ClassVar[str] = "https://arxiv.org/abs/2111.09832"
    summary: ClassVar[str] = "Fisher merging: each entry a mean of the models weighted by their diagonal Fisher"

    epsilon: float = option(1e-6, "floor on every Fisher value (where all are below it, the mean)",
                            unit="Fisher units (after normalize)", check=_float32_floor)
    normalize: str = option("none", "divide each model's Fisher by its root mean square over the whole model first",
                            choices=NORMALIZATIONS)

    def requirements(self) -> Requirements:
        return Requirements(statistics=SideInput("fisher", rows=True, normalize=self.normalize))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """tau (n, *S), ctx.statistics (n, *S) Fisher values -> (*S)."""
        if ctx.statistics is None:
            return tau.mean(dim=0)
        fisher = ctx.statistics.clamp_min(self.epsilon)  # (n, *S)
        total = fisher.sum(dim=0)  # (*S)
        weighted = (fisher * tau).sum(dim=0)  # (*S)
        if bool(total.isfinite().all()) and bool(weighted.isfinite().all()):
            return weighted.div_(total)
        # Fisher values near float32's top (finite, ~1e38) overflow the sums: x / inf = 0 is finite, so the merged
        # values' own check passed it and the entry was silently the base (hp63b c03: F = 3e38 everywhere). The
        # weights F_t / sum F are the same divided first by each entry's largest F, whose sums cannot overflow
        scaled = fisher / fisher.amax(dim=0, keepdim=True)  # (n, *S), in (0, 1]
        return (scaled * tau).sum(dim=0).div_(scaled.sum(dim=0))
