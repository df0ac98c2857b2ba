"""The tiesmerge.json manifest (manifest.py): recipe, input digests, counts, timings; statistics
checked against their models' digests."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch

import tiesmerge
from helpers_ckpt import assert_no_output, make_family, write_hf_dir
from tiesmerge.errors import IncompatibleCheckpointsError
from tiesmerge.stats import gram_matrices, save_stats


def test_manifest_records_recipe_hashes_counts_and_timings(hf, tmp_path):
    base, _, b, ms = hf
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", density=0.5)
    man = json.loads((out / "tiesmerge.json").read_text())
    assert man["tiesmerge_version"] == tiesmerge.__version__
    assert man["recipe"]["method"] == "ties" and man["recipe"]["parameters"]["density"] == 0.5
    assert man["recipe"]["base"] == str(b)
    # sha256 of every input weight file
    base_files = man["inputs"]["base"]["files"]
    assert sorted(Path(f["path"]).name for f in base_files) == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [len(m["files"]) for m in man["inputs"]["models"]] == [1, 2]
    one = Path(man["inputs"]["models"][1]["files"][1]["path"])
    assert man["inputs"]["models"][1]["files"][1]["sha256"] == hashlib.sha256(one.read_bytes()).hexdigest()
    assert man["inputs"]["models"][1]["files"][1]["bytes"] == one.stat().st_size
    for entry in base_files + [f for m in man["inputs"]["models"] for f in m["files"]]:
        assert re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])
    n_float = sum(t.is_floating_point() for t in base.values())
    assert man["tensors"] == {"merged": n_float, "copied": len(base) - n_float, "tied_aliases": 0}
    assert {"prepare", "reduce", "merge", "total"} <= set(man["seconds"])
    assert all(isinstance(v, (int, float)) and v >= 0 for v in man["seconds"].values())
    assert man["engine"]["bytes_read"] > 0
    assert man["output"]["files"] == ["model.safetensors"]
    assert len(man["thresholds"]) == 2


def test_statistics_of_another_model_are_refused_by_digest(tmp_path):
    base, models = make_family(2)
    write_hf_dir(tmp_path / "base", base)
    dirs = [write_hf_dir(tmp_path / f"ft{k}", m) for k, m in enumerate(models)]
    holder = torch.nn.Module()
    holder.lm_head = torch.nn.Linear(8, 32, bias=False)
    with torch.no_grad():
        holder.lm_head.weight.copy_(models[0]["lm_head.weight"])
    stats = [gram_matrices(holder, [torch.randn(6, 8)], lambda m, b: m.lm_head(b), model=d) for d in dirs]
    save_stats(tmp_path / "g0", stats[0])
    save_stats(tmp_path / "g1", stats[1])
    ok = tiesmerge.merge(tmp_path / "base", dirs, "regmean", stats=[tmp_path / "g0", tmp_path / "g1"],
                         output=tmp_path / "ok")
    assert ok.is_dir()
    with pytest.raises(IncompatibleCheckpointsError, match="computed with another model"):
        tiesmerge.merge(tmp_path / "base", dirs, "regmean", stats=[tmp_path / "g1", tmp_path / "g0"],
                        output=tmp_path / "swapped")
    assert_no_output(tmp_path / "swapped")
