"""RadixSelect (engine/select.py): the exact streaming m-th largest |tau| per model, against a sort."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tiesmerge.engine.select import RadixSelect, kth_largest


def expected_thresholds(values: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """(n, d) -> (n,): the keep[t]-th largest |values[t]| (via kthvalue), +inf for keep 0."""
    mags = values.reshape(values.shape[0], -1).abs()
    d = mags.shape[1]
    out = [math.inf if k == 0 else float(mags[t].kthvalue(d - k + 1).values) for t, k in enumerate(keep)]
    return torch.tensor(out, dtype=torch.float32)


def radix(values: torch.Tensor, keep: list[int], splits: list[int] | None = None) -> tuple[torch.Tensor, int]:
    """Thresholds from RadixSelect fed ``values`` (n, d) in column chunks of the given sizes; and the pass count."""
    n, d = values.shape
    sizes = splits if splits is not None else [d]
    assert sum(sizes) == d
    sel = RadixSelect(keep, "cpu")
    passes = 0
    while not sel.done:
        start = 0
        for size in sizes:
            sel.observe(values[:, start:start + size])
            start += size
        sel.end_pass()
        passes += 1
    return sel.thresholds(), passes


def assert_thresholds(values: torch.Tensor, keep: list[int], splits: list[int] | None = None) -> None:
    got, passes = radix(values, keep, splits)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected_thresholds(values, keep)), (got, expected_thresholds(values, keep))
    assert passes <= 2


def test_docstring_example() -> None:
    assert_thresholds(torch.tensor([[0.5, -3.0, 2.0, 1.0]]), [2])


@pytest.mark.parametrize("seed", range(5))
def test_random_gaussian_every_keep(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(3, 257, generator=g) * torch.tensor([[1.0], [1e-3], [1e4]])
    for keep in (1, 2, 17, 128, 256, 257):
        assert_thresholds(values, [keep, keep, keep])
    assert_thresholds(values, [1, 100, 257])


def test_many_ties() -> None:
    g = torch.Generator().manual_seed(0)
    values = (torch.randint(-4, 5, (2, 1000), generator=g).float() / 4)  # 9 values, lots of ties, zeros
    for keep in (1, 50, 333, 500, 777, 999, 1000):
        assert_thresholds(values, [keep, 1000 - keep + 1])


def test_mostly_zeros_and_negative_zero() -> None:
    values = torch.zeros(2, 100)
    values[0, :3] = torch.tensor([2.0, -1.0, 0.5])
    values[1] = -0.0
    values[1, 10] = -7.0
    for keep in (1, 3, 4, 50, 100):
        assert_thresholds(values, [keep, keep])
    got, _ = radix(values, [50, 50])
    assert float(got[0]) == 0.0 and float(got[1]) == 0.0  # threshold 0: every entry is kept


def test_keep_zero_gives_inf_and_no_passes() -> None:
    values = torch.randn(2, 10)
    got, passes = radix(values, [0, 0])
    assert passes == 0 and bool(torch.isinf(got).all())


def test_mixed_keep_zero_and_all() -> None:
    g = torch.Generator().manual_seed(3)
    values = torch.randn(4, 64, generator=g)
    assert_thresholds(values, [0, 64, 1, 0])
    got, _ = radix(values, [0, 64, 1, 0])
    assert float(got[1]) == float(values[1].abs().min())
    assert float(got[2]) == float(values[2].abs().max())


def test_uneven_chunks_give_the_same_answer() -> None:
    g = torch.Generator().manual_seed(4)
    values = torch.randn(3, 300, generator=g) ** 3  # heavy tails: many exponents
    keep = [1, 150, 299]
    for splits in ([300], [1, 299], [100, 100, 100], [7, 0, 13, 280], [1] * 300):
        assert_thresholds(values, keep, splits)


def test_extreme_magnitudes_subnormals_and_huge() -> None:
    tiny = torch.finfo(torch.float32).tiny
    values = torch.tensor([[tiny / 8, tiny / 4, tiny, 1e-30, 1.0, 3e38, -3e38, 1e38]])
    for keep in range(1, 9):
        assert_thresholds(values, [keep])


def test_values_sharing_the_high_16_bits() -> None:
    # all entries in one high-16-bit bin: the second pass alone must rank them
    base = torch.tensor(1.0).view(torch.int32)
    bits = base + torch.arange(0, 200, 3, dtype=torch.int32)
    values = bits.view(torch.float32).view(1, -1)
    for keep in (1, 2, 30, values.shape[1]):
        assert_thresholds(values, [keep])


def test_higher_dimensional_chunks_are_flattened_per_model() -> None:
    g = torch.Generator().manual_seed(5)
    values = torch.randn(2, 4, 5, 6, generator=g)
    sel = RadixSelect([13, 60], "cpu")
    while not sel.done:
        sel.observe(values[:, :1])
        sel.observe(values[:, 1:])
        sel.end_pass()
    assert torch.equal(sel.thresholds(), expected_thresholds(values, [13, 60]))


def test_thresholds_before_the_passes_raise() -> None:
    sel = RadixSelect([1], "cpu")
    with pytest.raises(RuntimeError):
        sel.thresholds()


def test_kth_largest() -> None:
    x = torch.tensor([0.5, 3.0, 2.0, 2.0, 1.0])
    assert float(kth_largest(x, 1)) == 3.0
    assert float(kth_largest(x, 2)) == 2.0
    assert float(kth_largest(x, 3)) == 2.0
    assert float(kth_largest(x, 5)) == 0.5
    assert math.isinf(float(kth_largest(x, 0)))


@settings(max_examples=50, deadline=None)
@given(
    data=st.lists(
        st.floats(allow_nan=False, allow_infinity=False, width=32),
        min_size=1, max_size=60,
    ),
    keep_frac=st.floats(0, 1),
    cuts=st.lists(st.integers(0, 60), max_size=4),
)
def test_property_matches_sort(data: list[float], keep_frac: float, cuts: list[int]) -> None:
    values = torch.tensor([data, [-v for v in reversed(data)]], dtype=torch.float32)
    d = len(data)
    keep = int(keep_frac * d)
    points = sorted({min(c, d) for c in cuts} | {0, d})
    splits = [b - a for a, b in zip(points, points[1:], strict=False)]
    assert_thresholds(values, [keep, max(0, d - keep)], splits)


def test_blocks_inside_a_chunk_give_the_same_threshold(monkeypatch):
    from tiesmerge.engine import select as select_module

    x = torch.randn(3, 5000, generator=torch.Generator().manual_seed(7))
    keep = [1, 1000, 4999]

    def run() -> torch.Tensor:
        sel = select_module.RadixSelect(keep, "cpu")
        while not sel.done:
            sel.observe(x)
            sel.end_pass()
        return sel.thresholds()

    whole = run()
    monkeypatch.setattr(select_module, "_BLOCK", 333)  # many uneven blocks per chunk
    assert torch.equal(run(), whole)
    assert torch.equal(whole, torch.stack([x[t].abs().kthvalue(5000 - k + 1).values for t, k in enumerate(keep)]))
