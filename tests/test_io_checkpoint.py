"""Opening checkpoints (io/checkpoint.py): which reader every layout gets (HF directories, sharded
with an index or one file, single files, pickles refused unless allowed), and merges of them."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from helpers_ckpt import write_hf_dir, write_layouts, write_pickle, write_safetensors
from tiesmerge.errors import CheckpointError
from tiesmerge.io.checkpoint import SafetensorsCheckpoint, open_checkpoint


@pytest.mark.parametrize("layout", ["sharded_dir", "single_dir", "file", "odd_name_dir"])
def test_every_layout_reads_every_tensor(tmp_path, family, layout):
    base, _ = family
    path = write_layouts(tmp_path, base)[layout]
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
