"""NuSLERP: mergekit's spherical interpolation of two models or of their two task vectors, over
whole tensors, rows or columns, the interpolation weight from per-model weights."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..errors import ConfigError, MergeWarning
from ..lazy import torch
from .base import ChunkContext, Requirements, TensorKernel, finite, method_config, option
from .slerp import warn_norm_overflow

if TYPE_CHECKING:
    from ..engine.whole import Reductions

OF = ("task_vectors", "models", "base_and_model")
_EPS = 1e-8  # colinear where 1 - cos^2 <= eps^2


def nuslerp_angle_from(norm0: torch.Tensor, norm1: torch.Tensor,
                       dot: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(theta, colinear) of two vectors v0, v1 (..., m) from their reductions, with mergekit 0.1.5's ``nuslerp``
    operations: the two norms (..., 1), clamped to at least 1e-7, and ``dot(n0, n1)``, the sum of
    (v0 / n0) * (v1 / n1) (..., 1), clamped to [-1, 1]; colinear where 1 - cos^2 <= 1e-16 (theta 0 there).
    :func:`nuslerp_tensor` and the fused engine (engine.whole) both take the angle here."""
    n0 = norm0.clamp(min=1e-7)
    n1 = norm1.clamp(min=1e-7)
    cos = dot(n0, n1).clamp(-1, 1)
    colinear = (1 - cos.square()) <= _EPS**2
    return torch.acos(torch.where(colinear, 0, cos)), colinear


def nuslerp_tensor(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool,
                   on_overflow: Callable[[], None] | None = None) -> torch.Tensor:
    """mergekit 0.1.5's ``nuslerp`` operations on two tensors (*S) float32: flattened (``flatten``),
    else a SLERP per row of the last dimension, or per column with ``row_wise`` (mergekit's
    naming: dim 0 moved last); :func:`nuslerp_angle_from`, then (sin((1-t)θ) v0 + sin(tθ) v1) / sin θ,
    a lerp where colinear. ``on_overflow()`` is called where a norm the angle is taken from overflows
    float32 (values of about 1e19 or more: the tensors are then taken as orthogonal, as mergekit does)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    norm0, norm1 = torch.norm(v0, dim=-1, keepdim=True), torch.norm(v1, dim=-1, keepdim=True)  # (..., 1)
    if on_overflow is not None and bool(torch.isinf(norm0).any() | torch.isinf(norm1).any()):  # NaN: refused later
        on_overflow()
    theta, colinear = nuslerp_angle_from(norm0, norm1,
                                         lambda n0, n1: torch.sum((v0 / n0) * (v1 / n1), dim=-1, keepdim=True))
    sin_theta = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / sin_theta
    out = torch.where(colinear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


# whether hints may offer t: a mergekit recipe's nuslerp has per-model weights only (hp76a c39: "or t itself" of a
# recipe that refuses parameters.t); the command line sets it for a mergekit recipe's run, and puts it back after
t_offered = True


@contextlib.contextmanager
def t_not_offered() -> Iterator[None]:
    """Hints without t while a mergekit recipe's nuslerp is checked (the translator's own probe)."""
    global t_offered
    before, t_offered = t_offered, False
    try:
        yield
    finally:
        t_offered = before


@method_config
class NuSlerp:
    """theta = base + nuslerp(t, tau_0, tau_1) (``of=task_vectors``, mergekit with a base_model) or
    nuslerp(t, theta_0, theta_1) (``of=models``, mergekit without one; ``of=base_and_model``: the
    base is theta_0 and one model theta_1), t = w_1 / (w_0 + w_1) (0.5 when the weights sum to
    less than 1e-6 in magnitude), or ``t`` as given.

    Follows mergekit 0.1.5's ``nuslerp`` operation for operation (float32, bit for bit):
    ``flatten`` (mergekit's nuslerp_flatten, default true) interpolates each tensor as one
    vector, else each row, or with ``row_wise`` (nuslerp_row_wise) each column.
    """

    name: ClassVar[str] = "nuslerp"
    paper: ClassVar[str] = "https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md"
    summary: ClassVar[str] = "spherical interpolation of two models or their task vectors (mergekit's nuslerp)"

    weights: tuple[float, ...] | None = option(None, "the two models' weights; t = w_1 / (w_0 + w_1) "
                                               "(default equal: t = 0.5)", unit="one per model", per_model=True)
    t: float | None = option(None, "the interpolation weight itself (0: the first, 1: the second), "
                             "instead of weights", unit="fraction", check=finite, grid=(0.1, 0.3, 0.5, 0.7, 0.9))
    of: str = option("task_vectors", "interpolate the two task vectors and add the base (mergekit with a "
                     "base_model), the two models themselves, or the base and one model", choices=OF)
    flatten: bool = option(True, "each tensor as one vector (mergekit's nuslerp_flatten)")
    row_wise: bool = option(False, "without flatten: per column, not per row (mergekit's nuslerp_row_wise)")

    def other_count(self, n_models: int) -> str | None:
        """The ``of`` that takes ``n_models`` models, for the count's refusal."""
        if n_models == 1 and self.of != "base_and_model":
            return "of=base_and_model (--of base_and_model) interpolates the base and one model"
        if n_models == 2 and self.of == "base_and_model":
            return "of=task_vectors (the default) or of=models interpolates two models"
        return None

    def requirements(self) -> Requirements:
        if self.t is not None and self.weights is not None:
            raise ConfigError("give t or weights, not both")
        if self.weights is not None and len(self.weights) == 2:
            t = self.interpolation()
            mixed = min(self.weights) < 0 < max(self.weights)  # -1, 1 sums to 0: mergekit's t = 0.5 would hide it
            if mixed or not 0 <= t <= 1:  # the rule t itself follows: past [0, 1] the result extrapolates
                raise ConfigError(
                    f"weights {', '.join(f'{w:g}' for w in self.weights)} "
                    + (f"give t = w_1 / (w_0 + w_1) = {t:g}, outside [0, 1] (fraction), where t must lie: the "
                       "interpolation would extrapolate far beyond both models" if not 0 <= t <= 1 else
                       "are of opposite signs and sum to about 0, where t = w_1 / (w_0 + w_1) is not defined "
                       "(mergekit takes 0.5)")
                    + "; give weights of one sign (t then lies in [0, 1])" + (", or t itself" if t_offered else ""))
        one = self.of == "base_and_model"
        # flattened: the fused engine (the same reductions on the same float32 values, one pass over the raw rows)
        kernel = TensorKernel("interp", self._coefficients, pair=(0, 1) if one else (1, 2),
                              relative=self.of == "task_vectors") if self.flatten else None
        return Requirements(whole_tensors=True, model_values=self.of != "task_vectors", base_values=one,
                            n_models=1 if one else 2, kernel=kernel)

    def check_tensors(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Once per merge: row_wise chooses rows or columns only where tensors are not flattened (mergekit's
        nuslerp_row_wise, which it ignores under nuslerp_flatten too): said, not silently dropped."""
        if self.weights is not None and self.t is None and abs(sum(self.weights)) < 1e-6:  # interpolation's own
            # test (hp70a c44: weights 1e-7 and 9.5e-7, summing to 1.05e-6, were warned of, and merged at t = 0.905)
            warnings.warn(MergeWarning(
                f"nuslerp: the weights sum to 0 or nearly ({', '.join(f'{w:g}' for w in self.weights)}: their sum is "
                "below 1e-6 in size, too small to form a ratio), which names neither model; t = 0.5 is taken "
                "(mergekit's rule), the midpoint; give the weights you mean" + (", or t" if t_offered else "")),
                stacklevel=3)
        elif self.interpolation() in (0, 1):  # as slerp's t = 0 or 1: one endpoint itself (hostile pass 25, N8)
            t = self.interpolation()
            which = {"base_and_model": ("the base", "the model"), "models": ("the first model", "the second model"),
                     "task_vectors": ("the first model", "the second model")}[self.of][int(t)]
            warnings.warn(MergeWarning(
                f"nuslerp: t = {t:g} (from {'t' if self.t is not None else 'the weights'}) is an endpoint: the merge "
                f"is {which} itself, unchanged; a t inside (0, 1) (weights both nonzero) interpolates"), stacklevel=3)
        if self.row_wise and self.flatten:
            warnings.warn(MergeWarning(
                "nuslerp: row_wise applies only without flatten, which is on (the default), so each tensor is "
                "interpolated whole and row_wise changes nothing (mergekit ignores nuslerp_row_wise the same way); "
                "add flatten=false (--no-flatten; nuslerp_flatten: false) for a SLERP per column"), stacklevel=3)

    def _coefficients(self, name: str, reductions: Reductions) -> tuple[float, float, float | None]:
        """The fused pass's (c_0, c_1, divisor) for a flattened tensor, from its reductions (engine.whole)."""
        f32 = np.float32
        t = self.interpolation()
        # nuslerp_angle_from's float32 arithmetic on scalars, torch's acos and sin from reductions.numerics
        # clamp(min=1e-7); max keeps a NaN first argument, as torch.clamp does
        n0, n1 = max(reductions.norms(0)[0], f32(1e-7)), max(reductions.norms(1)[0], f32(1e-7))
        if np.isinf(n0) or np.isinf(n1):  # values whose squares pass float32's range (NaN: refused as NaN later)
            warn_norm_overflow(name, "nuslerp")
        cos = np.clip(reductions.sums(0, 1, (float(n0), float(n1)))[0], f32(-1), f32(1))
        if (f32(1) - cos * cos) <= f32(_EPS**2):  # colinear: (1 - t) v0 + t v1, python scalars rounded to float32
            return float(f32(1 - t)), float(f32(t)), None
        sin = reductions.numerics.sin
        theta = reductions.numerics.acos(np.array([cos], f32))  # (1,)
        # a python scalar times a float32 tensor: torch rounds the scalar to float32 first
        return float(sin(f32(1 - t) * theta)[0]), float(sin(f32(t) * theta)[0]), float(sin(theta)[0])

    def interpolation(self) -> float:
        """t: as given, else w_1 / (w_0 + w_1) with mergekit's arithmetic."""
        if self.t is not None:
            return self.t
        if self.weights is None:
            return 0.5
        total = sum(self.weights)
        return 0.5 if abs(total) < 1e-6 else self.weights[1] / total

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """tau (2, *S) -> the merged task vector (*S); with of=models ctx.models -> the merged model."""
        if self.of == "base_and_model":
            v0, v1 = ctx.base, ctx.models[0]
        else:
            pair = ctx.models if self.of == "models" else tau
            v0, v1 = pair[0], pair[1]
        return nuslerp_tensor(self.interpolation(), v0, v1, row_wise=self.row_wise, flatten=self.flatten,
                              on_overflow=lambda: warn_norm_overflow(ctx.name, "nuslerp"))
