"""What a method is (methods/base.py): options checked when a method is built, and per-model
options checked against the number of models."""

from __future__ import annotations

from typing import Any

import pytest

from helpers_merge import grid_family, run
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Average, DareLinear, DareTies, MagnitudePrune, Ties


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
