"""Model Stock (methods/model_stock.py): t from the fine-tunes' angle against a float64 reference,
mergekit 0.1.5's float32 operations bit for bit, per tensor and per row, and its edge cases."""

from __future__ import annotations

import pytest
import torch

from helpers_merge import run
from tiesmerge.errors import ConfigError
from tiesmerge.methods import ModelStock


def ref_model_stock(base: torch.Tensor, models: list[torch.Tensor], *, filter_wise: bool) -> torch.Tensor:
    """float64: t = k cos / (1 + (k-1) cos), cos the mean pairwise cosine of the task vectors."""
    b = base.double()
    rows = (b.reshape(1, -1) if not filter_wise else (b.reshape(1, -1) if b.dim() <= 1 else b.reshape(b.shape[0], -1)))
    ws = [m.double().reshape(rows.shape) for m in models]
    k = len(ws)
    out = []
    for r in range(rows.shape[0]):
        taus = [w[r] - rows[r] for w in ws]
        cos = [float(taus[i] @ taus[j]) / max(float(taus[i].norm() * taus[j].norm()), 1e-6)
               for i in range(k) for j in range(i + 1, k)]
        c = sum(max(-1.0, min(1.0, x)) for x in cos) / len(cos)
        t = k * c / (1 + (k - 1) * c) if abs(1 + (k - 1) * c) >= 1e-6 else 0.0
        avg = sum(w[r] for w in ws) / k
        out.append(t * avg + (1 - t) * rows[r])
    return torch.stack(out).reshape(base.shape)


def mergekit_model_stock_f32(base: torch.Tensor, models: list[torch.Tensor], *, filter_wise: bool) -> torch.Tensor:
    """mergekit 0.1.5's model_stock (merge_methods/model_stock.py) in float32."""
    shape = base.shape
    if filter_wise:
        w0, ws = (base.unsqueeze(0), [m.unsqueeze(0) for m in models]) if base.dim() == 1 else (base, list(models))
    else:
        w0, ws = base.reshape(-1), [m.reshape(-1) for m in models]
    offsets = [w - w0 for w in ws]
    cos = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            cos.append(((a * b).sum(dim=-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6))
                       .clamp(-1, 1))
    c = torch.stack(cos).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    den = 1 + (k - 1) * c
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(c), (k * c) / torch.where(singular, torch.ones_like(den), den))
    return (t * (sum(ws) / k) + (1 - t) * w0).reshape(shape)


def _family(k: int, seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(8, 6, generator=g), "b": 1 + torch.rand(6, generator=g)}
    shared = {n: torch.randn(v.shape, generator=g) for n, v in base.items()}  # correlated fine-tunes: cos > 0
    models = [{n: v + shared[n] + torch.randn(v.shape, generator=g) for n, v in base.items()} for _ in range(k)]
    return base, models


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_the_float64_reference_and_mergekits_bits(k: int, filter_wise: bool) -> None:
    base, models = _family(k, seed=k)
    out = run(base, models, ModelStock(filter_wise=filter_wise))
    for n in base:
        ms = [m[n] for m in models]
        torch.testing.assert_close(out[n].double(), ref_model_stock(base[n], ms, filter_wise=filter_wise),
                                   rtol=1e-5, atol=1e-5)
        assert torch.equal(out[n], mergekit_model_stock_f32(base[n], ms, filter_wise=filter_wise)), n


def test_orthogonal_fine_tunes_keep_the_base_and_identical_ones_are_taken_whole() -> None:
    base = {"w": torch.zeros(2, 2)}
    a, b = torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    out = run(base, [{"w": a}, {"w": b}], ModelStock())
    assert torch.equal(out["w"], torch.zeros(2, 2))  # cos 0: t 0
    out = run(base, [{"w": a}, {"w": a.clone()}], ModelStock())
    assert torch.equal(out["w"], a)  # cos 1: t 1, the average
    out = run(base, [{"w": a}, {"w": -a}], ModelStock())
    assert torch.equal(out["w"], torch.zeros(2, 2))  # cos -1 with k 2: 1 + (k-1) cos = 0, the base


def test_model_stock_needs_two_fine_tunes() -> None:
    base, models = _family(1)
    with pytest.raises(ConfigError, match="at least two"):
        run(base, models, ModelStock())
