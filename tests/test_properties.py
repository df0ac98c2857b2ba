"""Properties every merge must have, checked on small random state dicts with hypothesis.

Cross-cutting (not one source module): every method through the public API and the engine.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import tiesmerge
from tiesmerge.methods import Average, DareLinear, DareTies, MagnitudePrune, TaskArithmetic, Ties

State = dict[str, torch.Tensor]

FAST = settings(max_examples=50, deadline=None)

SHAPE_SETS = [
    {"a": (3,), "b": (2, 4)},
    {"s": (), "w": (4, 3), "c": (2, 2, 3)},
    {"w": (6, 5)},
]

seeds = st.integers(0, 2**31 - 1)
shape_sets = st.sampled_from(range(len(SHAPE_SETS)))
dtypes = st.sampled_from([torch.float32, torch.float64])


def make_base(seed: int, shapes: int, dtype: torch.dtype) -> State:
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for k, s in SHAPE_SETS[shapes].items()}
    out["ids"] = torch.arange(3)
    return out


def make_model(base: State, seed: int, scale: float = 0.5) -> State:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.double() + scale * torch.randn(v.shape, generator=g, dtype=torch.float64)).to(v.dtype)
            if v.is_floating_point() else v.clone() for k, v in base.items()}


def distinct_models(base: State, n: int, seed: int) -> list[State]:
    """n models whose |tau| are pairwise distinct across every entry and model (no ties anywhere)."""
    g = torch.Generator().manual_seed(seed)
    names = [k for k, v in base.items() if v.is_floating_point()]
    total = sum(base[k].numel() for k in names)
    mags = (torch.randperm(n * total, generator=g).double() + 1) / 64  # exact in float32
    signs = torch.randint(0, 2, (n * total,), generator=g).double() * 2 - 1
    taus = (mags * signs).view(n, total)
    models = []
    for t in range(n):
        m, start = {}, 0
        for k, v in base.items():
            if not v.is_floating_point():
                m[k] = v.clone()
                continue
            m[k] = (v.double() + taus[t, start:start + v.numel()].view(v.shape)).to(v.dtype)
            start += v.numel()
        models.append(m)
    return models


def grid_base(seed: int, shapes: int, dtype: torch.dtype) -> State:
    """A base on a dyadic grid, so base + distinct task vectors stays exact in float32."""
    g = torch.Generator().manual_seed(seed)
    out = {k: (torch.randint(-64, 65, s, generator=g).double() / 16).to(dtype) for k, s in SHAPE_SETS[shapes].items()}
    out["ids"] = torch.arange(3)
    return out


def merge(base: State, models: list[State], method: Any, **opts: Any) -> State:
    out = tiesmerge.merge({k: v.clone() for k, v in base.items()},
                          [{k: v.clone() for k, v in m.items()} for m in models], method, **opts)
    assert isinstance(out, dict)
    return out


def assert_close_f32(out: State, expected: State, scale: State | None = None) -> None:
    """Equal within float32 rounding of the values involved (the engine computes in float32)."""
    for k, v in expected.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        if not v.is_floating_point():
            assert torch.equal(out[k], v), k
            continue
        ref = (scale or expected)[k].double().abs() + v.double().abs() + 1.0
        err = (out[k].double() - v.double()).abs()
        assert bool((err <= 4 * 2.0**-24 * ref).all()), (k, float(err.max()))


one_model_methods = st.sampled_from([
    Ties(density=1.0, lam=1.0),
    Ties(density=1.0, lam=1.0, scope="per_tensor", elect="count", zero_sign="majority"),
    Ties(density=1.0, lam=1.0, aggregate="max", zero_sign="positive"),
    Ties(density=1.0, lam=1.0, aggregate="sum", weights=(1.0,)),
    MagnitudePrune(density=1.0, lam=1.0),
    TaskArithmetic(lam=1.0),
    Average(),
    Average(weights=(3.0,)),
    DareLinear(drop_rate=0.0),
    DareTies(drop_rate=0.0),
])


@FAST
@given(seed=seeds, shapes=shape_sets, dtype=dtypes, method=one_model_methods, budget=st.sampled_from([None, 4096]))
def test_one_model_full_density_returns_the_model(seed: int, shapes: int, dtype: torch.dtype, method: Any,
                                                  budget: int | None) -> None:
    base = make_base(seed, shapes, dtype)
    model = make_model(base, seed + 1)
    assert_close_f32(merge(base, [model], method, memory_budget=budget), model, base)


@FAST
@given(seed=seeds, shapes=shape_sets, dtype=dtypes)
def test_one_model_on_a_grid_is_returned_exactly(seed: int, shapes: int, dtype: torch.dtype) -> None:
    base = grid_base(seed, shapes, dtype)
    model = distinct_models(base, 1, seed + 1)[0]
    out = merge(base, [model], "ties", density=1.0)
    for k in base:
        assert torch.equal(out[k], model[k]), k


order_methods = st.sampled_from([
    ("ties", {"density": 0.3}),
    ("ties", {"density": 0.5, "scope": "per_tensor", "elect": "count", "zero_sign": "majority"}),
    ("ties", {"density": 0.7, "aggregate": "max", "zero_sign": "positive"}),
    ("ties", {"density": 0.4, "aggregate": "sum"}),
    ("magnitude_prune", {"density": 0.4}),
    ("task_arithmetic", {}),
    ("average", {}),
])


@FAST
@given(seed=seeds, shapes=shape_sets, n=st.integers(2, 4), method=order_methods, data=st.data())
def test_result_does_not_depend_on_model_order(seed: int, shapes: int, n: int, method: tuple[str, dict],
                                               data: st.DataObject) -> None:
    name, opts = method
    base = grid_base(seed, shapes, torch.float32)
    models = distinct_models(base, n, seed + 7)
    perm = data.draw(st.permutations(range(n)))
    weights = data.draw(st.one_of(st.none(), st.lists(st.sampled_from([0.5, 1.0, 1.5, 2.0]), min_size=n, max_size=n)))
    if weights is not None:
        opts = {**opts, "weights": weights}
    first = merge(base, models, name, **opts)
    permuted = {**opts, "weights": [weights[i] for i in perm]} if weights is not None else opts
    second = merge(base, [models[i] for i in perm], name, **permuted)
    assert_close_f32(second, first)


@FAST
@given(seed=seeds, shapes=shape_sets, dtype=dtypes, n=st.integers(2, 5))
def test_averaging_identical_models_returns_the_model(seed: int, shapes: int, dtype: torch.dtype, n: int) -> None:
    base = make_base(seed, shapes, dtype)
    model = make_model(base, seed + 3)
    copies = [{k: v.clone() for k, v in model.items()} for _ in range(n)]
    assert_close_f32(merge(base, copies, "average"), model, base)


@FAST
@given(seed=seeds, shapes=shape_sets, dtype=dtypes, n=st.integers(2, 5),
       opts=st.sampled_from([{}, {"aggregate": "max"}, {"elect": "count"}, {"zero_sign": "majority"},
                             {"scope": "per_tensor"}, {"weights": "random"}]))
def test_ties_of_identical_models_is_base_plus_tau(seed: int, shapes: int, dtype: torch.dtype, n: int,
                                                   opts: dict) -> None:
    base = make_base(seed, shapes, dtype)
    model = make_model(base, seed + 5)
    copies = [{k: v.clone() for k, v in model.items()} for _ in range(n)]
    if opts.get("weights") == "random":
        opts = {"weights": [0.5 + t for t in range(n)]}
    assert_close_f32(merge(base, copies, "ties", density=1.0, lam=1.0, **opts), model, base)


@FAST
@given(seed=seeds, shapes=shape_sets, n=st.integers(1, 4), density=st.sampled_from([0.1, 0.2, 0.5, 0.9, 1.0]),
       lam=st.sampled_from([0.5, 1.0, 2.0]))
def test_ties_equals_magnitude_prune_when_signs_never_conflict(seed: int, shapes: int, n: int, density: float,
                                                                lam: float) -> None:
    # every model moves every entry the same way: the election keeps all, so ties' "sum" = pruned sum
    base = grid_base(seed, shapes, torch.float32)
    models = distinct_models(base, n, seed + 11)
    for m in models[1:]:
        for k, v in m.items():
            if v.is_floating_point():
                m[k] = base[k] + (v - base[k]).abs() * (models[0][k] - base[k]).sign()
    a = merge(base, models, "ties", density=density, lam=lam, aggregate="sum")
    b = merge(base, models, "magnitude_prune", density=density, lam=lam)
    assert_close_f32(a, b)


@FAST
@given(seed=seeds, shapes=shape_sets, n=st.integers(1, 3), lam=st.sampled_from([0.25, 0.5, 2.0, -1.0]))
def test_lambda_scales_the_merged_task_vector(seed: int, shapes: int, n: int, lam: float) -> None:
    base = grid_base(seed, shapes, torch.float32)
    models = distinct_models(base, n, seed + 13)
    for method, opts in (("ties", {"density": 0.4}), ("task_arithmetic", {}), ("dare_linear", {"drop_rate": 0.5})):
        one = merge(base, models, method, lam=1.0, **opts)
        scaled = merge(base, models, method, lam=lam, **opts)
        expected = {k: (base[k] + lam * (one[k] - base[k])) if v.is_floating_point() else v for k, v in one.items()}
        assert_close_f32(scaled, expected, one)


@FAST
@given(seed=seeds, shapes=shape_sets, n=st.integers(1, 3), density=st.sampled_from([0.05, 0.3, 0.6]),
       scope=st.sampled_from(["global", "per_tensor"]))
def test_trim_keeps_exactly_the_top_entries_of_tie_free_inputs(seed: int, shapes: int, n: int, density: float,
                                                               scope: str) -> None:
    from fractions import Fraction

    base = grid_base(seed, shapes, torch.float32)
    models = distinct_models(base, n, seed + 17)
    out = merge(base, models, "magnitude_prune", density=density, scope=scope, lam=1.0, weights=[1.0] + [0.0] * (n - 1))
    names = [k for k, v in base.items() if v.is_floating_point()]
    frac = Fraction(repr(density))
    groups = [names] if scope == "global" else [[k] for k in names]
    for group in groups:
        numel = sum(base[k].numel() for k in group)
        kept = sum(int((out[k] != base[k]).sum()) for k in group)
        assert kept == frac.numerator * numel // frac.denominator
