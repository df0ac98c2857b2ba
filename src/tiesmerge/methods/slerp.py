"""SLERP: spherical linear interpolation of two models, each tensor whole (Shoemake, SIGGRAPH 1985),
with mergekit 0.1.5's operations so that a mergekit ``slerp`` recipe merges bit for bit."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ..errors import ConfigError, MergeWarning, listed
from ..lazy import torch
from .base import ChunkContext, Requirements, TensorKernel, finite, method_config, non_negative_int, option
from .schedule import layer_index, parse_schedule, schedule_problem

if TYPE_CHECKING:
    from ..engine.whole import Numerics, Reductions

ANCHORS = ("models", "base")
_CHUNK = 1 << 20  # mergekit 0.1.5 sums norms and dots in chunks of 2^20 entries: the same order, the same bits
_DOT_THRESHOLD = 0.9995  # |cos| above this: the tensors are (anti)parallel and SLERP is a lerp
_EPS = 1e-8


def slerp_coefficients(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(coef_a, coef_b), each (1, 1) float32, of mergekit 0.1.5's ``slerp`` of a, b (1, numel) float32
    (numel > 0): each norm the norm of 2^20-entry chunk norms (1 where <= 1e-8), the cosine the sum
    of chunk sums of the normalised products clamped to [-1, 1]; a lerp's (1 - t, t) where |cos| >
    0.9995, else sin((1-t)w)/sin(w), sin(tw)/sin(w)."""
    spans = range(0, a.shape[1], _CHUNK)
    norms_a = torch.stack([torch.linalg.vector_norm(a[:, s:s + _CHUNK], dim=1, keepdim=True) for s in spans])
    norms_b = torch.stack([torch.linalg.vector_norm(b[:, s:s + _CHUNK], dim=1, keepdim=True) for s in spans])
    return slerp_scalars(t, norms_a, norms_b, lambda na, nb: torch.stack(
        [((a[:, s:s + _CHUNK] / na) * (b[:, s:s + _CHUNK] / nb)).sum(dim=1, keepdim=True) for s in spans]))


def slerp_scalars(t: float, norms_a: torch.Tensor, norms_b: torch.Tensor,
                  dots: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`slerp_coefficients` from its reductions: norms_a, norms_b (C, 1, 1) float32, the 2^20-entry
    chunks' norms; ``dots(norm_a, norm_b)`` (C, 1, 1): each chunk's sum of (a / norm_a) * (b / norm_b).
    The fused engine hands in the same reductions computed from the stored rows (engine.whole)."""
    tt = torch.tensor([t], dtype=torch.float32, device=norms_a.device).reshape(-1, 1)  # (1, 1)
    norm_a = torch.linalg.vector_norm(norms_a, dim=0)  # (1, 1)
    norm_b = torch.linalg.vector_norm(norms_b, dim=0)
    norm_a = torch.where(norm_a > _EPS, norm_a, 1)
    norm_b = torch.where(norm_b > _EPS, norm_b, 1)
    dot = dots(norm_a, norm_b).sum(dim=0).clamp(-1, 1)  # (1, 1)
    if bool((dot < -_DOT_THRESHOLD).any()):
        _warn_opposite(t)
    linear = dot.abs() > _DOT_THRESHOLD
    theta = torch.acos(torch.where(linear, 0, dot))
    sin_theta = torch.sin(theta)
    coef_a = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / sin_theta)
    coef_b = torch.where(linear, tt, torch.sin(tt * theta) / sin_theta)
    return coef_a, coef_b


def slerp_scalars_f32(t: float, norms_a: np.ndarray, norms_b: np.ndarray,
                      dots: Callable[[np.float32, np.float32], np.ndarray], numerics: Numerics
                      ) -> tuple[np.float32, np.float32]:
    """:func:`slerp_scalars` in float32 scalars, torch's sum, norm, acos and sin from ``numerics`` (the fused
    engine's: no torch needed). norms_a, norms_b (C,) the chunks' norms; ``dots(norm_a, norm_b)`` (C,)."""
    f32 = np.float32
    tt = f32(t)
    norm_a, norm_b = numerics.norm(norms_a), numerics.norm(norms_b)
    norm_a = norm_a if norm_a > f32(_EPS) else f32(1)  # NaN > eps is False: 1, as torch.where picks
    norm_b = norm_b if norm_b > f32(_EPS) else f32(1)
    dot = np.clip(numerics.sum(dots(norm_a, norm_b)), f32(-1), f32(1))
    if abs(dot) > f32(_DOT_THRESHOLD):
        if dot < 0:
            _warn_opposite(t)
        return f32(1) - tt, tt
    theta = numerics.acos(np.array([dot], f32))  # (1,)
    with np.errstate(all="ignore"):  # sin(theta) is 0 where dot is NaN: torch divides the same way
        sin_theta = numerics.sin(theta)[0]
        return (numerics.sin((f32(1) - tt) * theta)[0] / sin_theta,
                numerics.sin(tt * theta)[0] / sin_theta)


def _warn_opposite(t: float) -> None:
    """Two tensors pointing opposite ways have no great circle between them: mergekit's rule (and so this one) takes
    the straight line, through 0 at t = 0.5, where the merge keeps neither model's values (hp63a c44: an all-zero
    model written without a word). Said once per merge site (Python's default filter), not per tensor."""
    warnings.warn(MergeWarning(
        f"slerp: tensors of the two endpoints point opposite ways (cosine below -{_DOT_THRESHOLD}): there the "
        f"interpolation is the straight line between them (mergekit's rule), so at t = {t:g} they partly cancel "
        "(all zeros at t = 0.5 where one is the other's negation); check the models"), stacklevel=5)


def slerp_tensor(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """SLERP of two whole tensors (*S), float32, with mergekit 0.1.5's ``slerp`` operations: each
    tensor flattened, :func:`slerp_coefficients`, then coef_a v0 + coef_b v1 chunk by chunk, in float32."""
    a, b = v0.reshape(1, -1), v1.reshape(1, -1)  # (1, numel): mergekit's batch of one output
    if not a.shape[1]:
        tt = torch.tensor([t], dtype=torch.float32, device=v0.device).reshape(-1, 1)  # (1, 1)
        return ((1 - tt) * a + tt * b).reshape(v0.shape)
    coef_a, coef_b = slerp_coefficients(t, a, b)
    out = torch.empty_like(a)
    for s in range(0, a.shape[1], _CHUNK):
        out[:, s:s + _CHUNK] = coef_a * a[:, s:s + _CHUNK] + coef_b * b[:, s:s + _CHUNK]
    return out.reshape(v0.shape)


def _t_schedule_problem(text: object) -> str | None:
    """An option check: a schedule whose every value is a t in [0, 1], as the scalar ``t`` must be (a
    value past 1 extrapolates far beyond both models: 1e30 gives absurd weights, inf an overflow)."""
    problem = schedule_problem(text)
    if problem is not None:
        return problem
    values = [v for _, vs in parse_schedule(str(text)).rules for v in vs]
    bad = next((v for v in values if not 0 <= v <= 1), None)
    if bad is not None:
        return f"holds t = {bad:g}, outside [0, 1] (fraction), where every t must lie"
    tiny = next((v for v in values if finite(v)), None)  # 1e-320 is 0 in float32: the rule the scalar t follows
    return None if tiny is None else f"holds t = {tiny:g}, which {finite(tiny)}"


@method_config
class Slerp:
    """theta = sin((1-t) w)/sin(w) theta_0 + sin(t w)/sin(w) theta_1 per tensor, w the angle between
    the two (flattened) tensors; a lerp (1-t) theta_0 + t theta_1 where they are nearly parallel.

    ``anchor=models`` (default): the two listed models, t = 0 the first. ``anchor=base``: the base
    and one model, t = 0 the base (mergekit's ``slerp``, whose base_model is one endpoint).
    ``t_by_name`` gives t per tensor as mergekit's filters and gradients do (see
    ``tiesmerge.methods.schedule``: ``self_attn=0,0.5,1;mlp=1,0.5,0;*=0.5`` with ``layers``).

    Follows mergekit 0.1.5's ``slerp`` operation for operation (float32, bit for bit); the
    models' own values are interpolated, not base + task vector. Differs on purpose: two
    models without a base as an endpoint (``anchor=models``).
    """

    name: ClassVar[str] = "slerp"
    paper: ClassVar[str] = "https://doi.org/10.1145/325165.325242"
    summary: ClassVar[str] = "spherical interpolation between two models, each tensor whole (mergekit's slerp)"

    t: float = option(0.5, "where between the two endpoints: 0 is the first, 1 the second (mergekit's t)",
                      unit="fraction", check=finite, grid=(0.1, 0.3, 0.5, 0.7, 0.9))
    anchor: str = option("models", "the endpoints: the two listed models, or the base and one model "
                         "(mergekit: base_model is t = 0)", choices=ANCHORS)
    t_by_name: str | None = option(None, "t per tensor, mergekit's filters and gradients: "
                                   "'FILTER=V[,V...];...;*=V', first matching filter (a substring of the "
                                   "name) wins, a list is a gradient over the layers", unit="schedule",
                                   check=_t_schedule_problem)
    layers: int = option(0, "the model's number of layers, where t_by_name has a gradient "
                         "(e.g. num_hidden_layers)", unit="layers", check=non_negative_int)

    def other_count(self, n_models: int) -> str | None:
        """The anchor that takes ``n_models`` models, for the count's refusal."""
        if n_models == 1 and self.anchor != "base":
            return "anchor=base (--anchor base) interpolates the base and one model"
        if n_models == 2 and self.anchor == "base":
            return "anchor=models (the default) interpolates two models"
        return None

    def requirements(self) -> Requirements:
        if self.t_by_name is not None and self.layers == 0:
            if any(len(values) > 1 for _, values in parse_schedule(self.t_by_name).rules):
                raise ConfigError("t_by_name has a gradient over the layers, and layers is 0 (not set): give layers, "
                                  "the model's number of layers (at least 1, e.g. config.json's num_hidden_layers)")
        # the fused engine: the same reductions on the same float32 values, then one pass over the raw rows
        kernel = TensorKernel("interp", self._coefficients, pair=(0, 1) if self.anchor == "base" else (1, 2))
        return Requirements(whole_tensors=True, model_values=True, base_values=self.anchor == "base",
                            n_models=1 if self.anchor == "base" else 2, kernel=kernel)

    def _coefficients(self, name: str, reductions: Reductions) -> tuple[float, float, None]:
        """The fused pass's (c_0, c_1, no divisor) for tensor ``name`` from its reductions (engine.whole)."""
        def dots(norm_a: np.float32, norm_b: np.float32) -> np.ndarray:
            return reductions.sums(0, 1, (float(norm_a), float(norm_b)), _CHUNK)

        norms = reductions.norms(0, _CHUNK), reductions.norms(1, _CHUNK)
        if any(np.isinf(n).any() for n in norms):  # values whose squares pass float32's range (NaN: refused as such)
            _warn_norm_overflow(name)
        coef_a, coef_b = slerp_scalars_f32(self.t_for(name), *norms, dots, reductions.numerics)
        return float(coef_a), float(coef_b), None

    def unused_options(self) -> dict[str, str]:
        """Options this configuration ignores, whatever the model (a search over them would score one merge):
        t, where t_by_name has a rule for every tensor ('*')."""
        rules = parse_schedule(self.t_by_name).rules if self.t_by_name is not None else ()
        unused = {"t": "t_by_name's '*' rule sets every tensor's t"} if any(p is None for p, _ in rules) else {}
        if not any(len(values) > 1 for _, values in rules):  # layers spreads a gradient, and there is none
            unused["layers"] = "layers spreads a gradient of t_by_name over the layers, and there is none"
        return unused

    def t_for(self, name: str) -> float:
        """t for the tensor ``name``: the schedule's value, else ``t``."""
        if self.t_by_name is None:
            return self.t
        return parse_schedule(self.t_by_name).value(name, self.layers, self.t)

    def check_tensors(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """``layers`` against the model: a gradient spread over another number of layers than the model has never
        reaches its last values (``--layers 1000`` on 2 layers) or runs past it (``--layers 1``); and a t that makes
        the merge one endpoint itself, as ``--lam 0`` is said to."""
        names = list(shapes)  # the merged tensors (copied ones take no t)
        if self.t_by_name is None:
            if self.t in (0, 1):
                which = ("the base" if self.anchor == "base" else "the first model") if self.t == 0 else \
                    ("the model" if self.anchor == "base" else "the second model")
                warnings.warn(MergeWarning(f"slerp: t = {self.t:g} is an endpoint: the merge is {which} itself, "
                                           "unchanged; a t inside (0, 1) interpolates"), stacklevel=3)
            return
        rules = parse_schedule(self.t_by_name).rules
        # t unused: a '*' rule is said by unused_options (methods.base.warn_unused); filters covering every tensor here
        if self.t != 0.5 and not any(p is None for p, _ in rules) and \
                all(any(p in n for p, _ in rules) for n in names):  # t's default: no word
            warnings.warn(MergeWarning(
                f"slerp: t = {self.t:g} is not used: t_by_name's filters match every tensor; put the value into "
                f"t_by_name (e.g. '*={self.t:g}') or drop t"), stacklevel=3)
        unmatched = [p for p, _ in rules if p is not None and not any(p in n for n in names)]
        if unmatched:  # a typo (self_atn) would leave every tensor at the default t, silently
            warnings.warn(MergeWarning(
                f"slerp: t_by_name's filter(s) (a mergekit recipe's parameters.t filters) "
                f"{listed([repr(p) for p in unmatched])} match no tensor the merge "
                "interpolates (a filter is a part of a tensor's name, e.g. self_attn or mlp), so they set nothing"),
                stacklevel=3)
        shadowed = _shadowed_rules(rules, names, unmatched)
        catch_alls = [i for i, (p, _) in enumerate(rules, 1) if p is None]
        shadowed += [(f"{i} ('*')", f"rule {catch_alls[0]} ('*')") for i in catch_alls[1:]]  # '*=0.5;*=0.3' (c53)
        if shadowed:  # first match wins (mergekit's rule): a later rule whose tensors all match an earlier one is dead
            dead = listed([f"rule {rule} is shadowed by {by}" for rule, by in shadowed], sep="; ")
            warnings.warn(MergeWarning(
                f"slerp: in t_by_name (a mergekit recipe's parameters.t, rules in its order), {dead}: the first "
                "rule that matches a tensor sets its t, so those rules set nothing; put the more specific filter "
                "first"), stacklevel=3)
        if not self.layers or not any(len(values) > 1 for _, values in rules):  # no gradient to spread: layers is
            return  # said unused by unused_options, not also "set --layers 2" (hp63a c52: two contradicting words)
        indices = {i for i in map(layer_index, names) if i is not None}
        if indices and max(indices) + 1 != self.layers:  # a warning: a model with two stacks (a vision tower
            # beside the text layers) names more layer indices than num_hidden_layers, as mergekit merges it
            # layers comes from --layers, or from a mergekit recipe's base config.json: the hint names both (hp41
            # C51: "(config.json's num_hidden_layers)" was said of the tensors' count, where config.json said 10^12)
            warnings.warn(MergeWarning(
                f"slerp: layers is {self.layers:,}, but the model's tensors name layers 0 to {max(indices)} "
                f"({max(indices) + 1} layers): the gradient in t_by_name "
                + ("never reaches its last values" if self.layers > max(indices) + 1 else
                   f"is past its end for layers {self.layers} to {max(indices)}, which take its last values")
                + f"; layers {max(indices) + 1} (--layers {max(indices) + 1}), the count the tensors hold, spreads it "
                  "over them (a mergekit recipe takes layers from its base's config.json: check its "
                  "num_hidden_layers)"),
                stacklevel=3)

    def merge(self, tau: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """ctx.models (n, *S) [, ctx.base (*S)] -> the merged model's values (*S)."""
        v0 = ctx.base if self.anchor == "base" else ctx.models[0]
        if any(bool(torch.isinf(torch.linalg.vector_norm(v))) for v in (v0, ctx.models[-1])):
            _warn_norm_overflow(ctx.name)
        return slerp_tensor(self.t_for(ctx.name), v0, ctx.models[-1])


def _shadowed_rules(rules: tuple[tuple[str | None, tuple[float, ...]], ...], names: list[str],
                    unmatched: list[str]) -> list[tuple[str, str]]:
    """(rule, the earlier rule that takes its tensors) for each rule that matches tensors of the model but is the
    first match for none of them (``*=0.5;mlp=1``, a filter repeated, ``attn`` after ``self_attn``'s superset)."""
    def label(pattern: str | None) -> str:
        return "*" if pattern is None else pattern

    shadowed = []
    for i, (pattern, _) in enumerate(rules):
        # a catch-all is the default for tensors no filter names: with every interpolated tensor named (a LoRA
        # entry's few, hp60a c52), it sets nothing, and "put the more specific filter first" would be wrong advice
        if pattern in unmatched or pattern is None:
            continue
        mine = [n for n in names if pattern is None or pattern in n]
        first = {n: next(j for j, (p, _) in enumerate(rules) if p is None or p in n) for n in mine}
        if mine and all(j < i for j in first.values()):
            takers = " and ".join(f"rule {j + 1} ({label(rules[j][0])!r})" for j in sorted(set(first.values())))
            shadowed.append((f"{i + 1} ({label(pattern)!r})", takers))
    return shadowed


def _warn_norm_overflow(name: str, method: str = "slerp") -> None:
    warn_norm_overflow(name, method)


def warn_norm_overflow(name: str, method: str) -> None:
    """The spherical interpolations' warning where a norm overflows float32 (finite values of about 1e19 or more):
    the angle is then not measured, and the tensors are taken as orthogonal, as mergekit and torch compute it."""
    warnings.warn(MergeWarning(
        f"{method}: tensor {name!r} has an infinite norm in float32 (a value of about 1e19 or more, or an Inf, "
        "which is refused as such): the angle between the two tensors cannot be measured, and finite ones are taken "
        "as orthogonal (as mergekit and torch compute it)"), stacklevel=4)  # (hp67a c102: said of an Inf input as
    # huge finite values only, before the Inf's own error)
