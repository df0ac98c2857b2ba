"""What every checkpoint reader offers: tensor facts up front (``TensorInfo``), values on demand.

The facts a plan needs (shape, width, whether a tensor is floating) come from ``DType``
descriptors, so listing and planning never import torch; ``TensorInfo.dtype`` still answers
with a ``torch.dtype`` for the code that computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..dtypes import DType, as_dtype

if TYPE_CHECKING:
    import torch

__all__ = ["TensorInfo", "Checkpoint", "read_rows_into", "rows_shape"]


@dataclass(frozen=True, init=False)
class TensorInfo:
    """A stored tensor's shape and dtype. Built from a ``DType``, a torch dtype or a dtype name.

    >>> info = TensorInfo((4, 3), "bf16")
    >>> info.dtype_info.code, info.itemsize, info.is_floating, info.nbytes
    ('BF16', 2, True, 24)
    """

    shape: tuple[int, ...]
    dtype_info: DType

    def __init__(self, shape: Sequence[int], dtype: DType | str | torch.dtype) -> None:
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "dtype_info", as_dtype(dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch): for code that computes; planning uses ``dtype_info``."""
        return self.dtype_info.torch

    @property
    def itemsize(self) -> int:
        return self.dtype_info.itemsize

    @property
    def is_floating(self) -> bool:
        return self.dtype_info.is_floating

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype_info.itemsize


@runtime_checkable
class Checkpoint(Protocol):
    """What the engine needs of an input model."""

    label: str  # how errors and progress name this checkpoint

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor: ...

    def location(self, name: str) -> str: ...

    def files(self) -> list[Path]: ...

    def directory(self) -> Path | None: ...

    def close(self) -> None: ...


def rows_shape(shape: Sequence[int], rows: slice | None) -> list[int]:
    """The shape of ``rows`` of a tensor of ``shape`` (a 0-d tensor has no rows: all of it)."""
    out = list(shape)
    if rows is not None and out:
        out[0] = len(range(*rows.indices(out[0])))
    return out


def rank_bound(ckpt: Checkpoint, name: str) -> int | None:
    """``ckpt.rank_bound(name)`` where a reader has it (an adapter knows its task vectors' ranks: r), else None:
    nothing is known beyond the tensor's shape."""
    return ckpt.rank_bound(name) if hasattr(ckpt, "rank_bound") else None


def read_rows_into(ckpt: Checkpoint, name: str, rows: slice | None, out: memoryview) -> None:
    """``ckpt.read_into`` where a reader has it (files: one pread, no copy, no torch), else a copy
    of what ``read`` returns."""
    if hasattr(ckpt, "read_into"):
        ckpt.read_into(name, rows, out)
        return
    import torch  # a reader without read_into holds torch tensors: torch is loaded already

    value = ckpt.read(name, rows).contiguous()
    out[:] = value.reshape(-1).view(torch.uint8).numpy().data if value.numel() else b""
