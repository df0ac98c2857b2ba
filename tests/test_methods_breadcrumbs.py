"""Breadcrumbs and Breadcrumbs-TIES (methods/breadcrumbs.py): the middle band against a float64
reference (exact thresholds, ties kept), mergekit's exact counts in sort order, the L1 rescale,
and the TIES steps after the mask."""

from __future__ import annotations

import math

import pytest
import torch

from helpers_merge import State, assert_matches, grid_family, ref_keep_count, run
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Breadcrumbs, BreadcrumbsTies


def _sign(x: float) -> float:
    return float((x > 0) - (x < 0))


def ref_band(values: list[float], density: float, gamma: float) -> list[float]:
    """Keep |v| >= the m-th largest (m = floor((density + gamma) n)) and < the j-th largest
    (j = floor(gamma n)); float64, ties at either threshold on the side stated."""
    n = len(values)
    if density >= 1:
        return list(values)
    mags = sorted((abs(v) for v in values), reverse=True)
    m = ref_keep_count(n, min(1.0, density + gamma))
    low = math.inf if m == 0 else mags[m - 1]
    j = ref_keep_count(n, gamma) if gamma > 0 else 0
    high = math.inf if j == 0 else mags[j - 1]
    return [v if low <= abs(v) < high else 0.0 for v in values]


def ref_breadcrumbs(base: State, models: list[State], *, density: float, gamma: float, lam: float,
                    weights: tuple[float, ...] | None = None, normalize: bool = False,
                    ties: str | None = None) -> State:
    """Per tensor, float64: the band of each model, then a weighted sum (/ sum w) or, with ``ties``
    (the aggregate), the sign of the weighted sum (+ on 0) and the agreeing weighted values."""
    w = weights or (1.0,) * len(models)
    out: State = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b.clone()
            continue
        taus = [ref_band((m[k].double() - b.double()).reshape(-1).tolist(), density, gamma) for m in models]
        merged = []
        for i in range(b.numel()):
            vals = [w[t] * taus[t][i] for t in range(len(models))]
            if ties is None:
                total = sum(vals)
                merged.append(total / sum(w) if normalize else total)
                continue
            gamma_sign = _sign(sum(vals)) or 1.0
            agree = [(v, w[t]) for t, v in enumerate(vals) if v != 0 and _sign(v) == gamma_sign]
            total = sum(v for v, _ in agree)
            merged.append(total / sum(x for _, x in agree) if ties == "mean" and agree else total)
        delta = torch.tensor(merged, dtype=torch.float64).reshape(b.shape)
        out[k] = (b.double() + lam * delta).to(b.dtype)
    return out


@pytest.mark.parametrize("density,gamma", [(0.2, 0.1), (0.5, 0.0), (0.3, 0.25), (1.0, 0.1)])
def test_breadcrumbs_keeps_the_middle_band(density: float, gamma: float) -> None:
    base, models = grid_family(21, 3)  # coarse grid: many ties at both thresholds
    weights = (1.0, 0.5, 2.0)
    out = run(base, models, Breadcrumbs(density=density, gamma=gamma, lam=0.7, weights=weights))
    assert_matches(out, ref_breadcrumbs(base, models, density=density, gamma=gamma, lam=0.7, weights=weights))
    out = run(base, models, Breadcrumbs(density=density, gamma=gamma, lam=0.7, normalize_weights=True))
    assert_matches(out, ref_breadcrumbs(base, models, density=density, gamma=gamma, lam=0.7, normalize_weights=True))


@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_breadcrumbs_ties_elects_after_the_band(aggregate: str) -> None:
    base, models = grid_family(22, 3, coarse=False)
    weights = (1.0, 0.7, 0.5)
    method = BreadcrumbsTies(density=0.3, gamma=0.05, lam=1.3, weights=weights, aggregate=aggregate)
    assert_matches(run(base, models, method),
                   ref_breadcrumbs(base, models, density=0.3, gamma=0.05, lam=1.3, weights=weights, ties=aggregate))


def test_sort_mode_is_mergekits_exact_count_on_distinct_magnitudes() -> None:
    # distinct magnitudes: int(density n) kept, int(gamma n) dropped from the top, whatever the order
    g = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(40, 25, generator=g)}
    models = [{"w": base["w"] + torch.randn(40, 25, generator=g)} for _ in range(2)]
    out = run(base, models, Breadcrumbs(density=0.3, gamma=0.02, lam=1.0, threshold_ties="sort"))["w"]
    tau = [(m["w"] - base["w"]).reshape(-1) for m in models]
    want = torch.zeros(1000, dtype=torch.float64)
    for t in tau:
        order = sorted(range(1000), key=lambda i: abs(float(t[i])))  # ascending
        keep = order[1000 - 300 - 20:1000 - 20]  # int(0.3 * 1000) kept below the int(0.02 * 1000) outliers
        want[keep] += t[keep].double()
    torch.testing.assert_close(out.double(), base["w"].double() + want.reshape(40, 25), rtol=1e-6, atol=1e-6)
    # the count is exact: 300 entries per model, whatever the float product's rounding
    single = run(base, models[:1], Breadcrumbs(density=0.3, gamma=0.02, threshold_ties="sort"))["w"]
    assert int((single != base["w"]).sum()) == 300


def test_rescale_restores_each_tensors_l1_norm() -> None:
    base, models = grid_family(23, 1, coarse=False)
    out = run(base, models, Breadcrumbs(density=0.4, gamma=0.05, rescale="l1", threshold_ties="sort"))
    for k in ("weight", "conv", "double2d"):
        tau = models[0][k].double() - base[k].double()
        merged = out[k].double() - base[k].double()
        assert float(merged.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
        assert int((merged != 0).sum()) < tau.numel()


def test_breadcrumbs_checks_its_options() -> None:
    with pytest.raises(ConfigError, match="per_tensor"):
        Breadcrumbs(threshold_ties="sort", scope="global")
    with pytest.raises(ConfigError, match="per_tensor"):
        Breadcrumbs(rescale="l1", scope="global")
    with pytest.raises(ConfigError, match="gamma"):
        Breadcrumbs(gamma=1.5)
    with pytest.raises(ConfigError, match="zero_sign"):
        BreadcrumbsTies(zero_sign="majority")


def test_global_scope_cuts_over_the_whole_model() -> None:
    base, models = grid_family(24, 2, coarse=False)
    per_tensor = run(base, models, Breadcrumbs(density=0.3, gamma=0.1))
    whole = run(base, models, Breadcrumbs(density=0.3, gamma=0.1, scope="global"))
    assert any(not torch.equal(per_tensor[k], whole[k]) for k in base if base[k].is_floating_point())
    # the global band keeps floor((density + gamma) N) - floor(gamma N) of each model's N entries
    names = [k for k in base if base[k].is_floating_point()]
    single = run(base, models[:1], Breadcrumbs(density=0.3, gamma=0.1, scope="global"))
    total = sum(base[k].numel() for k in names)
    kept = sum(int((single[k].double() != base[k].double()).sum()) for k in names)
    assert kept == ref_keep_count(total, 0.4) - ref_keep_count(total, 0.1)
