"""Unit tests of the named tensor operations in tiesmerge.methods.ops, against hand-computed values."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from tiesmerge.methods import ops

# ---------------------------------------------------------------------------------------------- keep_count


@pytest.mark.parametrize(
    ("numel", "density", "expected"),
    [
        (100, 0.29, 29),  # 0.29 * 100 == 28.999999999999996 in floats
        (100, 0.57, 57),  # 0.57 * 100 == 56.99999999999999
        (1000, 0.1, 100),
        (10, 0.3, 3),  # 0.3 * 10 == 3.0000000000000004: must not round up to 4 either
        (3, 0.2, 0),  # m == 0: nothing survives
        (1, 0.99, 0),
        (1, 1.0, 1),
        (7, 1.0, 7),
        (0, 0.5, 0),
        (1_000_000_007, 0.2, 200_000_001),
        (12345, 1e-9, 0),
    ],
)
def test_keep_count_exact(numel: int, density: float, expected: int) -> None:
    assert ops.keep_count(numel, density) == expected


def test_keep_count_matches_rational_floor_over_a_grid() -> None:
    # independent: floor(p/q * n) with integers only
    for density in (0.01, 0.07, 0.1, 0.15, 0.2, 0.29, 0.3, 0.33, 0.57, 0.7, 0.9, 0.99, 1.0):
        frac = Fraction(repr(density))
        for numel in (1, 2, 3, 7, 10, 99, 100, 101, 1000, 4097):
            assert ops.keep_count(numel, density) == frac.numerator * numel // frac.denominator


def test_keep_count_never_exceeds_numel() -> None:
    for numel in range(0, 50):
        assert 0 <= ops.keep_count(numel, 1.0) == numel


# ---------------------------------------------------------------------------------------------- broadcast / trim


def test_broadcast_per_model_shapes() -> None:
    w = torch.tensor([1.0, 2.0])
    assert ops.broadcast_per_model(w, torch.zeros(2)).shape == (2,)
    assert ops.broadcast_per_model(w, torch.zeros(2, 3)).shape == (2, 1)
    assert ops.broadcast_per_model(w, torch.zeros(2, 3, 4, 5)).shape == (2, 1, 1, 1)


def test_trim_at_keeps_ties_and_is_in_place() -> None:
    tau = torch.tensor([[3.0, -2.0, 2.0, 1.0, -2.0], [0.5, -0.25, 0.0, 4.0, -4.0]])
    thresholds = torch.tensor([2.0, 4.0])
    out = ops.trim_at(tau, thresholds)
    assert out.data_ptr() == tau.data_ptr()
    assert torch.equal(out, torch.tensor([[3.0, -2.0, 2.0, 0.0, -2.0], [0.0, 0.0, 0.0, 4.0, -4.0]]))


def test_trim_at_inf_keeps_nothing_zero_keeps_everything() -> None:
    tau = torch.tensor([[1.0, -5.0], [0.0, -1e-30]])
    out = ops.trim_at(tau.clone(), torch.tensor([math.inf, 0.0]))
    assert torch.equal(out, torch.tensor([[0.0, 0.0], [0.0, -1e-30]]))


# ---------------------------------------------------------------------------------------------- elect


def test_elect_mass_and_count_differ() -> None:
    # entry 0: one big positive against two small negatives
    trimmed = torch.tensor([[5.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])
    assert torch.equal(ops.elect(trimmed, None, "mass"), torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(ops.elect(trimmed, None, "count"), torch.tensor([-1.0, 0.0, 0.0]))


def test_elect_with_weights() -> None:
    trimmed = torch.tensor([[1.0, 2.0], [-1.0, -3.0]])
    w = torch.tensor([3.0, 1.0])
    # mass: 3*1 - 1 = 2 > 0; 3*2 - 3 = 3 > 0.  count: 3 - 1 > 0 for both
    assert torch.equal(ops.elect(trimmed, w, "mass"), torch.tensor([1.0, 1.0]))
    assert torch.equal(ops.elect(trimmed, torch.tensor([1.0, 3.0]), "count"), torch.tensor([-1.0, -1.0]))
    # weights that balance exactly give a zero vote
    assert torch.equal(ops.elect(trimmed, torch.tensor([1.0, 1.0]), "count"), torch.tensor([0.0, 0.0]))


def test_resolve_zero_sign() -> None:
    gamma = torch.tensor([1.0, 0.0, -1.0, 0.0])
    assert torch.equal(ops.resolve_zero_sign(gamma.clone(), "zero"), gamma)
    assert torch.equal(ops.resolve_zero_sign(gamma.clone(), "positive"), torch.tensor([1.0, 1.0, -1.0, 1.0]))
    assert torch.equal(ops.resolve_zero_sign(gamma.clone(), "majority", -1.0), torch.tensor([1.0, -1.0, -1.0, -1.0]))
    assert torch.equal(ops.resolve_zero_sign(gamma.clone(), "majority", 0.0), gamma)
    with pytest.raises(ValueError):
        ops.resolve_zero_sign(gamma.clone(), "majority", None)


# ---------------------------------------------------------------------------------------------- disjoint aggregate


def test_disjoint_aggregate_mean_sum_max() -> None:
    trimmed = torch.tensor([[2.0, 1.0, 0.0, 3.0], [4.0, -5.0, 0.0, -3.0], [0.0, 3.0, 0.0, 0.0]])
    gamma = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # entry 0: agreeing {2, 4}; entry 1: {1, 3} (not -5); entry 2: none; entry 3: gamma 0 -> none
    assert torch.equal(ops.disjoint_aggregate(trimmed, gamma, None, "mean"), torch.tensor([3.0, 2.0, 0.0, 0.0]))
    assert torch.equal(ops.disjoint_aggregate(trimmed, gamma, None, "sum"), torch.tensor([6.0, 4.0, 0.0, 0.0]))
    assert torch.equal(ops.disjoint_aggregate(trimmed, gamma, None, "max"), torch.tensor([4.0, 3.0, 0.0, 0.0]))


def test_disjoint_aggregate_weighted_mean_and_negative_gamma() -> None:
    trimmed = torch.tensor([[2.0, -1.0], [4.0, -2.0], [-8.0, 6.0]])
    w = torch.tensor([1.0, 3.0, 2.0])
    gamma = torch.tensor([1.0, -1.0])
    # entry 0: (1*2 + 3*4) / (1 + 3) = 3.5; entry 1: (1*-1 + 3*-2) / 4 = -1.75
    assert torch.allclose(ops.disjoint_aggregate(trimmed, gamma, w, "mean"), torch.tensor([3.5, -1.75]))
    assert torch.allclose(ops.disjoint_aggregate(trimmed, gamma, w, "sum"), torch.tensor([14.0, -7.0]))
    assert torch.allclose(ops.disjoint_aggregate(trimmed, gamma, w, "max"), torch.tensor([12.0, -6.0]))


def test_zeros_never_count_in_the_mean() -> None:
    trimmed = torch.tensor([[6.0], [0.0], [0.0]])
    assert torch.equal(ops.disjoint_aggregate(trimmed, torch.tensor([1.0]), None, "mean"), torch.tensor([6.0]))


# ---------------------------------------------------------------------------------------------- hash_uniform / dare


def test_hash_uniform_range_and_chunk_independence() -> None:
    whole = ops.hash_uniform(3, 17, 0, 10_000, "cpu")
    assert whole.dtype == torch.float32 and whole.shape == (10_000,)
    assert bool((whole >= 0).all()) and bool((whole < 1).all())
    for start, length in ((0, 1), (5, 100), (4321, 999), (9_999, 1)):
        assert torch.equal(ops.hash_uniform(3, 17, start, length, "cpu"), whole[start:start + length])


def test_hash_uniform_never_returns_one() -> None:
    # the raw 32-bit hash at this position is within 128 of 2^32: rounding x * 2^-32 to float32 gives 1.0
    u = ops.hash_uniform(0, 0, 9_174_107, 1, "cpu")
    assert float(u[0]) < 1.0


def test_hash_uniform_depends_on_seed_stream_and_position() -> None:
    a = ops.hash_uniform(0, 0, 0, 1000, "cpu")
    assert not torch.equal(a, ops.hash_uniform(1, 0, 0, 1000, "cpu"))
    assert not torch.equal(a, ops.hash_uniform(0, 1, 0, 1000, "cpu"))
    assert not torch.equal(a, ops.hash_uniform(0, 0, 1, 1000, "cpu"))
    assert torch.equal(a, ops.hash_uniform(0, 0, 0, 1000, "cpu"))


def test_hash_uniform_beyond_32_bit_offsets() -> None:
    # positions 2^32 apart must not repeat (tensors larger than 4G entries)
    low = ops.hash_uniform(5, 9, 123, 1000, "cpu")
    high = ops.hash_uniform(5, 9, 123 + (1 << 32), 1000, "cpu")
    assert not torch.equal(low, high)
    assert bool((high >= 0).all()) and bool((high < 1).all())


def test_hash_uniform_is_roughly_uniform() -> None:
    u = ops.hash_uniform(11, 22, 0, 200_000, "cpu").double()
    assert abs(float(u.mean()) - 0.5) < 0.005
    counts = torch.histc(u, bins=10, min=0.0, max=1.0)
    expected = 20_000.0
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 40.0  # 9 degrees of freedom: p < 1e-5 beyond this


def test_dare_drop_rescales_kept_entries() -> None:
    tau = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    uniforms = torch.tensor([[0.1, 0.5, 0.49, 0.99]])
    out = ops.dare_drop(tau.clone(), 0.5, uniforms)
    assert torch.equal(out, torch.tensor([[0.0, 4.0, 0.0, 8.0]]))
    assert torch.equal(ops.dare_drop(tau.clone(), 0.0, uniforms), tau)


def test_negative_weight_votes_and_agrees_on_the_weighted_value():
    # weights (-1, 1), tau = (+1, +0.5): the weighted values (-1, +0.5) elect -1, and model 0
    # (whose weighted value is -1) is the agreeing one; the mean divides by the sum of the
    # agreeing weights (mergekit's normalize), giving (-1 * 1) / (-1) = +1
    trimmed = torch.tensor([[1.0], [0.5]])
    weights = torch.tensor([-1.0, 1.0])
    gamma = ops.elect(trimmed, weights, "mass")
    assert gamma.tolist() == [-1.0]
    assert ops.disjoint_aggregate(trimmed, gamma, weights, "sum").tolist() == [-1.0]
    assert ops.disjoint_aggregate(trimmed, gamma, weights, "mean").tolist() == [1.0]
