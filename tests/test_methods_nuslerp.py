"""NuSLERP (methods/nuslerp.py): task vectors or models, flattened, per row or per column, the
weight's t, against a float64 reference and mergekit 0.1.5's float32 operations bit for bit."""

from __future__ import annotations

import math

import pytest
import torch

from helpers_merge import run
from tiesmerge.errors import ConfigError
from tiesmerge.methods import NuSlerp


def ref_nuslerp(t: float, a: torch.Tensor, b: torch.Tensor, *, flatten: bool, row_wise: bool) -> torch.Tensor:
    """float64: SLERP of each vector (the whole tensor, each row, or each column), lerp if colinear."""
    x, y = a.double(), b.double()
    if flatten:
        x, y = x.reshape(1, -1), y.reshape(1, -1)
    elif row_wise:  # mergekit's row_wise moves dim 0 last: vectors along dim 0
        x, y = x.transpose(0, -1), y.transpose(0, -1)
    moved = x.shape
    vx, vy = x.reshape(-1, moved[-1] if len(moved) else 1), y.reshape(-1, moved[-1] if len(moved) else 1)
    outs = []
    for u, v in zip(vx, vy):
        cos = float((u / max(float(u.norm()), 1e-7)) @ (v / max(float(v.norm()), 1e-7)))
        cos = max(-1.0, min(1.0, cos))
        if 1 - cos * cos <= 1e-16:
            outs.append((1 - t) * u + t * v)
        else:
            w = math.acos(cos)
            outs.append((math.sin((1 - t) * w) * u + math.sin(t * w) * v) / math.sin(w))
    out = torch.stack(outs).reshape(moved)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(a.shape)


def mergekit_nuslerp_f32(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool, flatten: bool):
    """mergekit 0.1.5's nuslerp (merge_methods/nuslerp.py) in float32."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = torch.sum(u0 * u1, dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, 0, cos))
    res = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    res = torch.where(colinear, (1 - t) * v0 + t * v1, res)
    if row_wise and not flatten:
        res = res.transpose(0, -1)
    return res.reshape(shape)


def _family() -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g),
            "c": torch.randn(2, 3, 4, generator=g)}
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    models[1]["b"] = base["b"] + 2 * (models[0]["b"] - base["b"])  # parallel task vectors: the lerp branch
    return base, models


@pytest.mark.parametrize("flatten,row_wise", [(True, False), (False, False), (False, True)])
def test_nuslerp_of_task_vectors_matches_the_references(flatten: bool, row_wise: bool) -> None:
    base, models = _family()
    method = NuSlerp(weights=(0.7, 0.3), flatten=flatten, row_wise=row_wise)
    out = run(base, models, method)
    for k in base:
        tau = [m[k] - base[k] for m in models]
        want = base[k].double() + ref_nuslerp(0.3, tau[0], tau[1], flatten=flatten, row_wise=row_wise)
        torch.testing.assert_close(out[k].double(), want, rtol=1e-5, atol=1e-5)
        bits = base[k] + mergekit_nuslerp_f32(0.3, tau[0], tau[1], row_wise=row_wise, flatten=flatten)
        assert torch.equal(out[k], bits), k


def test_nuslerp_of_models_and_of_the_base_and_a_model() -> None:
    base, models = _family()
    out = run(base, models, NuSlerp(of="models", weights=(1.0, 3.0), flatten=False))
    for k in base:
        assert torch.equal(out[k], mergekit_nuslerp_f32(0.75, models[0][k], models[1][k], row_wise=False,
                                                         flatten=False)), k
    one = run(base, models[1:], NuSlerp(of="base_and_model", t=0.2))
    for k in base:
        assert torch.equal(one[k], mergekit_nuslerp_f32(0.2, base[k], models[1][k], row_wise=False, flatten=True))


def test_nuslerp_weights_give_t_as_mergekit_does() -> None:
    assert NuSlerp().interpolation() == 0.5
    assert NuSlerp(weights=(1.0, 3.0)).interpolation() == 0.75
    assert NuSlerp(weights=(0.0, 0.0)).interpolation() == 0.5  # a zero sum: mergekit's 0.5
    with pytest.raises(ConfigError, match="opposite signs"):  # -1, 1: a zero sum too, but an extrapolation meant
        NuSlerp(weights=(1.0, -1.0)).requirements()
    with pytest.raises(ConfigError, match="not both"):
        NuSlerp(weights=(1.0, 1.0), t=0.3)
    base, models = _family()
    with pytest.raises(ConfigError, match="exactly 2 models"):
        run(base, models[:1], NuSlerp())
