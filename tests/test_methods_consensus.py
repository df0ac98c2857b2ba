"""Consensus merging with TALL masks (methods/consensus.py) against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from helpers_merge import State, assert_matches, grid_family, ref_linear, run
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Consensus


def ref_consensus(base: State, models: list[State], *, k: int, lambdas: list[float], lam: float,
                  weights: tuple[float, ...] | None = None) -> State:
    """float64 entry by entry: m_t = |tau_t| > lambda_t |tau_MTL - tau_t|, keep where sum_t m_t >= k."""
    w = weights or (1.0,) * len(models)
    out: State = {}
    for name, b in base.items():
        if not b.is_floating_point():
            out[name] = b.clone()
            continue
        taus = [[w[t] * v for v in (m[name].double() - b.double()).reshape(-1).tolist()] for t, m in enumerate(models)]
        merged = []
        for i in range(b.numel()):
            mtl = sum(tau[i] for tau in taus)
            votes = sum(abs(tau[i]) > lambdas[t] * abs(mtl - tau[i]) for t, tau in enumerate(taus))
            merged.append(lam * mtl if votes >= k else 0.0)
        out[name] = (b.double() + torch.tensor(merged, dtype=torch.float64).reshape(b.shape)).to(b.dtype)
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_consensus_keeps_what_k_tasks_need(k: int) -> None:
    base, models = grid_family(41, 3, coarse=False)
    assert_matches(run(base, models, Consensus(k=k, tall_lambda=0.4, lam=0.5)),
                   ref_consensus(base, models, k=k, lambdas=[0.4] * 3, lam=0.5))


def test_per_model_lambdas_and_weights() -> None:
    base, models = grid_family(42, 3)  # coarse: ties at |tau_t| == lambda |rest| (strict >: dropped)
    method = Consensus(k=2, tall_lambdas=(0.2, 0.5, 1.0), lam=0.8, weights=(1.0, 0.5, 2.0))
    assert_matches(run(base, models, method),
                   ref_consensus(base, models, k=2, lambdas=[0.2, 0.5, 1.0], lam=0.8, weights=(1.0, 0.5, 2.0)))


def test_k_zero_is_task_arithmetic_and_options_are_checked() -> None:
    base, models = grid_family(43, 2)
    assert_matches(run(base, models, Consensus(k=0, lam=0.3)), ref_linear(base, models, lam=0.3))
    with pytest.raises(ConfigError, match="tall_lambda"):
        Consensus(tall_lambda=-1)
    with pytest.raises(ConfigError, match="k"):
        Consensus(k=-1)
