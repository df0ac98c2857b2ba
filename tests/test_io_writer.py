"""The streaming safetensors writer, shard planning, the atomic output directory, file copying."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers_ckpt import (
    TOKENIZER_FILES,
    assert_no_output,
    leftovers,
    write_earlier_manifest,
    write_hf_dir,
)
from tiesmerge.dtypes import BY_CODE, from_torch
from tiesmerge.errors import OutputError
from tiesmerge.io.writer import (
    OutputEntry,
    SafetensorsStreamWriter,
    ShardedWriter,
    atomic_directory,
    copy_model_files,
    plan_shards,
)


def _entries(state):
    return [OutputEntry(k, tuple(v.shape), v.dtype) for k, v in state.items()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_stream_writer_chunks_load_back_exactly(tmp_path, dtype):
    g = torch.Generator().manual_seed(0)
    state = {
        "a": (torch.randn(7, 3, generator=g) * 10).to(dtype),
        "scalar": torch.tensor(3).to(dtype),
        "b": (torch.randn(5, generator=g) * 10).to(dtype),
        "empty": torch.zeros(0, 4, dtype=dtype),
    }
    path = tmp_path / "x.safetensors"
    w = SafetensorsStreamWriter(path, _entries(state), metadata={"format": "pt", "k": "v"})
    w.write("a", state["a"][:2])
    w.write("a", state["a"][2:3])
    w.write("a", state["a"][3:])
    w.write("scalar", state["scalar"])
    w.write("b", state["b"])
    w.write("empty", state["empty"])
    w.close()
    back = load_file(str(path))
    assert set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape and torch.equal(back[k], v), k
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_numpy_chunks_of_the_stored_bytes_write_the_same_file_as_tensors(tmp_path, dtype):
    """The torch-free path hands the writer numpy views of the stored bytes (bfloat16 as uint16)."""
    g = torch.Generator().manual_seed(1)
    state = {"a": (torch.randn(6, 3, generator=g) * 10).to(dtype), "scalar": torch.tensor(2).to(dtype),
             "empty": torch.zeros(0, 2, dtype=dtype)}
    view = from_torch(dtype).numpy
    files = []
    for kind in ("torch", "numpy"):
        path = tmp_path / f"{kind}.safetensors"
        entries = [OutputEntry(e.name, e.shape, from_torch(dtype) if kind == "numpy" else dtype)
                   for e in _entries(state)]
        w = SafetensorsStreamWriter(path, entries)
        for name, value in state.items():
            chunks = [value[:2], value[2:]] if name == "a" else [value]
            for chunk in chunks:
                raw = chunk.reshape(-1).view(torch.uint8).numpy().view(view).reshape(chunk.shape)
                w.write(name, chunk if kind == "torch" else raw)
        w.close()
        files.append(path.read_bytes())
    assert files[0] == files[1]
    back = load_file(str(tmp_path / "numpy.safetensors"))
    assert all(torch.equal(back[k], v) and back[k].dtype == dtype for k, v in state.items())


def test_stream_writer_refuses_a_chunk_of_another_width(tmp_path):
    """8 bytes of float32 for a bfloat16 tensor of 4 entries fill its range exactly: refused."""
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", [OutputEntry("w", (4,), "bf16")])
    with pytest.raises(ValueError, match=r"'w' holds 2-byte entries, but a chunk of 4-byte entries \(float32\)"):
        w.write("w", np.ones(2, np.float32))
    with pytest.raises(ValueError, match="4-byte entries"):
        w.write("w", torch.ones(2))
    w.write("w", np.zeros(4, np.uint16))
    w.close()
    assert torch.equal(load_file(str(tmp_path / "x.safetensors"))["w"], torch.zeros(4, dtype=torch.bfloat16))


def test_writer_refuses_a_dtype_safetensors_files_cannot_hold(tmp_path):
    with pytest.raises(OutputError, match=r"tensor 'c' has dtype complex64") as info:
        SafetensorsStreamWriter(tmp_path / "x.safetensors", [OutputEntry("c", (2,), torch.complex64)])
    assert "convert" in info.value.hint and not (tmp_path / "x.safetensors").exists()


def test_output_entry_takes_any_dtype_spelling():
    entries = {OutputEntry("w", [3, 2], d) for d in (torch.bfloat16, "bf16", "bfloat16", BY_CODE["BF16"])}
    assert len(entries) == 1
    (entry,) = entries
    assert entry.shape == (3, 2) and entry.nbytes == 12 and entry.dtype is torch.bfloat16


def test_stream_writer_refuses_out_of_order_and_short_writes(tmp_path):
    state = {"a": torch.ones(2, 2), "b": torch.ones(3)}
    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", _entries(state))
    with pytest.raises(RuntimeError, match="'b'"):
        w.write("b", state["b"])  # b's bytes come after a's
    w.write("a", state["a"])
    with pytest.raises(RuntimeError, match="closed after"):
        w.close()


def test_stream_writer_duplicate_copies_bytes(tmp_path):
    emb = torch.randn(4, 3)
    entries = [OutputEntry("emb", (4, 3), torch.float32), OutputEntry("head", (4, 3), torch.float32)]
    w = SafetensorsStreamWriter(tmp_path / "t.safetensors", entries)
    w.write("emb", emb)
    w.duplicate("head", "emb")
    w.close()
    back = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(back["emb"], emb) and torch.equal(back["head"], emb)


def test_plan_shards_respects_size_and_groups():
    e = [OutputEntry(f"t{i}", (10,), torch.float32) for i in range(6)]  # 40 bytes each
    shards = plan_shards(e, 100)
    assert [len(s) for s in shards] == [2, 2, 2]
    big = [OutputEntry("big", (100,), torch.float32)]
    assert [len(s) for s in plan_shards(big + e[:1], 100)] == [1, 1]  # a larger tensor gets a shard alone
    groups = [[e[0]], [e[1], e[2]], [e[3]]]  # e1+e2 tied: never split
    assert [[x.name for x in s] for s in plan_shards(e[:4], 100, groups)] == [["t0"], ["t1", "t2"], ["t3"]]
    assert plan_shards([], 100) == []


def test_sharded_writer_index_covers_every_tensor(tmp_path):
    state = {f"layer{i}.weight": torch.full((4, 4), float(i)) for i in range(5)}
    w = ShardedWriter(tmp_path, [[e] for e in _entries(state)], shard_size=100)
    for k, v in state.items():
        w.write(k, None, v)
    w.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(state)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in state.values())
    assert sorted(set(index["weight_map"].values())) == w.files == [f"model-{i:05d}-of-00005.safetensors"
                                                                    for i in range(1, 6)]
    for k, f in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / f))[k], state[k])


def test_sharded_writer_one_file_has_no_index(tmp_path):
    state = {"a": torch.ones(2), "b": torch.zeros(3)}
    w = ShardedWriter(tmp_path, [[e] for e in _entries(state)], shard_size=10**9)
    for k, v in state.items():
        w.write(k, None, v)
    w.close()
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]


# ------------------------------------------------------------------ atomic_directory


def test_atomic_directory_renames_temp_sibling_into_place(tmp_path):
    final = tmp_path / "out"
    with atomic_directory(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".tiesmerge-tmp-")
        assert not final.exists()  # nothing at the final path until complete
        (tmp / "f.txt").write_text("x")
    assert (final / "f.txt").read_text() == "x"
    assert leftovers(final) == [final]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_atomic_directory_removes_temp_on_any_error(tmp_path, exc):
    final = tmp_path / "out"
    with pytest.raises(type(exc)):
        with atomic_directory(final) as tmp:
            (tmp / "half.safetensors").write_bytes(b"123")
            raise exc
    assert_no_output(final)


def test_atomic_directory_existing_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    write_earlier_manifest(final)  # a previous output: --force replaces only those
    with pytest.raises(OutputError, match="exists and is not empty") as info:
        with atomic_directory(final):
            pytest.fail("must not start")
    assert "--force" in info.value.hint
    # force: replaced only at the end; a failure leaves the old one intact
    with pytest.raises(RuntimeError):
        with atomic_directory(final, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("fail")
    assert sorted(os.listdir(final)) == ["old.txt", "tiesmerge.json"] and leftovers(final) == [final]
    with atomic_directory(final, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(final)) == ["new.txt"] and leftovers(final) == [final]


def test_atomic_directory_empty_existing_dir_is_fine(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    with atomic_directory(final) as tmp:
        (tmp / "a").write_text("a")
    assert (final / "a").is_file()


def test_atomic_directory_output_is_a_file(tmp_path):
    final = tmp_path / "out"
    final.write_text("I am a file")
    for force in (False, True):
        with pytest.raises(OutputError, match="is a file"):
            with atomic_directory(final, force=force):
                pass
    assert final.read_text() == "I am a file"


def test_atomic_directory_not_enough_space(tmp_path):
    with pytest.raises(OutputError, match="GiB"):
        with atomic_directory(tmp_path / "out", needed_bytes=1 << 62):
            pass
    assert_no_output(tmp_path / "out")


# ------------------------------------------------------------------ copy_model_files


def test_copy_model_files_skips_weights_and_follows_dtype(tmp_path):
    src = write_hf_dir(tmp_path / "src", {"w": torch.ones(2)}, shards=1,
                       config={"torch_dtype": "float32"}, extra_files={"README.md": "card", ".gitattributes": "x"})
    (src / "training_args.bin").write_bytes(b"pickle")
    (src / "sub").mkdir()
    (src / "sub" / "vocab.txt").write_text("a\nb\n")
    (src / "ckpt").mkdir()
    (src / "ckpt" / "model.safetensors").write_bytes(b"weights")
    dst = tmp_path / "dst"
    dst.mkdir()
    copied = copy_model_files(src, dst, dtype=torch.bfloat16)
    # only what a model needs: no folders (sub/), no pickles, no card
    assert sorted(copied) == sorted(["config.json", *TOKENIZER_FILES])
    assert sorted(os.listdir(dst)) == sorted(copied)
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert json.loads((src / "config.json").read_text())["torch_dtype"] == "float32"
    assert copy_model_files(None, dst) == []


@pytest.mark.parametrize("dtype", ["fp16", "float16", BY_CODE["F16"], torch.float16])
def test_copy_model_files_takes_a_descriptor_or_a_name(tmp_path, dtype):
    src = write_hf_dir(tmp_path / "src", {"w": torch.ones(2)}, config={"torch_dtype": "float32"}, tokenizer=False)
    dst = tmp_path / "dst"
    dst.mkdir()
    assert copy_model_files(src, dst, dtype=dtype) == ["config.json"]
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "float16"


def test_atomic_directory_restores_old_output_if_final_rename_fails(tmp_path, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    write_earlier_manifest(final)  # a previous output: --force replaces only those
    real_replace = os.replace

    def replace(src, dst):
        if os.path.basename(src).startswith(".tiesmerge-tmp-"):
            raise OSError(18, "Invalid cross-device link")
        return real_replace(src, dst)

    monkeypatch.setattr("tiesmerge.io.writer.os.replace", replace)
    with pytest.raises(OSError, match="cross-device"):
        with atomic_directory(final, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(os.listdir(final)) == ["old.txt", "tiesmerge.json"]
    assert leftovers(final) == [final]


def test_atomic_directory_removes_parents_it_created_on_failure(tmp_path):
    final = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(final):
            raise RuntimeError("fail")
    assert not (tmp_path / "a").exists()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "keep").write_text("k")  # an existing parent is never removed
    with pytest.raises(RuntimeError):
        with atomic_directory(final):
            raise RuntimeError("fail")
    assert sorted(os.listdir(tmp_path / "a")) == ["keep"]
    with atomic_directory(final) as tmp:
        (tmp / "x").write_text("x")
    assert (final / "x").is_file()
