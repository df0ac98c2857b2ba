"""Reading checkpoints: HF directories (sharded + index, one file), single files, pickles."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import tiesmerge
from helpers_ckpt import make_family, write_hf_dir, write_pickle, write_safetensors
from tiesmerge.dtypes import BY_CODE
from tiesmerge.errors import CheckpointError
from tiesmerge.io.checkpoint import PickleCheckpoint, SafetensorsCheckpoint, TensorInfo, open_checkpoint


@pytest.fixture
def family():
    return make_family(2)


def _layouts(tmp_path, state):
    """The same state dict in every supported on-disk layout."""
    return {
        "sharded_dir": write_hf_dir(tmp_path / "sharded", state, shards=3),
        "single_dir": write_hf_dir(tmp_path / "single", state),
        "file": write_safetensors(tmp_path / "weights.safetensors", state),
        "odd_name_dir": write_hf_dir(tmp_path / "odd", state, weight_name="weights.safetensors"),
    }


@pytest.mark.parametrize("layout", ["sharded_dir", "single_dir", "file", "odd_name_dir"])
def test_every_layout_reads_every_tensor(tmp_path, family, layout):
    base, _ = family
    path = _layouts(tmp_path, base)[layout]
    ckpt = open_checkpoint(path)
    try:
        assert isinstance(ckpt, SafetensorsCheckpoint)
        assert sorted(ckpt.names()) == sorted(base)
        for name, tensor in base.items():
            info = ckpt.info(name)
            assert info.shape == tuple(tensor.shape)
            assert info.dtype == tensor.dtype
            assert info.nbytes == tensor.numel() * tensor.element_size()
            assert torch.equal(ckpt.read(name), tensor)
        assert ckpt.label == str(path)
        assert all(f.is_file() and f.suffix == ".safetensors" for f in ckpt.files())
        assert ckpt.directory() == (path if path.is_dir() else None)
    finally:
        ckpt.close()


def test_sharded_directory_follows_the_index(tmp_path, family):
    base, _ = family
    path = write_hf_dir(tmp_path / "m", base, shards=3)
    ckpt = open_checkpoint(path)
    assert len(ckpt.files()) == 3
    # location names the shard that holds the tensor, so errors can name the file
    shards = {ckpt.location(n) for n in base}
    assert shards == {str(f) for f in ckpt.files()}


@pytest.mark.parametrize("layout", ["sharded_dir", "single_dir", "file"])
def test_row_slice_reads_equal_full_reads(tmp_path, family, layout):
    base, _ = family
    ckpt = open_checkpoint(_layouts(tmp_path, base)[layout])
    for name, tensor in base.items():
        full = ckpt.read(name)
        rows = tensor.shape[0]
        for rs in (slice(0, 1), slice(1, rows), slice(0, rows), slice(rows // 2, rows // 2 + 3)):
            assert torch.equal(ckpt.read(name, rs), full[rs]), (name, rs)


def test_state_dict_row_reads_and_scalars():
    state = {"w": torch.randn(6, 3), "s": torch.tensor(2.5)}
    ckpt = open_checkpoint(state, label="sd")
    assert torch.equal(ckpt.read("w", slice(2, 4)), state["w"][2:4])
    assert torch.equal(ckpt.read("s", slice(0, 1)), state["s"])  # 0-d: rows ignored
    assert ckpt.files() == [] and ckpt.directory() is None and ckpt.location("w") == "sd"


def test_state_dict_with_non_tensor_is_refused():
    with pytest.raises(CheckpointError, match="'step'.*not a torch.Tensor"):
        open_checkpoint({"w": torch.zeros(2), "step": 3}, label="sd")


def test_safetensors_scalar_tensor_row_read(tmp_path):
    path = write_safetensors(tmp_path / "s.safetensors", {"scale": torch.tensor(1.5), "w": torch.ones(3, 2)})
    ckpt = open_checkpoint(path)
    assert ckpt.info("scale").shape == ()
    assert torch.equal(ckpt.read("scale", slice(0, 1)), torch.tensor(1.5))


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_file_is_refused_by_default(tmp_path, family, suffix):
    base, _ = family
    path = write_pickle(tmp_path / f"model{suffix}", base)
    with pytest.raises(CheckpointError) as info:
        open_checkpoint(path)
    msg = str(info.value)
    assert str(path) in msg
    assert "pickle" in msg and "arbitrary code" in msg  # says why
    assert "allow_pickle" in (info.value.hint or "") or "--allow-pickle" in (info.value.hint or "")


def test_pickle_directory_is_refused_by_default(tmp_path, family):
    base, _ = family
    d = tmp_path / "hf-bin"
    write_pickle(d / "pytorch_model.bin", base)
    with pytest.raises(CheckpointError, match="pickle"):
        open_checkpoint(d)


def test_pickle_loaded_with_weights_only_when_allowed(tmp_path, family, monkeypatch):
    base, _ = family
    path = write_pickle(tmp_path / "model.pt", base)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ckpt = open_checkpoint(path, allow_pickle=True)
    assert isinstance(ckpt, PickleCheckpoint)
    assert calls and all(c.get("weights_only") is True for c in calls)
    assert sorted(ckpt.names()) == sorted(base)
    assert all(torch.equal(ckpt.read(n), t) for n, t in base.items())
    assert ckpt.files() == [path] and ckpt.location("lm_head.weight") == str(path)


def test_pickle_with_state_dict_key_is_unwrapped(tmp_path, family):
    base, _ = family
    path = tmp_path / "lightning.ckpt"
    torch.save({"state_dict": base}, path)
    ckpt = open_checkpoint(path, allow_pickle=True)
    assert sorted(ckpt.names()) == sorted(base)


def test_pickle_that_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        open_checkpoint(path, allow_pickle=True)


def test_pickle_models_merge_like_safetensors(tmp_path, family):
    base, fts = family
    b = write_pickle(tmp_path / "base" / "pytorch_model.bin", base).parent
    models = [write_pickle(tmp_path / f"ft{k}.pt", ft) for k, ft in enumerate(fts)]
    with pytest.raises(CheckpointError):
        tiesmerge.merge(b, models, "ties")
    got = tiesmerge.merge(b, models, "ties", allow_pickle=True)
    want = tiesmerge.merge(base, fts, "ties")
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_mixed_layouts_merge_like_state_dicts(tmp_path, family):
    base, fts = family
    b = write_hf_dir(tmp_path / "base", base, shards=3)
    m0 = write_safetensors(tmp_path / "ft0.safetensors", fts[0])
    got = tiesmerge.merge(b, [m0, fts[1]], "ties", density=0.5)
    want = tiesmerge.merge(base, fts, "ties", density=0.5)
    assert all(torch.equal(got[k], want[k]) for k in want)


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


# ------------------------------------------------------------------ tensor facts without torch


def test_tensor_info_takes_any_dtype_spelling_and_answers_torch_on_demand():
    infos = {TensorInfo((4, 3), d) for d in (torch.bfloat16, "bf16", BY_CODE["BF16"])}
    assert len(infos) == 1
    (info,) = infos
    assert (info.shape, info.itemsize, info.is_floating, info.numel, info.nbytes) == ((4, 3), 2, True, 12, 24)
    assert info.dtype is torch.bfloat16 and info.dtype_info.code == "BF16"
    scalar = TensorInfo(torch.Size([]), torch.int64)
    assert scalar.shape == () and (scalar.numel, scalar.nbytes, scalar.is_floating) == (1, 8, False)
    assert TensorInfo((2,), torch.float32) != TensorInfo((2,), torch.float16)


def test_file_infos_are_the_stored_dtypes(tmp_path):
    state = {"w": torch.ones(3, 2, dtype=torch.bfloat16), "ids": torch.arange(4), "mask": torch.ones(2, dtype=torch.bool)}
    ckpt = open_checkpoint(write_safetensors(tmp_path / "m.safetensors", state))
    assert {n: ckpt.info(n).dtype_info.code for n in state} == {"w": "BF16", "ids": "I64", "mask": "BOOL"}
    assert {n: ckpt.info(n).dtype for n in state} == {n: t.dtype for n, t in state.items()}


def test_unknown_dtype_code_is_refused_by_name(tmp_path):
    """A dtype safetensors knows but tiesmerge does not read (uint16) names the tensor and the code."""
    path = tmp_path / "u16.safetensors"
    save_file({"w": torch.zeros(2, dtype=torch.uint16)}, str(path))
    with pytest.raises(CheckpointError, match=r"u16.safetensors: tensor 'w' has dtype U16, which tiesmerge cannot read"):
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
