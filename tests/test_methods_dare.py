"""DARE (methods/dare.py): drop rate 0 against the float64 reference, seeded and independent
drops, the rescale, and TIES's election after the drop."""

from __future__ import annotations

import math

import pytest
import torch

from helpers_merge import State, assert_matches, grid_family, ref_linear, ref_ties, run
from tiesmerge.methods import DareLinear, DareTies


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
