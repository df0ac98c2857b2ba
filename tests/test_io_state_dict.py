"""In-memory state dicts and PyTorch pickles (io/state_dict.py): row reads, refusals, and pickles
loaded with weights_only."""

from __future__ import annotations

import pytest
import torch

from helpers_ckpt import write_pickle
from tiesmerge.errors import CheckpointError
from tiesmerge.io.checkpoint import PickleCheckpoint, open_checkpoint


def test_state_dict_row_reads_and_scalars():
    state = {"w": torch.randn(6, 3), "s": torch.tensor(2.5)}
    ckpt = open_checkpoint(state, label="sd")
    assert torch.equal(ckpt.read("w", slice(2, 4)), state["w"][2:4])
    assert torch.equal(ckpt.read("s", slice(0, 1)), state["s"])  # 0-d: rows ignored
    assert ckpt.files() == [] and ckpt.directory() is None and ckpt.location("w") == "sd"


def test_state_dict_with_non_tensor_is_refused():
    with pytest.raises(CheckpointError, match="'step'.*not a torch.Tensor"):
        open_checkpoint({"w": torch.zeros(2), "step": 3}, label="sd")


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
