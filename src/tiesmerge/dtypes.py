"""Tensor dtypes without torch: one table for safetensors codes, recipe names and numpy views.

Reading a checkpoint's layout, planning a merge and writing safetensors output need only a
dtype's width, whether it is floating, and the code safetensors files write. This module holds
those facts, so commands that do no tensor math never import torch; the torch dtype is resolved
(and torch imported) only when someone asks for ``DType.torch``.

>>> BF16 = BY_CODE["BF16"]
>>> BF16.name, BF16.itemsize, BF16.is_floating, BF16.numpy
('bfloat16', 2, True, dtype('uint16'))
>>> as_dtype("bf16") is BF16
True
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["DType", "DTYPES", "BY_CODE", "BY_NAME", "FLOAT32", "as_dtype", "from_torch"]


@dataclass(frozen=True)
class DType:
    """What tiesmerge knows of a dtype without importing torch."""

    code: str | None  # safetensors header code ("BF16"); None for an in-memory-only torch dtype
    name: str  # canonical name, also torch's attribute name: "bfloat16", "float8_e4m3fn"
    itemsize: int  # bytes per entry
    is_floating: bool
    # numpy dtype of the stored bytes: the values themselves where numpy has the type, else an
    # unsigned integer of the same width holding the bit pattern (bfloat16 -> uint16, float8 -> uint8)
    numpy: np.dtype

    @property
    def torch(self) -> torch.dtype:
        """The torch dtype; imports torch (only tensor math and pickles need it)."""
        import torch

        try:
            return getattr(torch, self.name)
        except AttributeError:
            raise TypeError(f"torch {torch.__version__} has no dtype {self.name}; upgrade torch to read it") from None

    def __str__(self) -> str:
        return self.name


def _d(code: str, name: str, itemsize: int, is_floating: bool, numpy: str) -> DType:
    return DType(code, name, itemsize, is_floating, np.dtype(numpy))


# every dtype tiesmerge reads from and writes to safetensors files (little-endian, as the format is)
DTYPES: tuple[DType, ...] = (
    _d("F64", "float64", 8, True, "<f8"),
    _d("F32", "float32", 4, True, "<f4"),
    _d("F16", "float16", 2, True, "<f2"),
    _d("BF16", "bfloat16", 2, True, "<u2"),
    _d("F8_E4M3", "float8_e4m3fn", 1, True, "u1"),
    _d("F8_E5M2", "float8_e5m2", 1, True, "u1"),
    _d("I64", "int64", 8, False, "<i8"),
    _d("I32", "int32", 4, False, "<i4"),
    _d("I16", "int16", 2, False, "<i2"),
    _d("I8", "int8", 1, False, "i1"),
    _d("U8", "uint8", 1, False, "u1"),
    _d("BOOL", "bool", 1, False, "?"),
)
BY_CODE: Mapping[str, DType] = MappingProxyType({d.code: d for d in DTYPES if d.code is not None})
_BY_CANONICAL: Mapping[str, DType] = MappingProxyType({d.name: d for d in DTYPES})
FLOAT32 = _BY_CANONICAL["float32"]  # what the engine computes in, and adapters yield
# the output dtypes a recipe or the command line may name (``dtype: bf16``), in the order shown to users
BY_NAME: Mapping[str, DType] = MappingProxyType({
    name: _BY_CANONICAL[canonical] for name, canonical in (
        ("float32", "float32"), ("float16", "float16"), ("bfloat16", "bfloat16"), ("float64", "float64"),
        ("fp32", "float32"), ("fp16", "float16"), ("bf16", "bfloat16"))
})


def from_torch(dtype: torch.dtype) -> DType:
    """The descriptor of a torch dtype: the table's entry, or (for a dtype safetensors output of
    tiesmerge never holds, e.g. complex64 in an in-memory state dict) one with ``code=None``."""
    torch = sys.modules.get("torch")  # a torch dtype exists only once torch is imported
    if torch is None or not isinstance(dtype, torch.dtype):
        raise TypeError(f"not a torch dtype: {dtype!r}")
    name = str(dtype).removeprefix("torch.")
    known = _BY_CANONICAL.get(name)
    if known is not None:
        return known
    try:
        numpy = np.dtype(name)
    except TypeError:
        numpy = np.dtype(f"V{dtype.itemsize}")  # raw bytes: numpy has no such type
    if numpy.itemsize != dtype.itemsize:
        numpy = np.dtype(f"V{dtype.itemsize}")
    return DType(None, name, dtype.itemsize, dtype.is_floating_point, numpy)


def as_dtype(value: DType | str | torch.dtype) -> DType:
    """A descriptor from a descriptor, a torch dtype, a recipe name (``bf16``) or a canonical
    name (``int64``)."""
    if isinstance(value, DType):
        return value
    if isinstance(value, str):
        found = BY_NAME.get(value) or _BY_CANONICAL.get(value)
        if found is None:
            known = ", ".join(dict.fromkeys([*BY_NAME, *_BY_CANONICAL]))
            raise ValueError(f"unknown dtype name {value!r}; known: {known}")
        return found
    return from_torch(value)
