"""Averaging (methods/average.py) through the public API against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from helpers_merge import assert_matches, grid_family, ref_average, run
from tiesmerge.methods import Average


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
