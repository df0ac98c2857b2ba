"""The search space from a method's option fields (tuning/space.py) and the strategies that walk it
(tuning/strategies.py): ranges, grids, unit-cube mapping, seeded proposals, CMA-ES convergence."""

from __future__ import annotations

import pytest

from tiesmerge.errors import ConfigError
from tiesmerge.tuning import build_space, parse_ranges
from tiesmerge.tuning.space import parse_fixed
from tiesmerge.tuning.strategies import CmaesStrategy, GridStrategy, RandomStrategy, make_strategy


def test_default_space_is_the_paper_grid():
    space = build_space("ties", 3)
    assert [a.name for a in space.axes] == ["density", "lam"]
    density, lam = space.axes
    assert density.values == (0.1, 0.2, 0.3) and (density.low, density.high) == (0.1, 0.3)
    assert (lam.low, lam.high) == (0.8, 3.0) and len(lam.values) == 23
    grid = space.grid()
    assert len(grid) == 69 and grid[0] == {"density": 0.1, "lam": 0.8} and grid[1] == {"density": 0.1, "lam": 0.9}


def test_per_model_axes_and_their_default_ranges():
    space = build_space("ties", 3, axes=("densities", "weights", "lam"), ranges={"lam": (0.5, 2.0)},
                        fixed={"scope": "per_tensor"})
    densities, weights, lam = space.axes
    assert (densities.per_model, densities.low, densities.high) == (3, 0.05, 1.0)  # a fraction kept
    assert (weights.per_model, weights.low, weights.high) == (3, 0.1, 1.0)
    assert (lam.low, lam.high) == (0.5, 2.0)
    assert space.dimension == 7
    options = space.from_unit([0.0, 0.5, 1.0, 0.0, 1.0, 0.5, 1.0])
    assert options == {"scope": "per_tensor", "densities": (0.05, 0.525, 1.0), "weights": (0.1, 1.0, 0.55),
                       "lam": 2.0}
    assert space.to_unit(options) == pytest.approx([0.0, 0.5, 1.0, 0.0, 1.0, 0.5, 1.0])
    assert space.from_unit([-3.0] * 7)["lam"] == 0.5  # clipped into the range
    with pytest.raises(ConfigError, match="grid strategy needs values for densities"):
        space.grid()


def test_bad_axes_are_reported_together():
    with pytest.raises(ConfigError) as info:
        build_space("ties", 2, axes=("elect", "lam", "lam", "density"), fixed={"density": 0.2},
                    ranges={"nope": (0.0, 1.0)})
    text = str(info.value)
    assert "'elect'" in text and "'nope'" in text and "both searched and fixed" in text and "named twice" in text
    with pytest.raises(ConfigError, match="--range alpha"):
        build_space("regmean", 2, axes=("alpha",), grid={})  # no grid, no range, no default range
    # one grid value: the axis holds it (the grid strategy scores it; random and CMA-ES sample only it)
    (axis,) = build_space("task_arithmetic", 2, axes=("lam",), grid={"lam": (1.0,)}).axes
    assert (axis.low, axis.high, axis.values) == (1.0, 1.0, (1.0,))
    with pytest.raises(ConfigError, match="LO < HI"):
        parse_ranges(["lam=2:1"])
    assert parse_ranges(["lam=0.5:2"]) == {"lam": (0.5, 2.0)}


def test_parse_fixed_takes_each_options_type():
    assert parse_fixed("ties", ["scope=per_tensor", "density=0.3", "weights=1,0.5"]) == {
        "scope": "per_tensor", "density": 0.3, "weights": (1.0, 0.5)}
    with pytest.raises(ConfigError, match="no option 'nope'"):
        parse_fixed("ties", ["nope=1"])
    with pytest.raises(ConfigError, match="not a valid float"):
        parse_fixed("ties", ["density=high"])


def test_random_is_seeded_and_a_longer_budget_extends_it():
    space = build_space("ties", 2, axes=("densities", "lam"))
    a = RandomStrategy(space, 10, seed=3).ask()
    assert a == RandomStrategy(space, 10, seed=3).ask() and len(a) == 10
    assert a != RandomStrategy(space, 10, seed=4).ask()
    assert RandomStrategy(space, 15, seed=3).ask()[:10] == a  # resuming with a larger budget goes on
    batched = RandomStrategy(space, 10, seed=3, batch=4)
    got = []
    while batch := batched.ask():
        got += batch
    assert got == a


def test_grid_takes_the_budget_from_the_front():
    space = build_space("ties", 2)
    assert GridStrategy(space, 5).ask() == space.grid()[:5]
    assert make_strategy("grid", space, budget=None).ask() == space.grid()


def test_cmaes_finds_a_quadratic_peak_within_the_budget():
    space = build_space("ties", 2, axes=("densities", "lam"))
    target = {"densities": (0.3, 0.7), "lam": 1.9}

    def score(o):
        return -sum((a - b) ** 2 for a, b in zip(space.to_unit(o), space.to_unit(target)))

    es = CmaesStrategy(space, 200, seed=1, start={"lam": 1.0})
    best = -1e9
    while batch := es.ask():
        scores = [score(o) for o in batch]
        best = max(best, *scores)
        es.tell(batch, scores)
    assert best > -1e-3
    again = CmaesStrategy(space, 200, seed=1, start={"lam": 1.0})
    assert again.ask() == CmaesStrategy(space, 200, seed=1, start={"lam": 1.0}).ask()  # seeded


def test_cmaes_needs_two_dimensions_and_a_budget():
    with pytest.raises(ConfigError, match="2 or more dimensions"):
        make_strategy("cmaes", build_space("task_arithmetic", 2), budget=10)
    with pytest.raises(ConfigError, match="budget"):
        make_strategy("random", build_space("ties", 2), budget=None)
    with pytest.raises(ConfigError, match="unknown strategy"):
        make_strategy("anneal", build_space("ties", 2), budget=3)


@pytest.mark.parametrize("ranges, fixed, axes", [
    ({"weights": (0.45, 0.7)}, {"base_weight": -1.0}, ["weights"]),  # hp19 F1: the total over the box is -0.1:0.4
    ({"weights": (0.1, 1.0)}, {"base_weight": -1.0}, ["weights"]),  # hp19 N1: a 529x extrapolation reported "best"
    ({"weights": (0.1, 1.0), "base_weight": (-1.5, -0.5)}, {}, ["weights", "base_weight"]),
])
def test_weights_whose_total_with_base_weight_crosses_0_are_refused_up_front(ranges, fixed, axes):
    """No corner of the weights' own range is refused, but with base_weight the total crosses 0 inside the box: an
    adaptive search (CMA-ES) walked into the cancelling candidates and stopped mid-search, again on every resume."""
    with pytest.raises(ConfigError, match=r"their total ranges over .* which crosses 0") as err:
        build_space("average", 2, axes=axes, ranges=ranges, fixed=fixed)
    assert "narrow --range weights (or change base_weight)" in str(err.value)


def test_weights_whose_total_with_base_weight_keeps_one_sign_are_searched():
    space = build_space("average", 2, axes=["weights"], ranges={"weights": (0.6, 1.0)}, fixed={"base_weight": -1.0})
    assert [a.name for a in space.axes] == ["weights"]
    space = build_space("average", 2, axes=["weights", "base_weight"],
                        ranges={"weights": (0.1, 1.0), "base_weight": (-3.0, -2.5)})
    assert [a.name for a in space.axes] == ["weights", "base_weight"]


def test_a_corner_where_every_model_takes_the_same_end_is_checked_too():
    """A range of one sign whose all-low corner nearly cancels the fixed base_weight (total 1e-4 there)."""
    with pytest.raises(ConfigError, match=r"comes within 0.0001 of 0 at a corner of the box"):
        build_space("average", 2, axes=["weights"], ranges={"weights": (0.5, 0.6)}, fixed={"base_weight": -0.9999})


def test_base_weight_searched_beside_fixed_weights_whose_total_crosses_0_is_refused_up_front():
    """hp19 N8: refused only once random's candidates were drawn (two of 400 cancelling), with a generic hint."""
    with pytest.raises(ConfigError, match=r"--range base_weight \(or change weights\) so the total keeps one sign"):
        build_space("average", 2, axes=["base_weight"], ranges={"base_weight": (-1.5, -0.5)},
                    fixed={"weights": (0.5, 0.5)})
    assert build_space("average", 2, axes=["base_weight"], ranges={"base_weight": (-0.5, 2.0)},
                       fixed={"weights": (0.5, 0.5)}).axes[0].name == "base_weight"


def test_a_box_whose_total_nearly_reaches_0_at_a_corner_is_refused_up_front():
    """hp20 F4: base_weight -1.99999:-1.5 beside weights 1:1.1 never crosses 0, but its corner sums to 1e-5 (weights
    normalised past ±1000 there): CMA-ES stopped at such a candidate, again on every resume."""
    with pytest.raises(ConfigError, match=r"comes within 1e-05 of 0 at a corner of the box"):
        build_space("average", 2, axes=["weights", "base_weight"],
                    ranges={"weights": (1.0, 1.1), "base_weight": (-1.99999, -1.5)})
    with pytest.raises(ConfigError, match=r"with weights=0.5,0.5: their total comes within 1e-05 of 0"):
        build_space("average", 2, axes=["base_weight"], ranges={"base_weight": (-0.99999, -0.5)},
                    fixed={"weights": (0.5, 0.5)})
