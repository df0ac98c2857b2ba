"""Simple averaging of the fine-tuned models (Wortsman et al., model soups)."""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, ClassVar

from ..errors import ConfigError, MergeWarning
from . import ops
from .base import (
    FLOAT32_MAX,
    ChunkContext,
    LinearKernel,
    Requirements,
    finite,
    method_config,
    nonzero_sum,
    option,
)

if TYPE_CHECKING:
    import torch


@method_config
class Average:
    """theta = sum_t w_t theta_t / sum_t w_t (plain mean when no weights are given).

    Computed as base + weighted mean of the task vectors, which is the same thing; with
    ``base_weight`` the base counts as a model and the models' own values are averaged in
    mergekit 0.1.5's float32 order (its ``linear``), so a mergekit recipe merges bit for bit;
    ``normalize_weights`` false (with ``base_weight`` only) leaves out the division: the weighted
    sum w_0 theta_base + sum_t w_t theta_t itself, mergekit's ``linear`` with ``normalize: false``.
    """

    name: ClassVar[str] = "average"
    paper: ClassVar[str] = "https://arxiv.org/abs/2203.05482"
    summary: ClassVar[str] = "mean of the fine-tuned models"

    # their sum is checked in requirements(): with base_weight the base's weight counts in it (hp40 C21: weights
    # 0 beside base_weight 1 were refused as "must not sum to 0", where mergekit merges the first model's values)
    weights: tuple[float, ...] | None = option(None, "per-model weights, normalised to sum 1", unit="one per model",
                                               per_model=True, normalised=True)
    base_weight: float | None = option(None, "count the base as one more model with this weight: theta = (w_0 "
                                       "theta_base + sum_t w_t theta_t) / sum w over the models' own values, in "
                                       "mergekit 0.1.5's float32 order (its linear merge, the first model as the "
                                       "base); needs weights", unit="weight", check=finite,
                                       sums_with="weights")
    normalize_weights: bool = option(True, "divide by the weights' sum; false (with base_weight only): the weighted "
                                     "sum w_0 theta_base + sum_t w_t theta_t undivided, in mergekit 0.1.5's float32 "
                                     "order (its linear with normalize: false)")

    def requirements(self) -> Requirements:
        if not self.normalize_weights and self.base_weight is None:
            raise ConfigError("average: normalize_weights false needs base_weight (the weighted sum of the models' own "
                              "values, the base among them)",
                              hint="give base_weight and weights, or leave normalize_weights on; task_arithmetic sums "
                                   "weighted task vectors on the base")
        if self.base_weight is not None:
            if self.weights is None:
                raise ConfigError("base_weight needs the models' weights too", hint="give weights, one per model")
            w = (self.base_weight, *self.weights)
            # the sum is taken in float32, in this order, as mergekit's linear takes it: a running sum past 3.4e38 is
            # Inf there, found only after the merge (hp71a c09: weight 3e38 on both models); 2e38, -1e38, -1e38 never
            # leaves float32's range, and sums to 0, which the rule below names (hp72a c07: "must sum to at most")
            running = [math.fsum(w[:k + 1]) for k in range(len(w))]
            past = next((k for k, total in enumerate(running) if abs(total) > FLOAT32_MAX), None)
            if past is not None:
                raise ConfigError(f"the weights {', '.join(f'{x:.10g}' for x in w)} (base_weight first) add up, in "
                                  f"this order, to {running[past]:.3g} after {past + 1} of them, past float32's "
                                  "3.4e38 (the merge adds them in float32)",
                                  hint="give weights of ordinary size"
                                  + ("; only their ratios matter (they are normalized)" if self.normalize_weights
                                     else ""))
            if not self.normalize_weights:  # hp40b C61: mergekit's linear with normalize: false, nothing divided
                if math.isclose(math.fsum(w), 1.0):  # (another sum is said by the engine: what it scales by)
                    _warn_if_far(w, "the weights with base_weight")  # 1, 1000, -1000: far out, silent (hp80a c29)
                if not any(w):  # Σ 0·θ_i: an all-zero model, which the merge said was "the base itself" (hp79a c29)
                    raise ConfigError("every weight is 0, base_weight included (in a base-less mergekit linear, the "
                                      "first listed model's), and normalize_weights is off: the merge would be an "
                                      "all-zero model", hint="give the models (or the base) nonzero weights")
                return Requirements(weights=self.weights, base_values=True, model_values=True, kernel=LinearKernel(
                    self.weights, base_coefficient=self.base_weight, divisor=1.0))  # x / 1.0 is x: the sum's bits
            why = nonzero_sum(w)  # the rule the weights alone follow, with the base counted among them
            if why:
                raise ConfigError(f"the weights {', '.join(f'{x:.10g}' for x in w)} (base_weight first) {why}",
                                  hint="base_weight counts the base as one more model of the weighted mean")
            _warn_if_far(w, "the weights with base_weight")
            return Requirements(weights=self.weights, base_values=True, model_values=True, kernel=LinearKernel(
                self.weights, base_coefficient=self.base_weight, divisor=ops.float32_sum(w)))
        if self.weights is None:  # the mean: the sum over n, as torch's mean computes it
            return Requirements(kernel=LinearKernel(mean=True))
        why = nonzero_sum(self.weights)
        if why:
            raise ConfigError(f"weights {why}, got {list(self.weights)}",
                              hint="the weights are normalised by their sum (base_weight counts the base among them)")
        _warn_if_far(self.weights, "the weights")
        normalised = tuple(w / sum(self.weights) for w in self.weights)
        return Requirements(weights=normalised, kernel=LinearKernel(normalised))

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        if self.base_weight is not None:  # mergekit's linear, op for op: accumulate w_i * theta_i from 0, divide
            from ..lazy import torch

            w = torch.tensor((self.base_weight, *self.weights), dtype=torch.float32, device=ctx.base.device)  # (n + 1,)
            result = torch.zeros_like(ctx.base)
            result.addcmul_(ctx.base, w[0])
            for t in range(ctx.models.shape[0]):
                result.addcmul_(ctx.models[t], w[1 + t])
            # (*S): the merged model itself (model_values); undivided without normalize_weights
            return result.div_(w.sum()) if self.normalize_weights else result
        if ctx.weights is None:
            return tau.mean(dim=0)
        return (tau * ops.broadcast_per_model(ctx.weights, tau)).sum(dim=0)  # weights normalised to sum 1


FAR = 10.0  # a normalised weight past this (in magnitude): the "mean" lies far outside the models it averages


def _warn_if_far(weights: tuple[float, ...], what: str) -> None:
    """Weights of mixed signs normalised by a small sum (accepted up to NORMALISED_WEIGHT_LIMIT): said, as a weighted
    mean ten times past its models is rarely what was meant (1, -0.9 scales them by 10 and -9)."""
    total = sum(weights)
    reach = max(abs(x) for x in weights) / abs(total) if total else 0.0
    if reach > FAR:
        warnings.warn(MergeWarning(
            f"average: {what} ({', '.join(f'{x:.6g}' for x in weights)}) sum to {total:.4g}, so "
            + ("normalised by their sum they" if not math.isclose(total, 1.0) else "as they stand they")
            + f" reach ±{reach:.3g}: the merge extrapolates far past the models rather than averaging them; "
            "weights of one sign (or a sum not nearly cancelled) give a mean"), stacklevel=3)
