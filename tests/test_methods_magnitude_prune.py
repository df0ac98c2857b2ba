"""Magnitude pruning (methods/magnitude_prune.py) through the public API against the float64 reference."""

from __future__ import annotations

import pytest

from helpers_merge import assert_matches, grid_family, ref_linear, run
from tiesmerge.methods import MagnitudePrune


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("weights", [None, (2.0, 0.5, 1.5)])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_magnitude_prune_matches_reference(scope: str, weights: tuple[float, ...] | None, density: float) -> None:
    base, models = grid_family(10, 3)
    method = MagnitudePrune(density=density, lam=1.5, scope=scope, weights=weights)
    assert_matches(run(base, models, method),
                   ref_linear(base, models, lam=1.5, weights=weights, density=density, scope=scope))
