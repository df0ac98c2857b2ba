"""Merge methods that exist only for the paper's analyses: each is a method config that the
engine runs like any registered method (global top-k thresholds, row chunks, the same stream).

- ``TrimDisjointMean``: TIES without the sign election (Table 4, "-elect"; Fig. 6's "trim +
  disjoint mean"): the mean of every kept value, whatever its sign.
- ``SignFlip``: one model's task vector with the sign of each top-k (or each bottom) entry
  flipped with probability p (Fig. 7). Counter-based random numbers, so a seed names the same
  flips whatever the chunking.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from tiesmerge.methods import ops
from tiesmerge.methods.base import (
    ChunkContext,
    Requirements,
    TopK,
    finite,
    fraction,
    method_config,
    non_negative_int,
    option,
    unit_interval,
)


@method_config
class TrimDisjointMean:
    name: ClassVar[str] = "trim_disjoint_mean"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.01708"
    summary: ClassVar[str] = "TIES without the election: the mean of the kept values of every sign"

    density: float = option(0.2, "fraction of each task vector kept", check=fraction)
    lam: float = option(1.0, "scale of the merged task vector", check=finite)

    def requirements(self) -> Requirements:
        return Requirements(trim=TopK(self.density))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        trimmed = ops.trim_at(tau, ctx.thresholds)  # (n, *S)
        count = (trimmed != 0).sum(0, dtype=torch.float32)  # (*S)
        return trimmed.sum(0).div_(count.clamp_min_(1)).mul_(self.lam)


@method_config
class SignFlip:
    name: ClassVar[str] = "sign_flip"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.01708"
    summary: ClassVar[str] = "flip the sign of a model's top-k (or bottom) task-vector entries with probability p"

    density: float = option(0.2, "the top-k fraction that separates top from bottom", check=fraction)
    p: float = option(0.5, "probability of flipping an entry's sign", check=unit_interval)
    region: str = option("top", "top: entries at or above the top-k threshold; bottom: the rest",
                         choices=("top", "bottom"))
    seed: int = option(0, "seed of the counter-based random numbers", check=non_negative_int)

    def requirements(self) -> Requirements:
        return Requirements(trim=TopK(self.density), n_models=1)

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        top = tau.abs() >= ops.broadcast_per_model(ctx.thresholds, tau)  # (1, *S)
        region = top if self.region == "top" else ~top
        uniforms = ops.hash_uniform(self.seed, ctx.stream, ctx.offset, tau.numel(), tau.device).view(tau.shape)
        flip = region & (uniforms < self.p)  # (1, *S)
        return torch.where(flip, -tau, tau)[0]  # (*S)
