"""CUDA path: same tensors as the CPU merge, for the streamed methods and the data-aware ones.
Cross-cutting (the engine on a device). Skipped without a GPU; run them on a GPU machine."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from helpers_merge import fisher_stats, gram_stats, linear_family, merge
from tiesmerge.methods import DareTies, Fisher, RegMean, TaskArithmetic, Ties

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _models(n: int = 3, dtype: torch.dtype = torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    shapes = {"emb": (257, 64), "w": (64, 96), "b": (96,), "norm": (64,)}
    base = {k: torch.randn(s, generator=g).to(dtype) for k, s in shapes.items()}
    models = [{k: (v.float() + torch.randn(v.shape, generator=g) * 0.1).to(dtype) for k, v in base.items()}
              for _ in range(n)]
    return base, models


@pytest.mark.parametrize("method", [Ties(), Ties(scope="per_tensor", zero_sign="majority"), TaskArithmetic(),
                                    DareTies(drop_rate=0.5, seed=3)])
@pytest.mark.parametrize("budget", [None, 8192])
def test_cuda_matches_cpu(method, budget):
    base, models = _models()
    cpu = tiesmerge.merge(base, models, method, memory_budget=budget)
    gpu = tiesmerge.merge(base, models, method, device="cuda", memory_budget=budget)
    for name in cpu:
        # float32 arithmetic on both; reductions may sum in another order, so allow one bf16 ulp
        torch.testing.assert_close(gpu[name].float(), cpu[name].float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("budget", [None, 8192])
def test_cuda_analysis_matches_cpu(budget):
    base, models = _models()
    cpu = tiesmerge.analyze(base, models, memory_budget=budget)
    gpu = tiesmerge.analyze(base, models, device="cuda", memory_budget=budget)
    # counts are exact on both devices; masses are float sums in another order
    assert gpu["thresholds"] == cpu["thresholds"]
    assert gpu["sign_conflicts"] == cpu["sign_conflicts"]
    assert gpu["overlap"] == cpu["overlap"]
    assert gpu["magnitudes"]["by_influence"]["count"] == cpu["magnitudes"]["by_influence"]["count"]
    for t, share in enumerate(cpu["redundancy"]["at_density"]["l1_share"]):
        assert gpu["redundancy"]["at_density"]["l1_share"][t] == pytest.approx(share, rel=1e-5)


@pytest.mark.gpu
def test_fisher_and_regmean_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    base, models = linear_family()
    grams = [gram_stats({"layer.weight": (lambda x: x.T @ x / 9)(torch.randn(9, 5))}) for _ in models]
    fishers = [fisher_stats({n: torch.rand(v.shape) for n, v in base.items()}) for _ in models]
    for method, stats in ((RegMean(), grams), (Fisher(), fishers)):
        cpu = merge(base, models, method, stats)
        gpu = merge(base, models, method, stats, device="cuda")
        for n in cpu:
            torch.testing.assert_close(gpu[n], cpu[n], rtol=1e-5, atol=1e-5)
