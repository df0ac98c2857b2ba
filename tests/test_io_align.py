"""Alignment (io/align.py): its jobs' dtype facts without torch, tied tensors found from stored bytes
or by identity and merged once, integer tensors, and the vocabulary policy."""

from __future__ import annotations

import json

import pytest
import torch

import tiesmerge
from helpers_ckpt import (
    assert_no_output,
    assert_same_state,
    finetune,
    load_dir,
    make_base,
    make_family,
    write_hf_dir,
)
from tiesmerge.dtypes import BY_CODE
from tiesmerge.errors import IncompatibleCheckpointsError
from tiesmerge.io.align import TensorJob, align
from tiesmerge.io.checkpoint import open_checkpoint


def test_tensor_job_takes_any_dtype_spelling():
    jobs = {TensorJob("w", (3, 4), d, True) for d in (torch.bfloat16, "bf16", BY_CODE["BF16"])}
    assert len(jobs) == 1
    (job,) = jobs
    assert (job.itemsize, job.is_floating, job.numel, job.nbytes, job.aliases) == (2, True, 12, 24, ())
    assert job.dtype is torch.bfloat16 and job.dtype_info.code == "BF16"
    tied = TensorJob("emb", [10, 4], torch.float32, merge=True, aliases=["head"])
    assert tied.shape == (10, 4) and tied.aliases == ("head",) and tied.merge
    assert not TensorJob("ids", (5,), torch.int64, merge=False).is_floating


@pytest.mark.parametrize("head_row", [None, 0, 3])
def test_tied_head_found_from_the_first_rows_in_every_input(tmp_path, head_row):
    """Tied when the head's rows equal the embedding's in the base and every model (rows are compared as stored
    bytes, so files need no torch); a model whose head differs anywhere was trained untied, and the base's config ties
    the two again when the output is loaded: refused, its head's change would be lost (hp30 F1)."""
    base = make_base(0)
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    model = {k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()}
    model["lm_head.weight"] = model["model.embed_tokens.weight"].clone()
    if head_row is not None:
        model["lm_head.weight"][head_row, 0] += 1.0
    cfg = {"tie_word_embeddings": True}
    b = open_checkpoint(write_hf_dir(tmp_path / "b", base, config=cfg))
    m = open_checkpoint(write_hf_dir(tmp_path / "m", model, shards=2, config=cfg))
    if head_row is not None:
        with pytest.raises(IncompatibleCheckpointsError, match="changes 'lm_head.weight' apart from"):
            align(b, [m])
        return
    alignment = align(b, [m])
    want = (("model.embed_tokens.weight", "lm_head.weight"),)
    assert alignment.tied == want
    assert len(alignment.jobs) == len(base) - len(want)


def test_integer_tensor_missing_in_a_model_is_fine(tmp_path):
    base, fts = make_family(2)
    del fts[0]["model.position_ids"]
    got = tiesmerge.merge(base, fts, "ties")
    assert torch.equal(got["model.position_ids"], base["model.position_ids"])


# ------------------------------------------------------------------ tied weights


def _tied_family(n=2):
    base = make_base(1)
    base["lm_head.weight"] = base["model.embed_tokens.weight"]  # one tensor, two names
    fts = []
    for k in range(n):
        ft = finetune(base, 50 + k)
        ft["lm_head.weight"] = ft["model.embed_tokens.weight"]
        fts.append(ft)
    return base, fts


def _without_head(state):
    return {k: v for k, v in state.items() if k != "lm_head.weight"}


def test_tied_state_dict_merged_once_and_stays_tied(tmp_path):
    base, fts = _tied_family()
    got = tiesmerge.merge(base, fts, "ties")
    assert got["lm_head.weight"] is got["model.embed_tokens.weight"]
    # merged once: the same as merging without the alias (a second copy would shift the global threshold)
    once = tiesmerge.merge(_without_head(base), [_without_head(f) for f in fts], "ties")
    assert torch.equal(got["model.embed_tokens.weight"], once["model.embed_tokens.weight"])
    plan = tiesmerge.plan_merge(base, fts, "ties")
    assert sum(len(j.aliases) for j in plan.jobs) == 1
    out = tiesmerge.merge(base, fts, "ties", output=tmp_path / "out")
    files = load_dir(out)
    assert torch.equal(files["lm_head.weight"], files["model.embed_tokens.weight"])
    assert torch.equal(files["lm_head.weight"], once["model.embed_tokens.weight"])
    man = json.loads((out / "tiesmerge.json").read_text())
    assert man["tensors"]["tied_aliases"] == 1
    assert man["alignment"]["tied"] == [["model.embed_tokens.weight", "lm_head.weight"]]


def test_tied_hf_files_by_config(tmp_path):
    base, fts = _tied_family()
    b = write_hf_dir(tmp_path / "base", base, shards=2, config={"tie_word_embeddings": True})
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft, config={"tie_word_embeddings": True}) for k, ft in enumerate(fts)]
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", shard_size=600)
    files = load_dir(out)
    once = tiesmerge.merge(_without_head(base), [_without_head(f) for f in fts], "ties")
    assert torch.equal(files["lm_head.weight"], files["model.embed_tokens.weight"])
    assert torch.equal(files["lm_head.weight"], once["model.embed_tokens.weight"])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["lm_head.weight"] == index["weight_map"]["model.embed_tokens.weight"]
    man = json.loads((out / "tiesmerge.json").read_text())
    assert man["tensors"]["tied_aliases"] == 1


def test_untied_config_merges_both_names(tmp_path):
    base, fts = _tied_family()
    b = write_hf_dir(tmp_path / "base", base, config={"tie_word_embeddings": False})
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft, config={"tie_word_embeddings": False}) for k, ft in enumerate(fts)]
    plan = tiesmerge.plan_merge(b, ms, "ties")
    assert sum(len(j.aliases) for j in plan.jobs) == 0
    assert "lm_head.weight" in {j.name for j in plan.jobs if j.merge}


def test_head_equal_to_embedding_only_in_base_is_not_tied(tmp_path):
    """A fine-tune that untied its head: the names are merged separately."""
    base, fts = _tied_family()
    fts[1] = dict(fts[1])
    fts[1]["lm_head.weight"] = fts[1]["lm_head.weight"] + 0.5
    got = tiesmerge.merge(base, fts, "ties")
    assert got["lm_head.weight"] is not got["model.embed_tokens.weight"]
    assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])


# ------------------------------------------------------------------ vocabulary


def _grown_vocab(ft, extra=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = dict(ft)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        out[name] = torch.cat([ft[name], torch.randn(extra, ft[name].shape[1], generator=g)])
    return out


def test_vocab_mismatch_errors_by_default(tmp_path):
    base, fts = make_family(2)
    fts[1] = _grown_vocab(fts[1])
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    with pytest.raises(IncompatibleCheckpointsError) as info:
        tiesmerge.merge(b, ms, "ties", output=tmp_path / "out")
    msg = str(info.value)
    assert "model.embed_tokens.weight" in msg or "lm_head.weight" in msg
    assert "(32, 8)" in msg and "(36, 8)" in msg and str(ms[1]) in msg
    assert "truncate" in info.value.hint
    assert_no_output(tmp_path / "out")


def test_vocab_truncate_keeps_base_rows_and_is_recorded(tmp_path):
    base, fts = make_family(2)
    grown = _grown_vocab(fts[1])
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / "ft0", fts[0]), write_hf_dir(tmp_path / "ft1", grown)]
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", vocab_policy="truncate")
    got = load_dir(out)
    assert got["model.embed_tokens.weight"].shape == (32, 8)
    assert_same_state(got, tiesmerge.merge(base, fts, "ties"))  # same as if the model had the base's vocab
    man = json.loads((out / "tiesmerge.json").read_text())
    assert man["alignment"]["vocab_policy"] == "truncate"
    assert man["recipe"]["vocab_policy"] == "truncate"
    assert sorted(man["alignment"]["truncated"], key=lambda d: d["tensor"]) == [
        {"tensor": "lm_head.weight", "model": 1, "from_rows": 36, "to_rows": 32},
        {"tensor": "model.embed_tokens.weight", "model": 1, "from_rows": 36, "to_rows": 32},
    ]


def test_vocab_truncate_does_not_grow_a_smaller_model(tmp_path):
    base, fts = make_family(2)
    fts[0] = {k: (v[:30] if k in ("model.embed_tokens.weight", "lm_head.weight") else v) for k, v in fts[0].items()}
    with pytest.raises(IncompatibleCheckpointsError, match="shapes differ"):
        tiesmerge.merge(base, fts, "ties", vocab_policy="truncate")
