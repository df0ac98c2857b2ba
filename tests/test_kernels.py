"""The fused CPU kernels compute exactly what the torch path computes (which the float64
reference in test_methods.py checks), for every TIES option, scope, dtype and chunking."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from tiesmerge.engine import kernels
from tiesmerge.methods import MagnitudePrune, Ties

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")


def _family(n: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"emb": (97, 24), "w": (24, 40), "b": (40,), "norm": (24,), "scalar": ()}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    base["steps"] = torch.tensor([7], dtype=torch.int64)
    models = []
    for _ in range(n):
        m = {k: (v.float() + torch.randn(v.shape, generator=g) * 0.3).to(dtype) if v.is_floating_point() else v
             for k, v in base.items()}
        # exact cancellations and exact ties, where sloppy kernels differ
        m["w"][0] = base["w"][0]
        models.append(m)
    models[0]["b"][:5] = (base["b"][:5].float() + 0.5).to(dtype)
    if n > 1:
        models[1]["b"][:5] = (base["b"][:5].float() - 0.5).to(dtype)
    return base, models


def _both(base, models, method, **kwargs):
    fused = tiesmerge.merge(base, models, method, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "available", lambda: False)
        plain = tiesmerge.merge(base, models, method, **kwargs)
    return fused, plain


@pytest.mark.parametrize("method", [
    Ties(), Ties(scope="per_tensor"), Ties(density=0.7, elect="count"), Ties(zero_sign="positive"),
    Ties(aggregate="sum", lam=1.3), Ties(aggregate="max"), Ties(weights=(0.5, 2.0, 1.0)),
    Ties(weights=(-1.0, 1.0, 0.5), scope="per_tensor"), Ties(density=1.0), Ties(density=0.01),
    Ties(zero_sign="majority"), MagnitudePrune(),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_torch_path(method, dtype):
    base, models = _family(3, dtype)
    fused, plain = _both(base, models, method)
    for name in plain:
        assert fused[name].dtype == plain[name].dtype
        assert torch.equal(fused[name], plain[name]), name


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
def test_fused_is_chunking_invariant(scope):
    base, models = _family(4, torch.bfloat16, seed=3)
    whole = tiesmerge.merge(base, models, Ties(scope=scope))
    chunked = tiesmerge.merge(base, models, Ties(scope=scope), memory_budget=2048)
    for name in whole:
        assert torch.equal(whole[name], chunked[name]), name


def test_histogram_kernel_counts_like_the_radix_select():
    from tiesmerge.engine.select import RadixSelect

    g = torch.Generator().manual_seed(1)
    base = torch.randn(50_000, generator=g)
    models = base + torch.randn(3, 50_000, generator=g) * torch.tensor([[0.1], [1.0], [0.01]])
    for keep in ([1, 20_000, 49_999], [0, 10, 50_000]):
        fused, plain = RadixSelect(keep, "cpu"), RadixSelect(keep, "cpu")
        while not plain.done:
            fused.add_counts(lambda h, s=fused: kernels.histogram_pass(base, models, s.stage, s.chosen_high, h))
            fused.end_pass()
            plain.observe(models - base)
            plain.end_pass()
        assert torch.equal(fused.thresholds(), plain.thresholds())
