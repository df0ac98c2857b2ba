"""Batches as nested tensors: a tensor, or a mapping / tuple / list of them, batch dimension first."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["map_tensors", "batch_size", "example"]


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``batch`` with ``fn`` applied to every tensor inside it (other values kept)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """The leading dimension shared by every tensor of ``batch``."""
    sizes: set[int] = set()
    map_tensors(batch, lambda t: sizes.add(int(t.shape[0])) if t.dim() else None)
    if len(sizes) != 1:
        raise ValueError(f"a batch holds tensors with batch dimensions {sorted(sizes) or 'none'}; "
                         "every tensor needs the same leading (batch) dimension")
    return sizes.pop()


def example(batch: Any, i: int) -> Any:
    """Example ``i`` of ``batch`` as a batch of one (the leading dimension kept)."""
    return map_tensors(batch, lambda t: t[i:i + 1] if t.dim() else t)
