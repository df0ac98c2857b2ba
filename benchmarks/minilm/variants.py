"""Merge methods that exist only for the paper's analyses: each is a frozen dataclass that the
engine runs like any registered method (global top-k thresholds, row chunks, the same stream).

- ``TrimDisjointMean``: TIES without the sign election (Table 4, "-elect"; Fig. 6's "trim +
  disjoint mean"): the mean of every kept value, whatever its sign.
- ``SignFlip``: one model's task vector with the sign of each top-k (or each bottom) entry
  flipped with probability p (Fig. 7). Counter-based random numbers, so a seed names the same
  flips whatever the chunking.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from tiesmerge.methods import ops
from tiesmerge.methods.base import ChunkContext, TrimSpec


@dataclass(frozen=True)
class TrimDisjointMean:
    name: ClassVar[str] = "trim_disjoint_mean"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.01708"
    summary: ClassVar[str] = "TIES without the election: the mean of the kept values of every sign"

    density: float = 0.2
    lam: float = 1.0

    def check(self, n_models: int) -> list[str]:
        return []

    def trim_spec(self) -> TrimSpec:
        return TrimSpec(self.density, "global")

    def needs_majority_sign(self) -> bool:
        return False

    def elected_sign_sum(self, tau: torch.Tensor, ctx: ChunkContext) -> float:
        return 0.0

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        trimmed = ops.trim_at(tau, ctx.thresholds)  # (n, *S)
        count = (trimmed != 0).sum(0, dtype=torch.float32)  # (*S)
        return trimmed.sum(0).div_(count.clamp_min_(1)).mul_(self.lam)


@dataclass(frozen=True)
class SignFlip:
    name: ClassVar[str] = "sign_flip"
    paper: ClassVar[str] = "https://arxiv.org/abs/2306.01708"
    summary: ClassVar[str] = "flip the sign of a model's top-k (or bottom) task-vector entries with probability p"

    density: float = 0.2  # the top-k fraction that separates "top" from "bottom"
    p: float = 0.5
    region: str = "top"  # "top": entries with |tau| at or above the top-k threshold; "bottom": the rest
    seed: int = 0

    def check(self, n_models: int) -> list[str]:
        return [] if n_models == 1 else [f"sign_flip takes one model, got {n_models}"]

    def trim_spec(self) -> TrimSpec:
        return TrimSpec(self.density, "global")

    def needs_majority_sign(self) -> bool:
        return False

    def elected_sign_sum(self, tau: torch.Tensor, ctx: ChunkContext) -> float:
        return 0.0

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        top = tau.abs() >= ops.broadcast_per_model(ctx.thresholds, tau)  # (1, *S)
        region = top if self.region == "top" else ~top
        uniforms = ops.hash_uniform(self.seed, ctx.stream, ctx.offset, tau.numel(), tau.device).view(tau.shape)
        flip = region & (uniforms < self.p)  # (1, *S)
        return torch.where(flip, -tau, tau)[0]  # (*S)
