"""The SVD methods on CUDA: the same merge as on the CPU (the SVDs run on the device, LAPACK vs
cuSOLVER, so to float32 SVD accuracy), the randomized SVD seeded on the device, and the analysis
with a compared method. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from helpers_svd import svd_family

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("method, opts", [("tsv_m", {}), ("tsv_m", {"randomized_above": 100, "seed": 3}),
                                          ("iso_c", {}), ("iso_cts", {}), ("iso_cts", {"svd_precision": "float64"})])
def test_cuda_matches_cpu(method, opts):
    base, models = svd_family(3, seed=21)
    cpu = tiesmerge.merge(base, models, method, **opts)
    gpu = tiesmerge.merge(base, models, method, device="cuda", **opts)
    for name in cpu:
        if cpu[name].is_floating_point():
            delta = (cpu[name] - base[name]).double()
            err = float((gpu[name].double() - cpu[name].double()).norm() / delta.norm().clamp_min(1e-12))
            assert err < (2e-3 if opts.get("randomized_above") else 1e-4), (name, err)
        else:
            assert torch.equal(gpu[name], cpu[name])
    again = tiesmerge.merge(base, models, method, device="cuda", **opts)
    assert all(torch.equal(again[k], gpu[k]) for k in gpu)


def test_cuda_analysis_compares_an_svd_method():
    base, models = svd_family(3, seed=22)
    cpu = tiesmerge.analyze(base, models, methods=["iso_c"])
    gpu = tiesmerge.analyze(base, models, methods=["iso_c"], device="cuda")
    for key in ("by_influence", "by_agreement"):
        torch.testing.assert_close(torch.tensor(gpu["magnitudes"][key]["mean"]["iso_c"]),
                                   torch.tensor(cpu["magnitudes"][key]["mean"]["iso_c"]), rtol=1e-4, atol=1e-7)
