"""Validation grid search (tuning/search.py): the paper's grids, one engine merge per non-lam grid
point, an exact lam sweep on top of tau_m, best-point selection, and up-front validation."""

from __future__ import annotations

from decimal import Decimal

import pytest
import torch

import tiesmerge
from tiesmerge.errors import ConfigError
from tiesmerge.methods import TaskArithmetic, Ties
from tiesmerge.tuning import GridPoint, TuningResult, paper_grid, search, steps, tune

PAPER_LAMS = tuple(float(Decimal("0.8") + Decimal("0.1") * i) for i in range(23))


def _states():
    g = torch.Generator().manual_seed(0)
    base = {"layer.weight": torch.randn(12, 10, generator=g), "layer.bias": torch.randn(10, generator=g),
            "head.weight": torch.randn(4, 12, generator=g), "position_ids": torch.arange(7)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
               for k, v in base.items()} for _ in range(3)]
    return base, models


@pytest.fixture
def merges(monkeypatch):
    """The method objects of every engine merge the tuner runs."""
    calls = []
    real = search.merge

    def counting(base, models, method, **kwargs):
        calls.append(method)
        return real(base, models, method, **kwargs)

    monkeypatch.setattr(search, "merge", counting)
    return calls


def test_lam_grid_exact_decimals():
    grid = steps(0.8, 3.0, 0.1)
    assert len(grid) == 23
    assert grid[0] == 0.8 and grid[-1] == 3.0
    assert grid == PAPER_LAMS  # 0.8 + 0.1 * 3 would be 1.1000000000000003 without rounding
    assert [repr(x) for x in grid[:4]] == ["0.8", "0.9", "1.0", "1.1"]
    assert steps(0.1, 1.0, 0.1) == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    assert steps(1.0, 1.0, 0.1) == (1.0,)


def test_paper_grids():
    ties = paper_grid("ties")
    assert ties == {"density": (0.1, 0.2, 0.3), "lam": PAPER_LAMS}
    assert len(ties["density"]) * len(ties["lam"]) == 69
    ta = paper_grid("task_arithmetic")
    assert ta == {"lam": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)}
    with pytest.raises(ConfigError):
        paper_grid("average")


def test_ties_paper_grid_costs_three_merges(merges):
    base, models = _states()
    seen = []
    result = tune(base, models, "ties", lambda state: 0.0, on_point=seen.append)
    assert len(merges) == 3 == result.merges
    assert [m.density for m in merges] == [0.1, 0.2, 0.3]
    assert all(isinstance(m, Ties) and m.lam == 1.0 for m in merges)  # tau_m is merged at lam = 1
    assert len(result.points) == 69
    assert [(p.options["density"], p.lam) for p in result.points] == \
        [(k, lam) for k in (0.1, 0.2, 0.3) for lam in PAPER_LAMS]
    assert seen == list(result.points)  # on_point: once per point, in order
    assert result.method == "ties" and result.seconds >= 0
    assert len(result.table().splitlines()) == 70


def test_task_arithmetic_paper_grid_costs_one_merge(merges):
    base, models = _states()
    states = []
    result = tune(base, models, "task_arithmetic", lambda s: states.append(s) or 0.0)
    assert len(merges) == 1 == result.merges
    assert isinstance(merges[0], TaskArithmetic) and merges[0].lam == 1.0
    assert [p.lam for p in result.points] == list(paper_grid("task_arithmetic")["lam"])
    assert all(p.options == {} for p in result.points)
    for point, state in zip(result.points, states, strict=True):
        expected = tiesmerge.merge(base, models, TaskArithmetic(lam=point.lam))
        for k in base:
            torch.testing.assert_close(state[k], expected[k], rtol=0, atol=1e-5)


def test_lam_sweep_equals_merging_with_that_lam():
    base, models = _states()
    states = []

    def evaluate(state):
        states.append({k: v.clone() for k, v in state.items()})
        return 0.0

    result = tune(base, models, "ties", evaluate)
    assert len(states) == len(result.points) == 69
    worst = 0.0
    for point, state in zip(result.points, states, strict=True):
        expected = tiesmerge.merge(base, models, Ties(density=point.options["density"], lam=point.lam))
        assert state.keys() == expected.keys() == base.keys()
        for k in base:
            assert state[k].dtype == base[k].dtype and state[k].shape == base[k].shape
            if not base[k].is_floating_point():
                assert torch.equal(state[k], base[k])
                continue
            worst = max(worst, float((state[k] - expected[k]).abs().max()))
            # float32 rounding of base + lam * ((base + tau_m) - base): a few ulps of |theta| ~ 4
            torch.testing.assert_close(state[k], expected[k], rtol=1e-6, atol=4e-6)
    assert worst < 4e-6
    # and the sweep really moves: lam 0.8 and 3.0 are far apart
    assert float((states[0]["layer.weight"] - states[22]["layer.weight"]).abs().max()) > 1e-2


@pytest.mark.parametrize("peak", [(0.2, 1.7), (0.3, 0.8), (0.1, 3.0)])
def test_best_point_and_state(peak):
    base, models = _states()
    target = tiesmerge.merge(base, models, Ties(density=peak[0], lam=peak[1]))
    evaluated = {}

    def evaluate(state):  # highest (~0) exactly at the target merge
        score = -sum(float(((state[k].float() - target[k].float()) ** 2).sum()) for k in target)
        evaluated[score] = state
        return score

    result = tune(base, models, "ties", evaluate)
    assert isinstance(result, TuningResult) and isinstance(result.best, GridPoint)
    assert result.best.options == {"density": peak[0]} and result.best.lam == peak[1]
    assert result.best.score == max(p.score for p in result.points)
    assert sum(p.score == result.best.score for p in result.points) == 1
    # the state scored, built again from the best merge (an evaluator may change its argument in place: hp40 T1)
    assert all(torch.equal(result.best_state[k], evaluated[result.best.score][k]) for k in result.best_state)
    for k in base:
        torch.testing.assert_close(result.best_state[k], target[k], rtol=1e-6, atol=4e-6)


def test_ties_keep_the_first_best_point():
    base, models = _states()
    result = tune(base, models, "ties", lambda s: 1.0, grid={"density": (0.3, 0.1), "lam": (2.0, 1.0)})
    assert (result.best.options, result.best.lam) == ({"density": 0.3}, 2.0)


def test_custom_grid_and_fixed_options(merges):
    base, models = _states()
    result = tune(base, models, "ties", lambda s: 0.0, grid={"density": (0.5,), "lam": (1, 2)},
                  fixed={"elect": "count", "scope": "per_tensor"})
    assert len(merges) == 1
    assert (merges[0].density, merges[0].elect, merges[0].scope) == (0.5, "count", "per_tensor")
    assert [p.lam for p in result.points] == [1.0, 2.0]
    assert all(isinstance(p.lam, float) for p in result.points)


def test_a_value_given_twice_is_one_point(merges):
    """hp69b c32: the API's tune merged density 0.5 twice and scored lam 1 twice where the CLI (parse_grid) keeps each
    value once; 1 and 1.0 are one value."""
    base, models = _states()
    scored = []
    result = tune(base, models, "ties", lambda s: scored.append(1) or 0.0,
                  grid={"density": [0.5, 0.5], "lam": [1, 1.0]})
    assert len(merges) == 1 and len(scored) == 1 and [p.lam for p in result.points] == [1.0]


def test_grid_without_lam_raises(merges):
    base, models = _states()
    with pytest.raises(ConfigError, match="lam"):
        tune(base, models, "ties", lambda s: 0.0, grid={"density": (0.1, 0.2)})
    assert merges == []


def test_invalid_grid_value_fails_before_any_merge(merges):
    base, models = _states()
    calls = []
    with pytest.raises(ConfigError, match="density"):
        tune(base, models, "ties", lambda s: calls.append(1) or 0.0, grid={"density": (0.1, 1.5), "lam": (1.0,)})
    assert merges == [] and calls == []
    with pytest.raises(ConfigError):
        tune(base, models, "ties", lambda s: 0.0, grid={"density": (0.1,), "lam": (1.0,)}, fixed={"desnity": 0.2})
    assert merges == []
    with pytest.raises(ConfigError):
        tune(base, models, "average", lambda s: 0.0)  # no paper grid for it
