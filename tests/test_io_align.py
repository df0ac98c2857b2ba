"""Alignment's jobs: their dtype facts without torch, and tied tensors found from stored bytes."""

from __future__ import annotations

import pytest
import torch

from helpers_ckpt import make_base, write_hf_dir
from tiesmerge.dtypes import BY_CODE
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
    """Tied when the head's first rows equal the embedding's in the base and every model; a
    difference in any of the first four rows of one model unties them (rows are compared as
    stored bytes, so files need no torch)."""
    base = make_base(0)
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    model = {k: v + 0.01 if v.is_floating_point() else v for k, v in base.items()}
    model["lm_head.weight"] = model["model.embed_tokens.weight"].clone()
    if head_row is not None:
        model["lm_head.weight"][head_row, 0] += 1.0
    cfg = {"tie_word_embeddings": True}
    b = open_checkpoint(write_hf_dir(tmp_path / "b", base, config=cfg))
    m = open_checkpoint(write_hf_dir(tmp_path / "m", model, shards=2, config=cfg))
    alignment = align(b, [m])
    want = () if head_row is not None else (("model.embed_tokens.weight", "lm_head.weight"),)
    assert alignment.tied == want
    assert len(alignment.jobs) == len(base) - len(want)
