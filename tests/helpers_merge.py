"""Shared by the method and engine tests: merge copies of state dicts through the public API,
every method's float64 reference, the dyadic-grid families it is exact on, and statistics."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import torch

import tiesmerge
from tiesmerge.stats import Statistics, StatsManifest

State = dict[str, torch.Tensor]


def clone_state(sd: State) -> State:
    return {k: v.clone() for k, v in sd.items()}


def run(base: State, models: list[State], method: Any, **opts: Any) -> State:
    """The public API, returning a state dict. Inputs are cloned so no test sees another's writes."""
    out = tiesmerge.merge(clone_state(base), [clone_state(m) for m in models], method, **opts)
    assert isinstance(out, dict)
    return out


# ============================================================================================ reference
# Every merge method's float64 reference, written from the paper (and the method docstrings'
# stated semantics), entry by entry in plain Python floats; it never calls tiesmerge.methods.ops.
# Inputs from grid_family lie on a dyadic grid, so the float32 task vectors the engine forms are
# exact and the trim decisions (including ties at the threshold) and the sign votes are exact too;
# only divisions and the final cast round, hence the small tolerances of assert_matches.


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


def ref_keep_count(numel: int, density: float) -> int:
    frac = Fraction(repr(float(density)))
    return min(numel, frac.numerator * numel // frac.denominator)


def _floating(base: State) -> list[str]:
    return [k for k, v in base.items() if v.is_floating_point()]


def _task_vectors(base: State, models: list[State], names: list[str]) -> list[dict[str, list[float]]]:
    """tau_t[name] as a flat list of Python floats (float64)."""
    return [{k: (m[k].double() - base[k].double()).reshape(-1).tolist() for k in names} for m in models]


def _scopes(names: list[str], scope: str) -> list[list[str]]:
    return [names] if scope == "global" else [[k] for k in names]


def ref_thresholds(taus: list[dict[str, list[float]]], group: list[str], density: float) -> list[float]:
    """Per model: the m-th largest |tau| over the group, m = floor(density * d); +inf when m == 0."""
    out = []
    for tau in taus:
        mags = sorted((abs(v) for k in group for v in tau[k]), reverse=True)
        m = ref_keep_count(len(mags), density)
        out.append(math.inf if m == 0 else mags[m - 1])
    return out


def ref_trim(taus: list[dict[str, list[float]]], names: list[str], density: float, scope: str
             ) -> list[dict[str, list[float]]]:
    trimmed: list[dict[str, list[float]]] = [{} for _ in taus]
    for group in _scopes(names, scope):
        thr = ref_thresholds(taus, group, density)
        for t, tau in enumerate(taus):
            for k in group:
                trimmed[t][k] = [v if abs(v) >= thr[t] else 0.0 for v in tau[k]]
    return trimmed


def _assemble(base: State, names: list[str], lam: float, delta: dict[str, list[float]]) -> State:
    out: State = {}
    for k, v in base.items():
        if k not in names:
            out[k] = v.clone()
            continue
        d = torch.tensor(delta[k], dtype=torch.float64).reshape(v.shape)
        out[k] = (v.double() + lam * d).to(v.dtype)
    return out


def ref_ties(base: State, models: list[State], *, density: float = 0.2, lam: float = 1.0, scope: str = "global",
             elect: str = "mass", zero_sign: str = "zero", aggregate: str = "mean",
             weights: tuple[float, ...] | None = None, trim: bool = True) -> State:
    n = len(models)
    w = list(weights) if weights is not None else [1.0] * n
    names = _floating(base)
    taus = _task_vectors(base, models, names)
    trimmed = ref_trim(taus, names, density, scope) if trim else taus
    # 1. raw elected sign per entry (zeros left 0)
    raw: dict[str, list[float]] = {}
    for k in names:
        votes = []
        for p in range(len(trimmed[0][k])):
            if elect == "mass":
                s = sum(w[t] * trimmed[t][k][p] for t in range(n))
            else:
                s = sum(w[t] * _sign(trimmed[t][k][p]) for t in range(n))
            votes.append(_sign(s))
        raw[k] = votes
    # 2. zero votes: 0, +1, or the sign of the summed elected signs over the trim scope
    gamma: dict[str, list[float]] = {}
    for group in _scopes(names, scope):
        majority = _sign(sum(sum(raw[k]) for k in group))
        fill = {"zero": 0.0, "positive": 1.0, "majority": majority}[zero_sign]
        for k in group:
            gamma[k] = [g if g != 0 else fill for g in raw[k]]
    # 3. disjoint aggregate over the models whose non-zero value has the elected sign
    delta: dict[str, list[float]] = {}
    for k in names:
        values = []
        for p, g in enumerate(gamma[k]):
            agree = [t for t in range(n) if trimmed[t][k][p] != 0 and _sign(trimmed[t][k][p]) == g]
            # a weight-0 model is as good as absent: if only such models agree, nothing does
            if not agree or (aggregate == "mean" and sum(w[t] for t in agree) == 0):
                values.append(0.0)
            elif aggregate == "mean":
                values.append(sum(w[t] * trimmed[t][k][p] for t in agree) / sum(w[t] for t in agree))
            elif aggregate == "sum":
                values.append(sum(w[t] * trimmed[t][k][p] for t in agree))
            else:
                values.append(g * max(abs(w[t] * trimmed[t][k][p]) for t in agree))
        delta[k] = values
    return _assemble(base, names, lam, delta)


def ref_linear(base: State, models: list[State], *, lam: float, weights: tuple[float, ...] | None = None,
               density: float | None = None, scope: str = "global") -> State:
    """base + lam * sum_t w_t tau_t, with tau_t trimmed first when ``density`` is given."""
    n = len(models)
    w = list(weights) if weights is not None else [1.0] * n
    names = _floating(base)
    taus = _task_vectors(base, models, names)
    if density is not None:
        taus = ref_trim(taus, names, density, scope)
    delta = {k: [sum(w[t] * taus[t][k][p] for t in range(n)) for p in range(len(taus[0][k]))] for k in names}
    return _assemble(base, names, lam, delta)


def ref_average(base: State, models: list[State], weights: tuple[float, ...] | None = None) -> State:
    n = len(models)
    w = list(weights) if weights is not None else [1.0] * n
    total = sum(w)
    out: State = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = sum(w[t] * models[t][k].double() for t in range(n)) / total
        out[k] = acc.to(v.dtype)
    return out


# ============================================================================================ data


GRID_SHAPES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
    "scalar": ((), torch.float32),
    "bias": ((7,), torch.float32),
    "weight": ((5, 6), torch.float32),
    "conv": ((3, 4, 5), torch.float64),
    "double2d": ((4, 3), torch.float64),
    "half": ((4, 4), torch.float16),
}


def grid_family(seed: int, n: int, *, coarse: bool = True, flip: bool = False) -> tuple[State, list[State]]:
    """A base and n models on a dyadic grid, with an int64 and a bool buffer.

    Base values k/16 in [-4, 4]; task vectors k/8 in [-2, 2] (coarse: many ties and exact
    zero votes) or k/1024 (fine). "weight" is biased negative and "conv" positive, so the
    per-tensor majority signs differ; ``flip`` negates every task vector.
    """
    g = torch.Generator().manual_seed(seed)
    base: State = {}
    for k, (shape, dtype) in GRID_SHAPES.items():
        base[k] = (torch.randint(-64, 65, shape, generator=g).double() / 16).to(dtype)
    base["position_ids"] = torch.arange(6, dtype=torch.int64)
    base["mask"] = torch.tensor([True, False, True])
    models = []
    for _ in range(n):
        m: State = {}
        for k, (shape, dtype) in GRID_SHAPES.items():
            lo, hi = {"weight": (-16, 9), "conv": (-8, 17)}.get(k, (-16, 17))
            if coarse:
                tau = torch.randint(lo, hi, shape, generator=g).double() / 8
            else:
                tau = torch.randint(lo * 128, hi * 128, shape, generator=g).double() / 1024
            if flip:
                tau = -tau
            m[k] = (base[k].double() + tau).to(dtype)
        # buffers differ from the base: the output must still copy the base's
        m["position_ids"] = torch.arange(6, dtype=torch.int64) + 100
        m["mask"] = torch.tensor([False, True, False])
        models.append(m)
    return base, models


def assert_matches(out: State, ref: State) -> None:
    assert list(out) == list(ref)
    for k in ref:
        assert out[k].dtype == ref[k].dtype, k
        assert out[k].shape == ref[k].shape, k
        if not ref[k].is_floating_point():
            assert torch.equal(out[k], ref[k]), k
            continue
        tol = 2e-3 if ref[k].dtype in (torch.float16, torch.bfloat16) else 2e-6
        torch.testing.assert_close(out[k].double(), ref[k].double(), rtol=tol, atol=tol, msg=lambda m, k=k: f"{k}: {m}")


FAMILIES = {
    "coarse3": lambda: grid_family(1, 3),
    "fine3": lambda: grid_family(2, 3, coarse=False),
    "coarse2_flip": lambda: grid_family(3, 2, flip=True),
}


# ============================================================================================ statistics


def fisher_stats(tensors: dict[str, torch.Tensor]) -> Statistics:
    return Statistics(StatsManifest("fisher", 1), tensors)


def gram_stats(tensors: dict[str, torch.Tensor]) -> Statistics:
    return Statistics(StatsManifest("gram", 1), tensors)


def merge(base, models, method, stats, **opts):
    return tiesmerge.merge(clone_state(base), [clone_state(m) for m in models], method, stats=stats, **opts)


def float_names(state):
    return [k for k, v in state.items() if v.is_floating_point()]


# ---------------------------------------------------------------- RegMean
def linear_family(in_features: int = 5, out_features: int = 7, n_models: int = 3):
    g = torch.Generator().manual_seed(3)
    base = {"layer.weight": torch.randn(out_features, in_features, generator=g),
            "layer.bias": torch.randn(out_features, generator=g)}
    models = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_models)]
    return base, models
