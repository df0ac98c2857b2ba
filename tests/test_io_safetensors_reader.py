"""Reading safetensors files (io/safetensors_reader.py): row slices, scalars, stored dtypes,
bytes read into buffers or mapped, and row-chunked merges from shards."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import tiesmerge
from helpers_ckpt import write_hf_dir, write_layouts, write_safetensors
from tiesmerge.errors import CheckpointError
from tiesmerge.io.checkpoint import open_checkpoint


@pytest.mark.parametrize("layout", ["sharded_dir", "single_dir", "file"])
def test_row_slice_reads_equal_full_reads(tmp_path, family, layout):
    base, _ = family
    ckpt = open_checkpoint(write_layouts(tmp_path, base)[layout])
    for name, tensor in base.items():
        full = ckpt.read(name)
        rows = tensor.shape[0]
        for rs in (slice(0, 1), slice(1, rows), slice(0, rows), slice(rows // 2, rows // 2 + 3)):
            assert torch.equal(ckpt.read(name, rs), full[rs]), (name, rs)


def test_safetensors_scalar_tensor_row_read(tmp_path):
    path = write_safetensors(tmp_path / "s.safetensors", {"scale": torch.tensor(1.5), "w": torch.ones(3, 2)})
    ckpt = open_checkpoint(path)
    assert ckpt.info("scale").shape == ()
    assert torch.equal(ckpt.read("scale", slice(0, 1)), torch.tensor(1.5))


def test_file_infos_are_the_stored_dtypes(tmp_path):
    state = {"w": torch.ones(3, 2, dtype=torch.bfloat16), "ids": torch.arange(4),
             "mask": torch.ones(2, dtype=torch.bool)}
    ckpt = open_checkpoint(write_safetensors(tmp_path / "m.safetensors", state))
    assert {n: ckpt.info(n).dtype_info.code for n in state} == {"w": "BF16", "ids": "I64", "mask": "BOOL"}
    assert {n: ckpt.info(n).dtype for n in state} == {n: t.dtype for n, t in state.items()}


def test_unknown_dtype_code_is_refused_by_name(tmp_path):
    """A dtype safetensors knows but tiesmerge does not read (uint16) names the tensor and the code."""
    path = tmp_path / "u16.safetensors"
    save_file({"w": torch.zeros(2, dtype=torch.uint16)}, str(path))
    with pytest.raises(CheckpointError,
                       match=r"u16.safetensors: tensor 'w' has dtype U16, which tiesmerge cannot read"):
        open_checkpoint(path)


def test_rows_read_into_a_buffer_and_mapped_are_the_stored_bytes(tmp_path, family):
    base, _ = family
    ckpt = open_checkpoint(write_hf_dir(tmp_path / "m", base, shards=2))
    name = "model.layers.0.mlp.up_proj.weight"
    want = base[name][3:7].contiguous().view(torch.uint8).numpy().tobytes()
    out = bytearray(len(want))
    ckpt.read_into(name, slice(3, 7), memoryview(out))
    assert bytes(out) == want == ckpt.map_rows(name, slice(3, 7)).tobytes()
    with pytest.raises(ValueError, match="buffer of 3 bytes"):
        ckpt.read_into(name, slice(3, 7), memoryview(bytearray(3)))


def test_row_chunked_merge_equals_whole_tensor_merge(tmp_path, family):
    """A tiny memory budget forces one-row chunks, which read row slices from the shards."""
    base, fts = family
    b = write_hf_dir(tmp_path / "base", base, shards=2)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    plan = tiesmerge.plan_merge(b, ms, "ties", memory_budget=6000)
    assert any(len(c) > 1 for c in plan.chunks_by_job.values())
    for method, opts in (("ties", {}), ("ties", {"scope": "per_tensor"}), ("task_arithmetic", {"lam": 0.5})):
        chunked = tiesmerge.merge(b, ms, method, memory_budget=6000, **opts)
        whole = tiesmerge.merge(base, fts, method, **opts)
        for k in whole:
            torch.testing.assert_close(chunked[k], whole[k], rtol=0, atol=1e-6, msg=f"{method} {opts} {k}")
