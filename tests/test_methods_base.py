"""What a method is (methods/base.py): options normalised and checked when a method is built,
every problem at once; option types from annotations; paper grids and steps; requirements that
contradict themselves; per-model options and fixed model counts against the number of models."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Optional

import pytest

from helpers_merge import grid_family, run
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Average, DareLinear, DareTies, MagnitudePrune, Ties
from tiesmerge.methods.base import (
    Cut,
    ModelPath,
    Reduction,
    Requirements,
    TopK,
    check_models,
    finite,
    fraction,
    method_config,
    non_negative_int,
    nonzero_sum,
    option,
    option_types,
    paper_grid,
    positive,
    probability,
    steps,
    unit_interval,
)


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


# ---------------------------------------------------------------------------------------------- throwaway methods


@method_config
class Toy:
    """A method with an option of every kind; ``flag`` asks for exact k without a per-tensor scope."""

    name: ClassVar[str] = "toy"
    paper: ClassVar[str] = "https://example.org/toy"
    summary: ClassVar[str] = "a method for the tests"

    rate: float = option(0.5, "a fraction", check=fraction, grid=(0.1, 0.2))
    scale: float = option(1.0, "any finite number")
    count: int = option(3, "an integer", grid=[1, 2])
    mode: str = option("a", "a choice", choices=("a", "b"))
    label: str = option("x", "free text")
    flag: bool = option(False, "a switch")
    model: ModelPath | None = option(None, "a model directory")
    weights: tuple[float, ...] | None = option(None, "one per model", per_model=True, check_all=nonzero_sum)
    rates: tuple[float, ...] | None = option(None, "one fraction per model", check=fraction, per_model=True)

    def requirements(self) -> Requirements:
        return Requirements(trim=TopK(self.rate), exact_k=self.flag, weights=self.weights)

    def merge(self, tau, ctx):
        return tau.sum(0)


@method_config
class Pair:
    name: ClassVar[str] = "pair"
    paper: ClassVar[str] = "https://example.org/pair"
    summary: ClassVar[str] = "merges exactly two models"

    weights: tuple[float, ...] | None = option(None, "one per model", per_model=True)

    def requirements(self) -> Requirements:
        return Requirements(n_models=2, weights=self.weights)

    def merge(self, tau, ctx):
        return tau.sum(0)


@method_config
class Single:
    name: ClassVar[str] = "single"
    paper: ClassVar[str] = "https://example.org/single"
    summary: ClassVar[str] = "takes one model"

    def requirements(self) -> Requirements:
        return Requirements(n_models=1)

    def merge(self, tau, ctx):
        return tau[0]


# ---------------------------------------------------------------------------------------------- check_options


def test_every_option_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        Toy(rate=20, scale=float("inf"), count=1.5, mode="c", label=3, flag="yes", model="", weights=(1.0, -1.0),
            rates=(0.5, 0.0))
    assert info.value.problems == [
        "toy: rate must be a fraction in (0, 1] (it is a fraction, not a percent), got 20",
        "toy: scale must be a finite number, got inf",
        "toy: count must be an integer, got 1.5",
        "toy: mode='c' is not one of a, b",
        "toy: label must be a string, got 3",
        "toy: flag must be true or false, got 'yes'",
        "toy: model must be the path of a model directory, got ''",
        "toy: weights must not sum to 0, got [1.0, -1.0]",
        "toy: rates must be a fraction in (0, 1], got 0.0 in [0.5, 0.0]",
    ]


def test_lists_become_tuples_and_paths_strings() -> None:
    toy = Toy(weights=[1.0, 2.0], rates=[0.5, 1], model=Path("some") / "model")
    assert toy.weights == (1.0, 2.0) and toy.rates == (0.5, 1)
    assert toy.model == str(Path("some") / "model") and type(toy.model) is str
    assert toy == Toy(weights=(1.0, 2.0), rates=(0.5, 1), model=str(Path("some") / "model"))
    assert hash(toy) == hash(Toy(weights=(1.0, 2.0), rates=(0.5, 1), model=str(Path("some") / "model")))


def test_nan_and_booleans_are_not_numbers() -> None:
    for value in (float("nan"), True):
        with pytest.raises(ConfigError, match="scale must be a finite number"):
            Toy(scale=value)
    with pytest.raises(ConfigError, match=r"weights must be a finite number, got nan in \[1.0, nan\]"):
        Toy(weights=(1.0, float("nan")))
    with pytest.raises(ConfigError, match="count must be an integer, got True"):
        Toy(count=True)


def test_per_model_options_take_a_non_empty_list() -> None:
    for value in ((), 0.5, "0.5,0.5"):
        with pytest.raises(ConfigError, match="rates must be a list with one value per model"):
            Toy(rates=value)


def test_unset_options_and_choices_pass() -> None:
    toy = Toy(mode="b", model=None, weights=None)
    assert (toy.mode, toy.model, toy.weights) == ("b", None, None)


def test_requirements_are_checked_once_the_options_pass() -> None:
    with pytest.raises(ConfigError) as info:
        Toy(flag=True)
    assert info.value.problems == ["toy: exact k (threshold_ties='sort', mergekit's trim) needs a trim and "
                                   "scope='per_tensor'"]
    with pytest.raises(ConfigError) as info:
        Toy(flag=True, rate=2.0)  # requirements built from a bad rate would mean nothing: not asked
    assert len(info.value.problems) == 1 and "rate must be a fraction" in info.value.problems[0]


def test_a_finite_option_fits_float32_where_every_merge_computes() -> None:
    assert finite(1e300) == finite(-1e39) == "must be at most 3.4e38 in magnitude (merges compute in float32)"


@pytest.mark.parametrize(
    ("check", "good", "bad", "message"),
    [
        (finite, [0, -3.5, 3.4e38], [float("inf"), float("nan"), "1", None, False], "must be a finite number"),
        (positive, [1e-9, 2], [0, -1, float("inf"), True], "must be a positive, finite number"),
        (fraction, [1e-9, 0.5, 1], [0, -0.1, 1.5, True], "must be a fraction in (0, 1]"),
        (probability, [0, 0.5, 0.999], [1, -0.1, float("nan")], "must be a fraction in [0, 1)"),
        (unit_interval, [0, 0.5, 1], [1.01, -0.01, None], "must be a number in [0, 1]"),
        (non_negative_int, [0, 7], [-1, 1.0, True], "must be a non-negative integer"),
    ],
)
def test_value_checks(check, good, bad, message) -> None:
    assert [check(v) for v in good] == [None] * len(good)
    for value in bad:
        assert check(value) is not None and check(value).startswith(message), value
    assert "not a percent" in fraction(20) and "not a percent" not in fraction(-1)
    assert nonzero_sum((1.0, -1.0)) == "must not sum to 0" and nonzero_sum((1.0, 0.0)) is None


# ---------------------------------------------------------------------------------------------- option_types


@dataclass(frozen=True)
class EveryKind:
    a: float = 0.0
    b: int = 0
    c: str = ""
    d: bool = False
    e: ModelPath = ModelPath("m")
    f: ModelPath | None = None
    g: tuple[float, ...] | None = None
    h: tuple[float, ...] = ()
    i: float | None = None
    j: Optional[int] = None  # noqa: UP045 - the typing spelling of the same annotation


@dataclass(frozen=True)
class ListOption:
    weights: list[float] | None = None


@dataclass(frozen=True)
class TwoTypes:
    value: float | int = 0


@dataclass(frozen=True)
class DictOption:
    table: dict = None  # type: ignore[assignment]


def test_option_types_of_every_annotation_kind() -> None:
    assert option_types(EveryKind) == {"a": float, "b": int, "c": str, "d": bool, "e": ModelPath, "f": ModelPath,
                                       "g": tuple, "h": tuple, "i": float, "j": int}
    assert option_types(Toy)["model"] is ModelPath and option_types(Toy)["weights"] is tuple


@pytest.mark.parametrize(("cls", "field_name"), [(ListOption, "weights"), (TwoTypes, "value"), (DictOption, "table")])
def test_option_types_refuses_other_annotations(cls: type, field_name: str) -> None:
    with pytest.raises(TypeError, match=rf"{cls.__name__}\.{field_name}: options are float, int, str, bool, ModelPath"):
        option_types(cls)


# ---------------------------------------------------------------------------------------------- paper_grid, steps


def test_paper_grid_is_the_declared_axes() -> None:
    assert paper_grid(Toy) == {"rate": (0.1, 0.2), "count": (1, 2)}  # a list given as a grid is a tuple
    assert paper_grid(Pair) == {}
    assert paper_grid(Ties) == {"density": (0.1, 0.2, 0.3), "lam": steps(0.8, 3.0, 0.1)}


def test_steps_are_inclusive_and_print_short() -> None:
    assert steps(0.8, 1.0, 0.1) == (0.8, 0.9, 1.0)
    assert steps(0.1, 0.3, 0.1) == (0.1, 0.2, 0.3)  # 0.1 + 2 * 0.1 is 0.30000000000000004 unrounded
    assert steps(2.0, 2.0, 0.5) == (2.0,)
    assert steps(1.0, 0.0, -0.25) == (1.0, 0.75, 0.5, 0.25, 0.0)
    lams = steps(0.8, 3.0, 0.1)
    assert len(lams) == 23 and max(len(repr(x)) for x in lams) == 3


# ---------------------------------------------------------------------------------------------- Requirements


def _sum(tau, ctx):
    return tau.sum()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"trim": TopK(0.2), "exact_k": True}, "needs a trim and scope='per_tensor'"),
        ({"exact_k": True, "scope": "per_tensor"}, "needs a trim and scope='per_tensor'"),
        ({"scope": "layer"}, "scope='layer' is not one of global, per_tensor"),
        ({"cuts": (Cut("outliers", TopK(0.01)),), "reductions": (Reduction("outliers", _sum),)},
         "cut and reduction names must differ"),
        ({"reductions": (Reduction("majority", _sum), Reduction("majority", _sum))}, "names must differ"),
        ({"trim": TopK(0.2), "cuts": (Cut("trim", TopK(0.01)),)}, "names must differ"),  # the trim is a cut too
    ],
)
def test_contradictory_requirements_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Requirements(**kwargs)


def test_requirements_report_every_problem_and_name_their_cuts() -> None:
    with pytest.raises(ConfigError) as info:
        Requirements(scope="layer", exact_k=True, reductions=(Reduction("s", _sum), Reduction("s", _sum)))
    assert len(info.value.problems) == 3
    exact = Requirements(trim=TopK(0.2), exact_k=True, scope="per_tensor", cuts=(Cut("outliers", TopK(0.01)),))
    assert exact.keeps_tensors_whole and [c.name for c in exact.all_cuts] == ["trim", "outliers"]
    assert not Requirements().keeps_tensors_whole and Requirements().all_cuts == ()


def test_keep_counts_per_model_and_at_least_one() -> None:
    assert TopK(0.29).keep_counts(100, 3) == [29, 29, 29]
    assert TopK(0.2, densities=(0.1, 0.5)).keep_counts(10, 2) == [1, 5]
    assert TopK(0.1).keep_counts(5, 2) == [0, 0]
    assert TopK(0.1).keep_counts(5, 2, at_least_one=True) == [1, 1]
    assert TopK(0.1).keep_counts(0, 1, at_least_one=True) == [0]  # an empty tensor keeps nothing


# ---------------------------------------------------------------------------------------------- check_models


def test_check_models() -> None:
    assert check_models(Toy(weights=(1.0, 2.0), rates=(0.5, 0.5)), 2) == []
    assert check_models(Toy(weights=(1.0, 2.0), rates=(0.5, 0.5, 0.5)), 2) == ["toy: 3 rates given for 2 models"]
    assert check_models(Toy(weights=(1.0, 2.0)), 3) == ["toy: 2 weights given for 3 models"]
    assert check_models(Pair(), 2) == []
    assert check_models(Pair(weights=(1.0, 1.0)), 3) == ["pair merges exactly 2 models, got 3",
                                                         "pair: 2 weights given for 3 models"]
    assert check_models(Single(), 2) == ["single merges exactly 1 model, got 2"]
