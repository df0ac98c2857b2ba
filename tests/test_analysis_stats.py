"""Interference statistics (analysis/stats.py) on hand-made task vectors with answers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from tiesmerge.analysis import stats

# three task vectors of 5 entries; with thresholds 0.5 every model keeps the entries marked *
#   entry:   0     1     2     3     4
#   m0:     +1*  -1*  +.5*   0    +2*
#   m1:     -1*  -1*    0   +3*   .1
#   m2:     +1*  +1*    0   -3*    0
HAND_TAU = torch.tensor([[1.0, -1.0, 0.5, 0.0, 2.0],
                         [-1.0, -1.0, 0.0, 3.0, 0.1],
                         [1.0, 1.0, 0.0, -3.0, 0.0]])


HAND_THRESHOLDS = torch.tensor([0.5, 0.5, 0.5])


def _hand_patterns() -> torch.Tensor:
    kept = stats.kept_mask(HAND_TAU, HAND_THRESHOLDS)
    return torch.bincount(stats.sign_pattern_codes(HAND_TAU, kept), minlength=27)


@pytest.mark.parametrize(("subset", "expected"), [
    ((0, 1, 2), {"conflicts": 3, "kept_by_two_or_more": 3, "kept_by_any": 5}),  # entries 0, 1, 3
    ((0, 1), {"conflicts": 1, "kept_by_two_or_more": 2, "kept_by_any": 5}),  # entry 0 (+ vs -)
    ((0, 2), {"conflicts": 1, "kept_by_two_or_more": 2, "kept_by_any": 5}),  # entry 1 (- vs +)
    ((1, 2), {"conflicts": 3, "kept_by_two_or_more": 3, "kept_by_any": 3}),  # entries 0, 1, 3
])
def test_subset_conflicts_by_hand(subset, expected):
    counts = _hand_patterns().numpy()
    assert stats.subset_conflicts(counts, stats.pattern_tables(3), subset) == expected


def test_tensor_conflicts_and_overlap_by_hand():
    kept = stats.kept_mask(HAND_TAU, HAND_THRESHOLDS)
    assert kept.tolist() == [[True, True, True, False, True], [True, True, False, True, False],
                             [True, True, False, True, False]]
    codes, tables = stats.sign_pattern_codes(HAND_TAU, kept), stats.pattern_tables(3)
    assert codes.tolist() == [1 + 2 * 3 + 1 * 9, 2 + 2 * 3 + 1 * 9, 1, 1 * 3 + 2 * 9, 1]
    assert stats.tensor_conflicts(torch.bincount(codes, minlength=27), tables) == {"conflicts": 3,
                                                                                    "kept_by_two_or_more": 3}
    assert stats.mask_intersections(kept).tolist() == [[4, 2, 2], [2, 3, 3], [2, 3, 3]]
    assert stats.influence_groups(codes, tables).tolist() == [2, 2, 1, 2, 1]
    assert stats.agreement_groups(HAND_TAU).tolist() == [2, 2, 1, 1, 2]  # entry 3: one +, one -, one 0


def test_merge_variants_by_hand():
    kept = stats.kept_mask(HAND_TAU, HAND_THRESHOLDS)
    v = stats.merge_variants(HAND_TAU.clone(), kept)
    assert all(x.dtype == torch.float64 for x in v.values())  # the means in float64 since hp39 C32
    v = {k: x.float() for k, x in v.items()}
    torch.testing.assert_close(v["averaging"], torch.tensor([1 / 3, -1 / 3, 0.5 / 3, 0.0, 2.1 / 3]))
    # kept values whatever their sign: entry 0 (1 - 1 + 1) / 3; entry 4 only m0's 2
    torch.testing.assert_close(v["trim + disjoint mean"], torch.tensor([1 / 3, -1 / 3, 0.5, 0.0, 2.0]))
    # untrimmed election: entry 4 elects + and averages 2 and 0.1; entry 3 is a tie (0): nothing
    torch.testing.assert_close(v["elect + disjoint mean"], torch.tensor([1.0, -1.0, 0.5, 0.0, 1.05]))
    torch.testing.assert_close(v["TIES"], torch.tensor([1.0, -1.0, 0.5, 0.0, 2.0]))


def test_topk_mass_share_matches_exact_sums():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(2, 5000, generator=g) * torch.rand(2, 5000, generator=g)
    counts = stats.magnitude_counts(tau)[0].numpy()
    mid = stats.bin_midpoints()
    assert counts.sum() == 5000
    for keep in (1, 50, 1000, 5000):
        top = tau[0].abs().double().sort(descending=True).values
        for power in (1, 2):
            exact = float(top[:keep].pow(power).sum() / top.pow(power).sum())
            approx = stats.topk_mass_share(counts, counts * mid**power, keep)
            assert approx == pytest.approx(exact, rel=1e-2 * power, abs=1e-3)


def test_bin_midpoints_hold_their_values():
    mid = stats.bin_midpoints()
    values = torch.tensor([1e-8, 3e-4, 0.5, 1.0, 5.0, 1e6])
    bins = (values.view(torch.int32) >> 16).numpy()
    relative = abs(mid[bins] - values.double().numpy()) / values.double().numpy()
    assert (relative <= 2**-8).all()  # half a bin's relative width
    assert mid[0x7F80:].max() == 0.0  # Inf and NaN bit patterns weigh nothing
