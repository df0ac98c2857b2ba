"""The tiesmerge.json manifest (manifest.py): recipe, input digests, counts, timings; the name a
reference model is recorded under; statistics checked against their models' digests."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import tiesmerge
from helpers_ckpt import assert_no_output, make_family, write_hf_dir
from tiesmerge.errors import IncompatibleCheckpointsError
from tiesmerge.io.checkpoint import open_checkpoint
from tiesmerge.manifest import check_stats_digests, reference_option
from tiesmerge.methods import Requirements, TaskArithmetic, Ties, method_config, option
from tiesmerge.methods.base import ModelPath
from tiesmerge.stats import StatsManifest, StatsSource, gram_matrices, save_stats
from tiesmerge.stats.files import combine_digests


def test_manifest_records_recipe_hashes_counts_and_timings(hf, tmp_path):
    base, _, b, ms = hf
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", density=0.5)
    man = json.loads((out / "tiesmerge.json").read_text())
    assert man["tiesmerge_version"] == tiesmerge.__version__
    assert man["recipe"]["method"] == "ties" and man["recipe"]["parameters"]["density"] == 0.5
    assert man["recipe"]["base"] == str(b)
    # sha256 of every input weight file
    base_files = man["inputs"]["base"]["files"]
    assert sorted(Path(f["path"]).name for f in base_files) == [f"model-{i:05d}-of-00003.safetensors"
                                                                for i in (1, 2, 3)]
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


# ---------------------------------------------------------------------------------------------- reference_option


@method_config
class Distil:
    """Two model options; the reference is the second one."""

    name: ClassVar[str] = "distil"
    paper: ClassVar[str] = "https://example.org/distil"
    summary: ClassVar[str] = "a method with two model options"

    teacher: ModelPath | None = option(None, "a model read for its own sake")
    anchor: ModelPath | None = option(None, "the reference model")
    via_requirements_only: bool = option(False, "name the reference in requirements() only")

    def requirements(self) -> Requirements:
        return Requirements(reference="/elsewhere" if self.via_requirements_only else self.anchor)

    def merge(self, tau, ctx):
        return tau.sum(0)


def test_reference_option_names_the_option_holding_the_reference(tmp_path):
    assert reference_option(Ties(sign_from=tmp_path / "multitask")) == "sign_from"  # a path, normalised
    assert reference_option(Distil(teacher="/t", anchor="/a")) == "anchor"
    assert reference_option(Distil(teacher="/t", via_requirements_only=True)) == "reference"
    assert reference_option(TaskArithmetic()) == "reference"  # no model option at all


# ---------------------------------------------------------------------------------------------- check_stats_digests


def _source(label: str, digest: str | None) -> StatsSource:
    manifest = None if digest == "no manifest" else StatsManifest("fisher", 4, model_digest=digest,
                                                                  model=f"{label}-model")
    return StatsSource(open_checkpoint({}, label=label), manifest, label)


FILES = [[{"path": "/m0/model-00001.safetensors", "sha256": "a" * 64}, {"path": "/m0/model-00002.safetensors",
                                                                          "sha256": "b" * 64}],
         [{"path": "/m1/model.safetensors", "sha256": "c" * 64}]]
DIGESTS = ["files:" + combine_digests([(Path(f["path"]).name, f["sha256"]) for f in files]) for files in FILES]


def test_statistics_of_their_own_models_pass():
    check_stats_digests([_source("s0", DIGESTS[0]), _source("s1", DIGESTS[1])], FILES, ["m0", "m1"])
    check_stats_digests([], FILES, ["m0", "m1"])  # methods without statistics


@pytest.mark.parametrize("digest", [None, "no manifest", "tensors:" + "0" * 64])
def test_statistics_without_a_files_digest_are_not_checked(digest):
    """Statistics of a module in memory record its tensors' digest (provenance only), or none."""
    check_stats_digests([_source("s0", DIGESTS[0]), _source("s1", digest)], FILES, ["m0", "m1"])


def test_statistics_of_another_model_name_both():
    with pytest.raises(IncompatibleCheckpointsError) as info:
        check_stats_digests([_source("s0", DIGESTS[0]), _source("s1", DIGESTS[0])], FILES, ["m0", "m1"])
    assert info.value.message == ("s1: these statistics were computed with another model (s1-model), not model 1 "
                                  "(m1): the weight files' digests differ")
    assert "in the models' order" in info.value.hint
    renamed = [[dict(FILES[0][0], path="/m0/renamed.safetensors"), FILES[0][1]], FILES[1]]  # names count too
    with pytest.raises(IncompatibleCheckpointsError, match="s0: these statistics were computed with another model"):
        check_stats_digests([_source("s0", DIGESTS[0])], renamed, ["m0"])
    check_stats_digests([_source("s0", DIGESTS[0])], [[]], ["state dict"])  # a model without files: nothing to check
