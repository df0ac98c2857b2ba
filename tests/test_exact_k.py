"""mergekit's exact-k trim, replayed without a sort (engine.exactk), equals torch.argsort's choice
bit for bit: many sizes, densities and tie patterns, > 1M entries with bf16-derived ties, and a
whole mergekit ``ties`` recipe in float32 against a torch re-implementation of mergekit's merge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiesmerge
from tiesmerge.engine import exactk, kernels
from tiesmerge.methods import Ties

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


def _torch_mask(w: np.ndarray, k: int) -> np.ndarray:
    """mergekit's sparsify.magnitude choice: the first k of argsort(|w|, descending=True)."""
    mask = np.zeros(w.size, bool)
    mask[torch.argsort(torch.from_numpy(w), descending=True)[:k].numpy()] = True
    return mask


def _replayed_mask(w: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(w.size, np.uint8)
    scratch = [np.empty(w.size, np.int32) for _ in range(3)]
    exactk.keep_mask(w.astype(np.float32).copy(), scratch[0], k, mask, scratch[1], scratch[2])
    return mask.astype(bool)


def _bf16_deltas(rng: np.random.Generator, n: int, scale: float = 5e-4) -> np.ndarray:
    """|fine-tune - base| of bf16 weights: few distinct values, thousands of ties at any threshold."""
    base = torch.from_numpy(rng.standard_normal(n).astype(np.float32) * 0.02).bfloat16()
    ft = (base.float() + torch.from_numpy(rng.standard_normal(n).astype(np.float32) * scale)).bfloat16()
    return (ft.float() - base.float()).abs().numpy()


PATTERNS = {
    "continuous": lambda rng, n: np.abs(rng.standard_normal(n)).astype(np.float32),
    "rounded": lambda rng, n: np.abs(np.round(rng.standard_normal(n) * 4)).astype(np.float32),
    "three values": lambda rng, n: rng.integers(0, 3, n).astype(np.float32),
    "constant": lambda rng, n: np.full(n, 0.25, np.float32),
    "zeros and ones": lambda rng, n: (rng.random(n) < 0.1).astype(np.float32),
    "bf16 deltas": _bf16_deltas,
    "sorted": lambda rng, n: np.arange(n, dtype=np.float32) % 7,
    "descending": lambda rng, n: np.arange(n, 0, -1).astype(np.float32) // 3,
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("n", [1, 2, 3, 15, 16, 17, 18, 33, 100, 129, 1000, 4099, 65_537])
def test_replayed_selection_equals_argsort(pattern, n):
    rng = np.random.default_rng(n)
    w = PATTERNS[pattern](rng, n)
    for density in (0.0001, 0.01, 0.2, 0.3, 0.5, 0.9, 1.0):
        k = max(1, int(density * n))
        assert (_replayed_mask(w, k) == _torch_mask(w, k)).all(), (pattern, n, k)


@pytest.mark.parametrize("pattern", ["bf16 deltas", "rounded", "three values"])
def test_replayed_selection_on_a_million_entries(pattern):
    # large enough for many partition levels, heavy ties straddling the threshold
    n = 1_200_007
    w = PATTERNS[pattern](np.random.default_rng(7), n)
    for density in (0.2, 0.5):
        k = int(density * n)
        expected = _torch_mask(w, k)
        threshold = np.sort(w)[n - k]
        ties = w == threshold
        assert 0 < (expected & ties).sum() < ties.sum()  # the case the replay exists for: a split tie
        assert (_replayed_mask(w, k) == expected).all()


def test_depth_limit_heap_sort_path():
    # an adversarial order for median-of-three pivots exhausts introsort's depth: the heap sort runs
    n = 4096
    w = np.zeros(n, np.float32)
    values = np.arange(n, dtype=np.float32) // 2
    # "median-of-3 killer": pivots land near one end at every level
    order = np.empty(n, np.int64)
    half = n // 2
    order[0:half:1] = np.arange(0, n, 2)
    order[half:] = np.arange(1, n, 2)
    w[order] = values
    for k in (1, 100, 2048, 4000):
        assert (_replayed_mask(w, k) == _torch_mask(w, k)).all()


def test_exact_k_masks_read_raw_rows():
    # the kernel entry point: |tau| from bf16 rows as the torch path computes it, per model
    rng = np.random.default_rng(3)
    base = torch.from_numpy(rng.standard_normal(50_000).astype(np.float32) * 0.02).bfloat16()
    models = [(base.float() + torch.from_numpy(rng.standard_normal(50_000).astype(np.float32) * 5e-4)).bfloat16()
              for _ in range(3)]
    keep = [10_000, 15_000, 25_000]
    masks = kernels.exact_k_masks([kernels.raw_view(t) for t in [base, *models]], keep)
    reused = np.empty(kernels.exact_k_scratch_bytes(3, 50_000), np.uint8)
    reused[:] = 7  # stale bytes: the masks are zeroed before use
    assert (kernels.exact_k_masks([kernels.raw_view(t) for t in [base, *models]], keep, reused) == masks).all()
    for t, m in enumerate(models):
        tau = (m.float() - base.float()).abs().numpy()
        assert (masks[t].astype(bool) == _torch_mask(tau, keep[t])).all()
    bad = models[0].clone()
    bad[5] = float("nan")
    assert kernels.exact_k_masks([kernels.raw_view(t) for t in [base, bad]], [100]) is None


def _mergekit_ties_f32(base: dict, models: list[dict], densities, weights, normalize: bool, lam: float) -> dict:
    """mergekit 0.1.5's ties in float32, re-written here: magnitude trim (exactly k by argsort),
    sign by the weighted sum (+ on 0), agreeing weighted deltas summed, / agreeing weights."""
    out = {}
    for name, b in base.items():
        b32 = b.float()
        tvs = []
        for m, d in zip(models, densities):
            tv = m[name].float() - b32
            k = int(d * tv.numel())
            mask = torch.zeros_like(tv)
            mask.view(-1)[torch.argsort(tv.abs().view(-1), descending=True)[:k]] = 1
            tvs.append(tv * mask)
        deltas = torch.stack(tvs) * torch.tensor(weights).view(-1, *([1] * b.dim()))
        sign = (deltas.sum(dim=0) >= 0).float() * 2 - 1
        agree = deltas.sign() == sign
        merged = (deltas * agree).sum(dim=0)
        if normalize:
            divisor = (torch.tensor(weights).view(-1, *([1] * b.dim())) * agree).sum(dim=0)
            divisor[divisor == 0] = 1
            merged = merged / divisor
        out[name] = (b32 + lam * merged).bfloat16()
    return out


def test_mergekit_ties_recipe_float32_bit_identical(monkeypatch):
    calls = []
    real = kernels.exact_k_masks
    monkeypatch.setattr(kernels, "exact_k_masks", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(11)
    shapes = {"embed": (1031, 64), "q": (64, 64), "norm": (64,)}
    base = {k: (torch.randn(s, generator=g) * 0.02).bfloat16() for k, s in shapes.items()}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g) * 5e-4).bfloat16() for k, v in base.items()}
              for _ in range(3)]
    densities, weights = (0.2, 0.3, 0.5), (1.0, 0.7, 0.5)
    for normalize, lam in ((True, 1.0), (False, 1.5)):
        method = Ties(scope="per_tensor", threshold_ties="sort", densities=densities, weights=weights,
                      zero_sign="positive", aggregate="mean" if normalize else "sum", lam=lam)
        merged = tiesmerge.merge(base, models, method, dtype="bfloat16")
        expected = _mergekit_ties_f32(base, models, densities, weights, normalize, lam)
        for name in shapes:
            assert torch.equal(merged[name], expected[name]), (name, normalize)
    assert len(calls) == 2 * len(shapes)  # the fused path selected, once per tensor and merge


def test_keep_count_is_mergekits_float_product():
    # mergekit: k = max(1, int(density * numel)); 0.29 * 100 is 28.999999999999996 in float
    from tiesmerge.methods.base import TopK

    assert TopK(0.29).keep_counts(100, 1, at_least_one=True) == [28]
    assert TopK(0.29).keep_counts(100, 1) == [29]  # the paper's trim: the exact fraction
    assert TopK(0.001).keep_counts(10, 2, at_least_one=True) == [1, 1]
    assert TopK(1.0).keep_counts(7, 1, at_least_one=True) == [7]
    assert TopK(0.5).keep_counts(0, 1, at_least_one=True) == [0]


# ---------------------------------------------------------------------------------------------- Breadcrumbs' band

def _torch_band(w: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """mergekit's magnitude_outliers choice: positions lo..hi of torch.sort(|w|) ascending (stable=False)."""
    mask = np.zeros(w.size, bool)
    mask[torch.sort(torch.from_numpy(w), descending=False).indices[lo:hi].numpy()] = True
    return mask


def _replayed_band(w: np.ndarray, lo: int, hi: int) -> np.ndarray:
    mask = np.zeros(w.size, np.uint8)
    scratch = [np.empty(w.size, np.int32) for _ in range(3)]
    exactk.band_mask(-w.astype(np.float32), scratch[0], lo, hi, mask, scratch[1], scratch[2])
    return mask.astype(bool)


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("n", [1, 2, 15, 17, 33, 129, 1000, 4099, 65_537])
def test_replayed_band_equals_ascending_sort(pattern, n):
    rng = np.random.default_rng(n + 1)
    w = PATTERNS[pattern](rng, n)
    for density, gamma in ((0.3, 0.01), (0.1, 0.0), (0.5, 0.2), (0.9, 0.1), (1.0, 0.0), (0.01, 0.5), (0.2, 0.9)):
        lo, hi = tiesmerge.methods.base.Band(density, gamma).positions(n)
        assert (_replayed_band(w, lo, hi) == _torch_band(w, lo, hi)).all(), (pattern, n, density, gamma)


def test_replayed_band_on_a_million_bf16_deltas():
    n = 1_200_007
    w = PATTERNS["bf16 deltas"](np.random.default_rng(11), n)
    lo, hi = tiesmerge.methods.base.Band(0.3, 0.01).positions(n)
    expected = _torch_band(w, lo, hi)
    low_ties = w == np.sort(w)[lo]
    assert 0 < (expected & low_ties).sum() < low_ties.sum()  # the lower cut splits a run of ties
    assert (_replayed_band(w, lo, hi) == expected).all()
