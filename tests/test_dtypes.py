"""The torch-free dtype table: safetensors codes, recipe names, numpy views, torch dtypes."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tiesmerge import dtypes
from tiesmerge.dtypes import BY_CODE, BY_NAME, DTYPES, FLOAT32, DType, as_dtype, from_torch


def _header(path) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))


def test_codes_are_the_ones_safetensors_writes(tmp_path):
    """Every descriptor's code is what safetensors itself writes for its torch dtype."""
    tensors = {d.name: torch.zeros(3, dtype=d.torch) for d in DTYPES}
    save_file(tensors, str(tmp_path / "all.safetensors"))
    header = _header(tmp_path / "all.safetensors")
    assert {name: header[name]["dtype"] for name in tensors} == {d.name: d.code for d in DTYPES}
    assert set(BY_CODE) == {d.code for d in DTYPES}


@pytest.mark.parametrize("d", DTYPES, ids=lambda d: d.name)
def test_descriptor_matches_its_torch_dtype(d: DType):
    t = d.torch
    assert isinstance(t, torch.dtype) and str(t) == f"torch.{d.name}"
    assert (t.itemsize, t.is_floating_point) == (d.itemsize, d.is_floating)
    assert from_torch(t) is d and as_dtype(t) is d and as_dtype(d.name) is d
    assert d.numpy.itemsize == d.itemsize and str(d) == d.name


@pytest.mark.parametrize("d", DTYPES, ids=lambda d: d.name)
def test_numpy_view_reads_the_stored_bytes(d: DType):
    """The numpy view of a tensor's bytes holds its values where numpy has the type, and its bit
    pattern (bfloat16 as uint16, float8 as uint8) where it does not."""
    values = torch.tensor([0.0, 1.0, -2.5, 3.0]).to(d.torch)
    raw = values.view(torch.uint8).numpy().tobytes()
    seen = np.frombuffer(raw, dtype=d.numpy)
    assert seen.shape == (4,)
    if d.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        assert seen.dtype.kind == "u" and d.is_floating
        bits = {1: torch.uint8, 2: torch.int16}[d.itemsize]
        assert seen.astype(np.int64).tolist() == (values.view(bits).to(torch.int64) & (256**d.itemsize - 1)).tolist()
    else:
        assert seen.tolist() == values.tolist()


def test_recipe_names_in_the_order_users_see():
    assert list(BY_NAME) == ["float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16"]
    assert BY_NAME["bf16"] is BY_NAME["bfloat16"] is BY_CODE["BF16"]
    assert BY_NAME["fp16"] is BY_CODE["F16"] and BY_NAME["fp32"] is FLOAT32 is BY_CODE["F32"]
    assert all(d.is_floating for d in BY_NAME.values())


def test_as_dtype_accepts_descriptors_names_and_torch_dtypes():
    assert as_dtype(FLOAT32) is FLOAT32
    assert as_dtype("bf16") is as_dtype("bfloat16") is as_dtype(torch.bfloat16) is BY_CODE["BF16"]
    assert as_dtype("int64") is BY_CODE["I64"]  # any canonical name, not only the output names
    with pytest.raises(ValueError, match=r"unknown dtype name 'bfloat'.*bf16"):
        as_dtype("bfloat")
    with pytest.raises(TypeError, match="not a torch dtype"):
        as_dtype(np.float32)  # type: ignore[arg-type]


def test_torch_dtypes_outside_the_table_have_no_code():
    """An in-memory tensor may hold a dtype tiesmerge never reads from or writes to files."""
    d = from_torch(torch.complex64)
    assert (d.code, d.name, d.itemsize, d.is_floating) == (None, "complex64", 8, False)
    assert d.numpy == np.complex64 and d.torch is torch.complex64
    u = from_torch(torch.uint16)
    assert (u.code, u.itemsize, u.numpy) == (None, 2, np.dtype(np.uint16))


def test_torch_is_named_when_it_lacks_a_dtype():
    future = DType("F4", "float4_imaginary", 1, True, np.dtype("u1"))
    with pytest.raises(TypeError, match=r"torch .* has no dtype float4_imaginary"):
        _ = future.torch


def test_descriptors_are_frozen_and_hashable():
    with pytest.raises(AttributeError):
        FLOAT32.itemsize = 8  # type: ignore[misc]
    assert len({*DTYPES, *BY_NAME.values()}) == len(DTYPES)
    assert dtypes.__all__ and all(hasattr(dtypes, name) for name in dtypes.__all__)
