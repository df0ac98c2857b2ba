"""Shared by the SVD methods' tests: a small family of fine-tuned models with every kind of
tensor the methods treat differently, and the plain float64 building blocks of the references."""

from __future__ import annotations

import torch

State = dict[str, torch.Tensor]

# 2-D tall and wide (decomposed), a matrix with fewer rows than tasks, CLIP's text_projection
# (averaged by name), a bias, a conv kernel (n-D: averaged), an int buffer (copied from the base)
SVD_SHAPES: dict[str, tuple[int, ...]] = {
    "layer.weight": (24, 16),
    "layer.wide": (12, 30),
    "head.weight": (2, 16),
    "text_projection": (12, 8),
    "layer.bias": (24,),
    "conv.weight": (4, 3, 2, 2),
}


def svd_family(n: int, seed: int = 0, shapes: dict[str, tuple[int, ...]] = SVD_SHAPES) -> tuple[State, list[State]]:
    """A float32 base and n models; task vectors of a few strong directions plus noise, so the
    spectra have gaps and the float32 SVD path (no float64 retry) is exercised."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    base["position_ids"] = torch.arange(5)
    models = []
    for _ in range(n):
        m = {}
        for k, s in shapes.items():
            tau = 0.05 * torch.randn(s, generator=g)
            if len(s) == 2:
                a, b = torch.randn(s[0], 2, generator=g), torch.randn(2, s[1], generator=g)
                tau = tau + 0.3 * a @ b
            m[k] = base[k] + tau
        m["position_ids"] = torch.arange(5) + 7
        models.append(m)
    return base, models


def task_vectors64(base: State, models: list[State], name: str) -> list[torch.Tensor]:
    return [m[name].double() - base[name].double() for m in models]


def polar64(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor in float64, as the references compute it: U V^T of an SVD."""
    u, _, vh = torch.linalg.svd(x.double(), full_matrices=False)
    return u @ vh


def assemble(base: State, merged: dict[str, torch.Tensor]) -> State:
    """base + merged task vector (float64, then the base's dtype); non-float tensors: the base's."""
    return {k: (v.double() + merged[k]).to(v.dtype) if k in merged else v.clone() for k, v in base.items()}


def assert_close_state(out: State, ref: State, tol: float = 2e-5) -> None:
    assert list(out) == list(ref)
    for k in ref:
        assert out[k].dtype == ref[k].dtype and out[k].shape == ref[k].shape, k
        if not ref[k].is_floating_point():
            assert torch.equal(out[k], ref[k]), k
        else:
            torch.testing.assert_close(out[k].double(), ref[k].double(), rtol=tol, atol=tol,
                                       msg=lambda m, k=k: f"{k}: {m}")
