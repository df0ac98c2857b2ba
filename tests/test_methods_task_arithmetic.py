"""Task arithmetic (methods/task_arithmetic.py) through the public API against the float64 reference."""

from __future__ import annotations

import pytest

from helpers_merge import FAMILIES, assert_matches, grid_family, ref_linear, run
from tiesmerge.methods import TaskArithmetic


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
