"""Fused whole-tensor merges (SLERP, NuSLERP, Model Stock): a reduction pass, then one elementwise pass.

These methods interpolate with scalars that depend on the whole tensor (norms, cosines). To merge
bit for bit as their torch path (and so as mergekit 0.1.5), the scalars must come from the same
float32 reductions in the same order. So the reduction pass widens the raw rows once into reused
float32 buffers (:func:`kernels.values`), forms the entrywise products the method sums in a
kernel (:func:`kernels.product`, each operation rounded as torch rounds it), and lets torch sum
them with the very calls of the torch path (the method's ``coefficients``: torch's reduction
order is its own, per CPU capability and thread count). What the fused path saves is everything
else: the temporaries torch allocates per operation, the task-vector copies, the output cast. The
elementwise pass (:func:`kernels.interp`, :func:`kernels.stock`) reads the raw rows again and
writes the output dtype directly.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..lazy import torch
from ..methods.base import TensorKernel
from . import fused

__all__ = ["merge", "scratch_bytes"]


def scratch_bytes(spec: TensorKernel, n_models: int, numel: int) -> int:
    """The float32 buffers one tensor of ``numel`` entries needs: the two endpoints and their
    products ("interp"), or every model's task vector and one product ("stock")."""
    return 4 * numel * (3 if spec.kind == "interp" else n_models + 1)


def merge(spec: TensorKernel, name: str, inputs: Sequence[np.ndarray], out: np.ndarray, take) -> bool:
    """Merge one whole tensor ``name`` (inputs: the raw rows, base first) into ``out`` (bfloat16 bits or
    float32); ``take(key, nbytes)`` lends reused byte buffers. False when a value is not finite."""
    kernels = fused.load()
    numel = inputs[0].size
    if numel == 0:
        return True

    def buffer(key: str) -> np.ndarray:
        return take(f"whole.{key}", 4 * numel).view(np.float32)

    product = buffer("product")
    if spec.kind == "interp":
        x, y = buffer("x"), buffer("y")
        if not (kernels.values(inputs, spec.pair[0], spec.relative, x)
                and kernels.values(inputs, spec.pair[1], spec.relative, y)):
            return False

        def scaled(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
            kernels.product(x, y, product, float(sx.reshape(())), float(sy.reshape(())))
            return torch.from_numpy(product)

        c0, c1, divisor = spec.coefficients(name, torch.from_numpy(x), torch.from_numpy(y), scaled)
        kernels.interp(inputs, spec.pair, spec.relative, c0, c1, divisor, out)
        return True
    if spec.kind == "stock":
        offsets = [buffer(f"tau{t}") for t in range(len(inputs) - 1)]
        for t, tau in enumerate(offsets):
            if not kernels.values(inputs, 1 + t, True, tau):
                return False

        def products(i: int, j: int) -> torch.Tensor:
            kernels.product(offsets[i], offsets[j], product)
            return torch.from_numpy(product)

        t, one_minus_t = spec.coefficients(name, [torch.from_numpy(tau) for tau in offsets], products)
        kernels.stock(inputs, t, one_minus_t, out)
        return True
    raise ValueError(f"unknown whole-tensor kernel {spec.kind!r}")
