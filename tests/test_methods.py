"""Every merge method through the public API against an independent float64 reference.

The reference below is written from the paper (and the method docstrings' stated semantics),
entry by entry in plain Python floats; it never calls tiesmerge.methods.ops. Inputs lie on a
dyadic grid, so the float32 task vectors the engine forms are exact and the trim decisions
(including ties at the threshold) and the sign votes are exact too; only divisions and the
final cast round, hence the small tolerances.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
import torch

import tiesmerge
from helpers_merge import run
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Average, DareLinear, DareTies, MagnitudePrune, TaskArithmetic, Ties

# ============================================================================================ reference

State = dict[str, torch.Tensor]


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

SHAPES: dict[str, tuple[tuple[int, ...], torch.dtype]] = {
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
    for k, (shape, dtype) in SHAPES.items():
        base[k] = (torch.randint(-64, 65, shape, generator=g).double() / 16).to(dtype)
    base["position_ids"] = torch.arange(6, dtype=torch.int64)
    base["mask"] = torch.tensor([True, False, True])
    models = []
    for _ in range(n):
        m: State = {}
        for k, (shape, dtype) in SHAPES.items():
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

# ============================================================================================ ties


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("elect", ["mass", "count"])
@pytest.mark.parametrize("zero_sign", ["zero", "positive", "majority"])
@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
def test_ties_matches_reference(family: str, scope: str, elect: str, zero_sign: str, aggregate: str) -> None:
    base, models = FAMILIES[family]()
    opts = dict(density=0.3, lam=1.3, scope=scope, elect=elect, zero_sign=zero_sign, aggregate=aggregate)
    assert_matches(run(base, models, "ties", **opts), ref_ties(base, models, **opts))


@pytest.mark.parametrize("weights", [(2.0, 0.5, 1.5), (1.0, 0.0, 3.0)])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("elect", ["mass", "count"])
@pytest.mark.parametrize("zero_sign", ["zero", "majority"])
@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
def test_ties_weighted_matches_reference(weights: tuple[float, ...], scope: str, elect: str, zero_sign: str,
                                         aggregate: str) -> None:
    base, models = grid_family(4, 3)
    opts = dict(density=0.5, lam=0.9, scope=scope, elect=elect, zero_sign=zero_sign, aggregate=aggregate,
                weights=weights)
    assert_matches(run(base, models, Ties(**opts)), ref_ties(base, models, **opts))


@pytest.mark.parametrize("density", [0.01, 0.1, 0.2, 0.29, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_density_sweep(density: float, scope: str) -> None:
    base, models = grid_family(5, 4)
    assert_matches(run(base, models, "ties", density=density, scope=scope),
                   ref_ties(base, models, density=density, scope=scope))


def test_ties_defaults_are_the_papers() -> None:
    m = Ties()
    assert (m.density, m.lam, m.scope, m.elect, m.zero_sign, m.aggregate) == (0.2, 1.0, "global", "mass", "zero", "mean")
    base, models = grid_family(6, 3, coarse=False)
    assert_matches(run(base, models, "ties"), ref_ties(base, models))


def test_fixture_exercises_zero_votes_and_both_majorities() -> None:
    """The reference comparisons above mean something only if the zero_sign options differ."""
    base, models = grid_family(1, 3)
    outs = {zs: run(base, models, "ties", density=0.3, scope="per_tensor", elect="count", zero_sign=zs)
            for zs in ("zero", "positive", "majority")}
    differs = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert differs(outs["zero"], outs["positive"])
    assert differs(outs["zero"], outs["majority"])
    assert differs(outs["positive"], outs["majority"])  # "weight" has majority -1 per tensor


# --------------------------------------------------------------------------------------------- hand-made cases


def _one_tensor(base_values: list[float], *model_values: list[float]) -> tuple[State, list[State]]:
    base = {"w": torch.tensor(base_values, dtype=torch.float64)}
    return base, [{"w": torch.tensor(v, dtype=torch.float64)} for v in model_values]


def test_ties_paper_steps_by_hand() -> None:
    base, models = _one_tensor([0, 0, 0, 0], [3, -1, 2, 0.5], [1, 2, -2, 0], [-1, 2, -1, 0])
    out = run(base, models, "ties", density=1.0)["w"]
    # e0: mass +3, agreeing {3, 1} -> 2;  e1: +3, {2, 2} -> 2;  e2: -1, {-2, -1} -> -1.5;  e3: +, {0.5}
    assert torch.equal(out, torch.tensor([2.0, 2.0, -1.5, 0.5], dtype=torch.float64))


def test_trim_keeps_every_tie_at_the_threshold() -> None:
    base, models = _one_tensor([0] * 6, [3, -2, 2, 2, -1, 0.5])
    # m = floor(0.4 * 6) = 2; the 2nd largest |tau| is 2, and all three 2s are kept
    out = run(base, models, "ties", density=0.4)["w"]
    assert torch.equal(out, torch.tensor([3, -2, 2, 2, 0, 0], dtype=torch.float64))


def test_trim_with_zero_keep_count_keeps_nothing() -> None:
    base, models = _one_tensor([1, 2, 3], [5, 6, 7])
    # floor(0.3 * 3) = 0: nothing survives, the output is the base
    out = run(base, models, "ties", density=0.3)["w"]
    assert torch.equal(out, base["w"])
    out = run(base, models, "magnitude_prune", density=0.3)["w"]
    assert torch.equal(out, base["w"])


def test_keep_count_uses_exact_density() -> None:
    # 100 distinct magnitudes: density 0.29 keeps exactly 29 (the float product is 28.99...)
    base = {"w": torch.zeros(100)}
    model = {"w": (torch.arange(100, dtype=torch.float32) + 1) * torch.tensor([1.0, -1.0]).repeat(50)}
    for density, kept in ((0.29, 29), (0.57, 57), (0.07, 7), (0.3, 30)):
        out = run(base, [model], "ties", density=density)["w"]
        assert int((out != 0).sum()) == kept, density
        assert torch.equal(out.abs().sort(descending=True).values[:kept], torch.arange(100, 100 - kept, -1).float())


def test_exact_zero_vote_elects_zero() -> None:
    base, models = _one_tensor([0, 0], [1.5, 1.0], [-1.5, 1.0])
    assert torch.equal(run(base, models, "ties", density=1.0)["w"], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(run(base, models, "ties", density=1.0, zero_sign="positive")["w"],
                       torch.tensor([1.5, 1.0], dtype=torch.float64))


def test_majority_sign_is_the_sign_of_the_summed_elected_signs() -> None:
    # elected signs: e0 0 (vote tie), e1 -1, e2 -1, e3 +1 -> sum -1 -> the tie resolves to -1
    base, models = _one_tensor([0, 0, 0, 0], [2, -1, -1, 1], [-2, -1, -1, 1])
    out = run(base, models, "ties", density=1.0, zero_sign="majority")["w"]
    assert torch.equal(out, torch.tensor([-2.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    # and the majority is over the whole trim scope: with a second tensor of positive signs, the
    # global majority flips to +1 while the per-tensor one stays -1
    base["v"] = torch.zeros(5, dtype=torch.float64)
    for m in models:
        m["v"] = torch.ones(5, dtype=torch.float64)
    glob = run(base, models, "ties", density=1.0, zero_sign="majority", scope="global")["w"]
    per = run(base, models, "ties", density=1.0, zero_sign="majority", scope="per_tensor")["w"]
    assert float(glob[0]) == 2.0 and float(per[0]) == -2.0


def test_global_scope_uses_one_threshold_over_all_tensors() -> None:
    # "big" has all the large task-vector entries: a global top-50% keeps all of it and none of "small"
    base = {"big": torch.zeros(4), "small": torch.zeros(2, 2)}
    model = {"big": torch.tensor([10.0, -20.0, 30.0, -40.0]), "small": torch.tensor([[1.0, -2.0], [3.0, -4.0]])}
    glob = run(base, [model], "ties", density=0.5, scope="global")
    assert torch.equal(glob["big"], model["big"]) and torch.equal(glob["small"], torch.zeros(2, 2))
    per = run(base, [model], "ties", density=0.5, scope="per_tensor")
    assert torch.equal(per["big"], torch.tensor([0.0, 0.0, 30.0, -40.0]))
    assert torch.equal(per["small"], torch.tensor([[0.0, 0.0], [3.0, -4.0]]))


def test_trimming_ranks_each_models_own_unweighted_tau() -> None:
    # model 1's entries are all tiny next to model 0's, but its own top 50% survive (not a joint
    # ranking), and its weight changes neither which entries survive nor model 0's
    base, models = _one_tensor([0, 0, 0, 0], [8, 4, 0, 0], [0, 0.375, 0.25, 0.125])
    out = run(base, models, Ties(density=0.5, weights=(1.0, 3.0)))["w"]
    # e1: weighted mean (1*4 + 3*0.375) / 4; e3: 0.125 is model 1's 3rd largest, trimmed
    assert torch.equal(out, torch.tensor([8.0, 1.28125, 0.25, 0.0], dtype=torch.float64))


def test_weighted_mean_over_agreeing_models() -> None:
    base, models = _one_tensor([0], [1.0], [4.0], [-100.0])
    # mass: 1*1 + 3*4 - 0.125*100 = 0.5 > 0 -> agreeing {1, 4}, weighted mean (1*1 + 3*4) / (1 + 3)
    out = run(base, models, Ties(density=1.0, weights=(1.0, 3.0, 0.125)))["w"]
    assert torch.equal(out, torch.tensor([3.25], dtype=torch.float64))
    out = run(base, models, Ties(density=1.0, weights=(1.0, 3.0, 0.125), aggregate="sum"))["w"]
    assert torch.equal(out, torch.tensor([13.0], dtype=torch.float64))
    out = run(base, models, Ties(density=1.0, weights=(1.0, 3.0, 0.125), aggregate="max"))["w"]
    assert torch.equal(out, torch.tensor([12.0], dtype=torch.float64))


# ============================================================================================ other methods


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("weights", [None, (2.0, 0.5, 1.5)])
def test_task_arithmetic_matches_reference(family: str, weights: tuple[float, ...] | None) -> None:
    base, models = FAMILIES[family]()
    weights = weights[: len(models)] if weights else None
    assert_matches(run(base, models, TaskArithmetic(lam=0.7, weights=weights)),
                   ref_linear(base, models, lam=0.7, weights=weights))


def test_task_arithmetic_default_lambda_is_0_4() -> None:
    assert TaskArithmetic().lam == 0.4
    base, models = grid_family(7, 3)
    assert_matches(run(base, models, "task_arithmetic"), ref_linear(base, models, lam=0.4))


@pytest.mark.parametrize("weights", [None, (1.0, 3.0, 4.0), (0.125, 0.375, 0.5)])
def test_average_matches_reference(weights: tuple[float, ...] | None) -> None:
    base, models = grid_family(8, 3, coarse=False)
    assert_matches(run(base, models, Average(weights=weights)), ref_average(base, models, weights))


def test_average_weights_are_normalised() -> None:
    base, models = grid_family(9, 2)
    a = run(base, models, Average(weights=(1.0, 3.0)))
    b = run(base, models, Average(weights=(0.25, 0.75)))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)
    # and differ from the plain mean
    plain = run(base, models, "average")
    assert any(not torch.allclose(a[k].double(), plain[k].double()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("weights", [None, (2.0, 0.5, 1.5)])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_magnitude_prune_matches_reference(scope: str, weights: tuple[float, ...] | None, density: float) -> None:
    base, models = grid_family(10, 3)
    method = MagnitudePrune(density=density, lam=1.5, scope=scope, weights=weights)
    assert_matches(run(base, models, method),
                   ref_linear(base, models, lam=1.5, weights=weights, density=density, scope=scope))


# --------------------------------------------------------------------------------------------- DARE


def test_dare_with_drop_rate_zero_is_task_arithmetic_and_untrimmed_ties() -> None:
    base, models = grid_family(11, 3)
    weights = (2.0, 0.5, 1.5)
    assert_matches(run(base, models, DareLinear(drop_rate=0.0, lam=0.6, weights=weights)),
                   ref_linear(base, models, lam=0.6, weights=weights))
    for elect in ("mass", "count"):
        for aggregate in ("mean", "sum", "max"):
            method = DareTies(drop_rate=0.0, lam=1.2, elect=elect, aggregate=aggregate, weights=weights)
            assert_matches(run(base, models, method),
                           ref_ties(base, models, lam=1.2, elect=elect, aggregate=aggregate, weights=weights,
                                    trim=False))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_is_deterministic_per_seed(method: str) -> None:
    base, models = grid_family(12, 3, coarse=False)
    a = run(base, models, method, drop_rate=0.5, seed=7)
    b = run(base, models, method, drop_rate=0.5, seed=7)
    c = run(base, models, method, drop_rate=0.5, seed=8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def _constant_family(value: float, *values: float, shape: tuple[int, ...] = (200, 100)) -> tuple[State, list[State]]:
    base = {"w": torch.zeros(shape), "u": torch.zeros(shape)}
    return base, [{"w": torch.full(shape, v), "u": torch.full(shape, v)} for v in (value, *values)]


@pytest.mark.parametrize("drop_rate", [0.3, 0.9])
def test_dare_drops_the_right_fraction_and_preserves_the_expectation(drop_rate: float) -> None:
    base, models = _constant_family(1.0)
    out = run(base, models, "dare_linear", drop_rate=drop_rate, lam=1.0, seed=3)
    for k in ("w", "u"):
        w = out[k]
        kept = w != 0
        frac = float(kept.double().mean())
        sd = math.sqrt(drop_rate * (1 - drop_rate) / w.numel())
        assert abs(frac - (1 - drop_rate)) < 5 * sd
        # kept entries are rescaled by 1 / (1 - p)
        torch.testing.assert_close(w[kept], torch.full_like(w[kept], 1.0 / (1.0 - drop_rate)))
        assert abs(float(w.double().mean()) - 1.0) < 5 * sd / (1 - drop_rate)
    # different tensors draw different masks
    assert not torch.equal(out["w"] != 0, out["u"] != 0)


def test_dare_models_draw_independent_masks() -> None:
    p = 0.5
    base, models = _constant_family(1.0, 2.0)
    out = run(base, models, "dare_linear", drop_rate=p, lam=1.0 - p, seed=0)["w"]  # lam undoes the rescale
    # out = k0 * 1 + k1 * 2, so each entry tells which models were kept
    k0, k1 = (out == 1) | (out == 3), (out == 2) | (out == 3)
    assert bool(((out == 0) | k0 | k1).all())
    both = float((k0 & k1).double().mean())
    assert abs(both - (1 - p) ** 2) < 0.02  # independent: 0.25; identical masks would give 0.5


def test_dare_ties_with_one_model_is_dare_linear() -> None:
    base, models = grid_family(13, 1, coarse=False)
    a = run(base, models, "dare_ties", drop_rate=0.6, lam=1.0, seed=5)
    b = run(base, models, "dare_linear", drop_rate=0.6, lam=1.0, seed=5)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-6)


def test_dare_ties_elects_signs_after_the_drop() -> None:
    # two models of opposite sign: where only one survives, its rescaled value is the result
    p = 0.5
    base, models = _constant_family(1.0, -1.0)
    out = run(base, models, "dare_ties", drop_rate=p, lam=1.0, seed=1)["w"]
    values = set(out.unique().tolist())
    assert values <= {0.0, 2.0, -2.0}
    assert values == {0.0, 2.0, -2.0}  # both, neither (0: tie vote or nothing), only one of each


# ============================================================================================ configs


def test_registry_names_build_the_same_methods() -> None:
    assert tiesmerge.METHODS["ties"] is Ties
    base, models = grid_family(14, 2)
    a = run(base, models, "ties", density=0.4, lam=1.1)
    b = run(base, models, Ties(density=0.4, lam=1.1))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (Ties, {"density": 0.0}),
        (Ties, {"density": 20}),
        (Ties, {"scope": "layer"}),
        (Ties, {"zero_sign": "negative"}),
        (Ties, {"lam": float("nan")}),
        (DareLinear, {"drop_rate": 1.0}),
        (DareTies, {"seed": -1}),
        (Average, {"weights": (1.0, -1.0)}),
        (MagnitudePrune, {"density": -0.1}),
    ],
)
def test_invalid_options_raise_config_error(cls: type, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        cls(**kwargs)


def test_weight_count_must_match_model_count() -> None:
    base, models = grid_family(15, 3)
    with pytest.raises(ConfigError):
        run(base, models, Ties(weights=(1.0, 2.0)))
