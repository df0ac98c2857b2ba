"""SLERP (methods/slerp.py): a float64 reference, mergekit 0.1.5's float32 operations bit for bit
(chunked norms past 2^20 entries, the models' own values), the lerp fallback, anchors, and t per
tensor from a schedule."""

from __future__ import annotations

import math

import pytest
import torch

from helpers_merge import run
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Slerp
from tiesmerge.methods.slerp import slerp_tensor


def ref_slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """float64, from the definition: the angle between the flattened tensors; lerp when |cos| > 0.9995."""
    x, y = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = float(x.norm()), float(y.norm())
    cos = max(-1.0, min(1.0, float((x / (na if na > 1e-8 else 1.0)) @ (y / (nb if nb > 1e-8 else 1.0)))))
    if abs(cos) > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    w = math.acos(cos)
    return ((math.sin((1 - t) * w) * x + math.sin(t * w) * y) / math.sin(w)).reshape(a.shape)


def mergekit_slerp_f32(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5's slerp as it computes in float32 (merge_methods/slerp.py, a batch of one):
    norms of 2^20-entry chunk norms, the dot a sum of chunk sums, float32 coefficients."""
    chunk = 1024 * 1024
    a, b = v0.reshape(1, -1).float(), v1.reshape(1, -1).float()
    tt = torch.tensor([t], dtype=torch.float32).reshape(-1, 1)
    starts = range(0, a.shape[1], chunk)
    na = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(a[:, s:s + chunk], dim=1, keepdim=True)
                                               for s in starts]), dim=0)
    nb = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b[:, s:s + chunk], dim=1, keepdim=True)
                                               for s in starts]), dim=0)
    na, nb = torch.where(na > 1e-8, na, 1), torch.where(nb > 1e-8, nb, 1)
    dot = torch.stack([((a[:, s:s + chunk] / na) * (b[:, s:s + chunk] / nb)).sum(dim=1, keepdim=True)
                       for s in starts]).sum(dim=0).clamp(-1, 1)
    linear = dot.abs() > 0.9995
    theta = torch.acos(torch.where(linear, 0, dot))
    ca = torch.where(linear, 1 - tt, torch.sin((1 - tt) * theta) / torch.sin(theta))
    cb = torch.where(linear, tt, torch.sin(tt * theta) / torch.sin(theta))
    out = torch.empty_like(a)
    for s in starts:
        out[:, s:s + chunk] = ca * a[:, s:s + chunk] + cb * b[:, s:s + chunk]
    return out.reshape(v0.shape)


def _family(seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    base = {"model.layers.0.self_attn.q_proj.weight": torch.randn(12, 10, generator=g),
            "model.layers.1.mlp.up_proj.weight": torch.randn(7, 10, generator=g),
            "model.norm.weight": 1 + torch.rand(10, generator=g),
            "scalar": torch.tensor(0.5)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    for m in models:  # small values on a base near 1.5: base + (m - base) rounds away m's low bits
        m["model.norm.weight"] = 0.1 * torch.randn(10, generator=g)
    return base, models


def test_slerp_of_two_models_matches_the_float64_reference() -> None:
    base, models = _family()
    for t in (0.0, 0.3, 0.5, 1.0):
        out = run(base, models, Slerp(t=t))
        for k in base:
            torch.testing.assert_close(out[k].double(), ref_slerp(t, models[0][k], models[1][k]), rtol=1e-5,
                                       atol=1e-5)


def test_slerp_is_mergekits_float32_bit_for_bit_from_the_models_own_values() -> None:
    base, models = _family(1)
    name = "model.norm.weight"
    rebuilt = base[name] + (models[1][name] - base[name])
    assert not torch.equal(rebuilt, models[1][name])  # base + tau is not the model: the test can tell
    out = run(base, models[1:], Slerp(t=0.3, anchor="base"))
    for k in base:
        assert torch.equal(out[k], mergekit_slerp_f32(0.3, base[k], models[1][k])), k
    out = run(base, models, Slerp(t=0.7))
    for k in base:
        assert torch.equal(out[k], mergekit_slerp_f32(0.7, models[0][k], models[1][k])), k


def test_slerp_tensor_chunks_its_norms_past_a_million_entries() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1100, 1000, generator=g), torch.randn(1100, 1000, generator=g)  # 1.1 M entries
    got = slerp_tensor(0.4, a, b)
    assert torch.equal(got, mergekit_slerp_f32(0.4, a, b))
    torch.testing.assert_close(got.double(), ref_slerp(0.4, a, b), rtol=1e-4, atol=1e-5)


def test_parallel_and_zero_tensors_fall_back_to_lerp() -> None:
    a = torch.randn(5, 4)
    for b in (2 * a, -a, a + 1e-6, torch.zeros(5, 4)):
        torch.testing.assert_close(slerp_tensor(0.25, a, b).double(), ref_slerp(0.25, a, b), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(slerp_tensor(0.25, a, 2 * a), 0.75 * a + 0.5 * a)
    assert slerp_tensor(0.5, torch.zeros(0), torch.zeros(0)).shape == (0,)


def test_t_by_name_follows_mergekits_filters_and_gradients() -> None:
    base, models = _family(3)
    method = Slerp(anchor="base", t=0.9, t_by_name="self_attn=0,1;mlp=1,0.5;*=0.25", layers=2)
    out = run(base, models[:1], method)
    # layer 0 of 2 sits at 0, layer 1 at 1; outside the layers (the norm) at 0, no filter: 0.25
    want = {"model.layers.0.self_attn.q_proj.weight": 0.0, "model.layers.1.mlp.up_proj.weight": 0.5,
            "model.norm.weight": 0.25, "scalar": 0.25}
    for k, t in want.items():
        assert method.t_for(k) == t
        assert torch.equal(out[k], mergekit_slerp_f32(t, base[k], models[0][k])), k


def test_slerp_takes_exactly_its_models_and_a_schedule_with_layers() -> None:
    base, models = _family(4)
    with pytest.raises(ConfigError, match="exactly 2 models"):
        run(base, models[:1], Slerp())
    with pytest.raises(ConfigError, match="exactly 1 model"):
        run(base, models, Slerp(anchor="base"))
    with pytest.raises(ConfigError, match="layers"):
        Slerp(t_by_name="self_attn=0,1;*=0.5")
    with pytest.raises(ConfigError, match="schedule"):
        Slerp(t_by_name="self_attn=zero")
    Slerp(t_by_name="self_attn=0.2;*=0.5")  # no gradient: no layers needed
