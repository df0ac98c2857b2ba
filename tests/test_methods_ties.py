"""TIES (methods/ties.py) through the public API against the float64 reference of helpers_merge,
hand-made cases of each step, and a sign vector taken from a reference model (sign_from)."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from helpers_ckpt import sign_family
from helpers_merge import FAMILIES, State, assert_matches, grid_family, ref_ties, run
from tiesmerge.methods import Ties


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("elect", ["mass", "count"])
@pytest.mark.parametrize("zero_sign", ["zero", "positive", "majority"])
@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
def test_ties_matches_reference(family: str, scope: str, elect: str, zero_sign: str, aggregate: str) -> None:
    base, models = FAMILIES[family]()
    opts = dict(density=0.3, lam=1.3, scope=scope, elect=elect, zero_sign=zero_sign, aggregate=aggregate)
    assert_matches(run(base, models, "ties", **opts), ref_ties(base, models, **opts))


@pytest.mark.parametrize("weights", [(2.0, 0.5, 1.5), (1.0, 0.0, 3.0)])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("elect", ["mass", "count"])
@pytest.mark.parametrize("zero_sign", ["zero", "majority"])
@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
def test_ties_weighted_matches_reference(weights: tuple[float, ...], scope: str, elect: str, zero_sign: str,
                                         aggregate: str) -> None:
    base, models = grid_family(4, 3)
    opts = dict(density=0.5, lam=0.9, scope=scope, elect=elect, zero_sign=zero_sign, aggregate=aggregate,
                weights=weights)
    assert_matches(run(base, models, Ties(**opts)), ref_ties(base, models, **opts))


@pytest.mark.parametrize("density", [0.01, 0.1, 0.2, 0.29, 0.5, 0.99, 1.0])
@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_ties_density_sweep(density: float, scope: str) -> None:
    base, models = grid_family(5, 4)
    assert_matches(run(base, models, "ties", density=density, scope=scope),
                   ref_ties(base, models, density=density, scope=scope))


def test_ties_defaults_are_the_papers() -> None:
    m = Ties()
    assert (m.density, m.lam, m.scope, m.elect, m.zero_sign, m.aggregate) == (
        0.2, 1.0, "global", "mass", "zero", "mean")
    base, models = grid_family(6, 3, coarse=False)
    assert_matches(run(base, models, "ties"), ref_ties(base, models))


def test_fixture_exercises_zero_votes_and_both_majorities() -> None:
    """The reference comparisons above mean something only if the zero_sign options differ."""
    base, models = grid_family(1, 3)
    outs = {zs: run(base, models, "ties", density=0.3, scope="per_tensor", elect="count", zero_sign=zs)
            for zs in ("zero", "positive", "majority")}
    differs = lambda a, b: any(not torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert differs(outs["zero"], outs["positive"])
    assert differs(outs["zero"], outs["majority"])
    assert differs(outs["positive"], outs["majority"])  # "weight" has majority -1 per tensor


# --------------------------------------------------------------------------------------------- hand-made cases


def _one_tensor(base_values: list[float], *model_values: list[float]) -> tuple[State, list[State]]:
    base = {"w": torch.tensor(base_values, dtype=torch.float64)}
    return base, [{"w": torch.tensor(v, dtype=torch.float64)} for v in model_values]


def test_ties_paper_steps_by_hand() -> None:
    base, models = _one_tensor([0, 0, 0, 0], [3, -1, 2, 0.5], [1, 2, -2, 0], [-1, 2, -1, 0])
    out = run(base, models, "ties", density=1.0)["w"]
    # e0: mass +3, agreeing {3, 1} -> 2;  e1: +3, {2, 2} -> 2;  e2: -1, {-2, -1} -> -1.5;  e3: +, {0.5}
    assert torch.equal(out, torch.tensor([2.0, 2.0, -1.5, 0.5], dtype=torch.float64))


def test_trim_keeps_every_tie_at_the_threshold() -> None:
    base, models = _one_tensor([0] * 6, [3, -2, 2, 2, -1, 0.5])
    # m = floor(0.4 * 6) = 2; the 2nd largest |tau| is 2, and all three 2s are kept
    out = run(base, models, "ties", density=0.4)["w"]
    assert torch.equal(out, torch.tensor([3, -2, 2, 2, 0, 0], dtype=torch.float64))


def test_trim_with_zero_keep_count_keeps_nothing() -> None:
    base, models = _one_tensor([1, 2, 3], [5, 6, 7])
    # floor(0.3 * 3) = 0: nothing survives, the output is the base
    out = run(base, models, "ties", density=0.3)["w"]
    assert torch.equal(out, base["w"])
    out = run(base, models, "magnitude_prune", density=0.3)["w"]
    assert torch.equal(out, base["w"])


def test_keep_count_uses_exact_density() -> None:
    # 100 distinct magnitudes: density 0.29 keeps exactly 29 (the float product is 28.99...)
    base = {"w": torch.zeros(100)}
    model = {"w": (torch.arange(100, dtype=torch.float32) + 1) * torch.tensor([1.0, -1.0]).repeat(50)}
    for density, kept in ((0.29, 29), (0.57, 57), (0.07, 7), (0.3, 30)):
        out = run(base, [model], "ties", density=density)["w"]
        assert int((out != 0).sum()) == kept, density
        assert torch.equal(out.abs().sort(descending=True).values[:kept], torch.arange(100, 100 - kept, -1).float())


def test_exact_zero_vote_elects_zero() -> None:
    base, models = _one_tensor([0, 0], [1.5, 1.0], [-1.5, 1.0])
    assert torch.equal(run(base, models, "ties", density=1.0)["w"], torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert torch.equal(run(base, models, "ties", density=1.0, zero_sign="positive")["w"],
                       torch.tensor([1.5, 1.0], dtype=torch.float64))


def test_majority_sign_is_the_sign_of_the_summed_elected_signs() -> None:
    # elected signs: e0 0 (vote tie), e1 -1, e2 -1, e3 +1 -> sum -1 -> the tie resolves to -1
    base, models = _one_tensor([0, 0, 0, 0], [2, -1, -1, 1], [-2, -1, -1, 1])
    out = run(base, models, "ties", density=1.0, zero_sign="majority")["w"]
    assert torch.equal(out, torch.tensor([-2.0, -1.0, -1.0, 1.0], dtype=torch.float64))
    # and the majority is over the whole trim scope: with a second tensor of positive signs, the
    # global majority flips to +1 while the per-tensor one stays -1
    base["v"] = torch.zeros(5, dtype=torch.float64)
    for m in models:
        m["v"] = torch.ones(5, dtype=torch.float64)
    glob = run(base, models, "ties", density=1.0, zero_sign="majority", scope="global")["w"]
    per = run(base, models, "ties", density=1.0, zero_sign="majority", scope="per_tensor")["w"]
    assert float(glob[0]) == 2.0 and float(per[0]) == -2.0


def test_global_scope_uses_one_threshold_over_all_tensors() -> None:
    # "big" has all the large task-vector entries: a global top-50% keeps all of it and none of "small"
    base = {"big": torch.zeros(4), "small": torch.zeros(2, 2)}
    model = {"big": torch.tensor([10.0, -20.0, 30.0, -40.0]), "small": torch.tensor([[1.0, -2.0], [3.0, -4.0]])}
    glob = run(base, [model], "ties", density=0.5, scope="global")
    assert torch.equal(glob["big"], model["big"]) and torch.equal(glob["small"], torch.zeros(2, 2))
    per = run(base, [model], "ties", density=0.5, scope="per_tensor")
    assert torch.equal(per["big"], torch.tensor([0.0, 0.0, 30.0, -40.0]))
    assert torch.equal(per["small"], torch.tensor([[0.0, 0.0], [3.0, -4.0]]))


def test_trimming_ranks_each_models_own_unweighted_tau() -> None:
    # model 1's entries are all tiny next to model 0's, but its own top 50% survive (not a joint
    # ranking), and its weight changes neither which entries survive nor model 0's
    base, models = _one_tensor([0, 0, 0, 0], [8, 4, 0, 0], [0, 0.375, 0.25, 0.125])
    out = run(base, models, Ties(density=0.5, weights=(1.0, 3.0)))["w"]
    # e1: weighted mean (1*4 + 3*0.375) / 4; e3: 0.125 is model 1's 3rd largest, trimmed
    assert torch.equal(out, torch.tensor([8.0, 1.28125, 0.25, 0.0], dtype=torch.float64))


def test_weighted_mean_over_agreeing_models() -> None:
    base, models = _one_tensor([0], [1.0], [4.0], [-100.0])
    # mass: 1*1 + 3*4 - 0.125*100 = 0.5 > 0 -> agreeing {1, 4}, weighted mean (1*1 + 3*4) / (1 + 3)
    out = run(base, models, Ties(density=1.0, weights=(1.0, 3.0, 0.125)))["w"]
    assert torch.equal(out, torch.tensor([3.25], dtype=torch.float64))
    out = run(base, models, Ties(density=1.0, weights=(1.0, 3.0, 0.125), aggregate="sum"))["w"]
    assert torch.equal(out, torch.tensor([13.0], dtype=torch.float64))
    out = run(base, models, Ties(density=1.0, weights=(1.0, 3.0, 0.125), aggregate="max"))["w"]
    assert torch.equal(out, torch.tensor([12.0], dtype=torch.float64))


# --------------------------------------------------------------------------------------------- sign_from


def test_sign_from_takes_the_reference_signs(tmp_path):
    base, models, ref = sign_family(tmp_path)
    elected = tiesmerge.merge(base, models, "ties", density=1.0)
    taken = tiesmerge.merge(base, models, "ties", density=1.0, sign_from=str(ref))
    # elected: w -> [-, -, +]: [-3, -2, mean(3, 1)]
    torch.testing.assert_close(elected["w"], torch.tensor([-3.0, -2.0, 2.0]))
    # the reference's signs [+, +, -]: [1, 1, nothing agrees -> 0]
    torch.testing.assert_close(taken["w"], torch.tensor([1.0, 1.0, 0.0]))
    # b: tau = [1, 0.5], [0.5, -1]; reference tau [0, -1]: sign 0 -> base, - -> -1
    torch.testing.assert_close(taken["b"], torch.tensor([1.0, 0.0]))


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_sign_from_with_per_model_densities(tmp_path, scope):
    """Per-model densities count the merged models only; the reference is streamed untrimmed."""
    base, models, ref = sign_family(tmp_path)
    both = tiesmerge.merge(base, models, "ties", densities=(1.0, 1.0), scope=scope, sign_from=str(ref))
    torch.testing.assert_close(both["w"], torch.tensor([1.0, 1.0, 0.0]))
    # model 1 keeps 1 of 5 entries (global) / 1 of 3 in w: its -3 only; model 0 keeps everything
    sparse = tiesmerge.merge(base, models, "ties", densities=(1.0, 0.2 if scope == "global" else 0.34),
                             scope=scope, sign_from=str(ref))
    torch.testing.assert_close(sparse["w"], torch.tensor([1.0, 0.0, 0.0]))
