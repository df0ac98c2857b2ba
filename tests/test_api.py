"""What tiesmerge.merge does around the engine (api.py): the HF directory it writes, shards and
index, copied files, output dtypes, integer buffers, statistics recorded, and inputs left alone."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

import tiesmerge
from helpers_ckpt import (
    TOKENIZER_FILES,
    assert_no_output,
    assert_same_state,
    leftovers,
    load_dir,
    make_family,
    write_earlier_manifest,
    write_hf_dir,
    write_safetensors,
)
from helpers_merge import float_names, merge
from tiesmerge.errors import OutputError
from tiesmerge.io import writer as writer_mod
from tiesmerge.methods import Fisher
from tiesmerge.stats import Statistics, StatsManifest, files_digest, save_stats


def test_output_written_in_temp_sibling_then_renamed(hf, tmp_path, monkeypatch):
    base, fts, b, ms = hf
    out = tmp_path / "merged"
    seen = {}
    real_init = writer_mod.ShardedWriter.__init__

    def spy(self, directory, *args, **kwargs):
        seen["dir"] = directory
        seen["final_existed"] = out.exists()
        real_init(self, directory, *args, **kwargs)

    monkeypatch.setattr(writer_mod.ShardedWriter, "__init__", spy)
    result = tiesmerge.merge(b, ms, "ties", output=out)
    assert result == out
    assert seen["dir"].parent == out.parent.absolute()
    assert re.fullmatch(r"\.tiesmerge-tmp-[0-9a-f]{8}-\d+-.+", seen["dir"].name)
    assert seen["final_existed"] is False
    assert not seen["dir"].exists()
    assert leftovers(out) == [out.absolute()]
    assert_same_state(load_dir(out), tiesmerge.merge(base, fts, "ties"))


def test_sharded_output_index_covers_every_tensor(hf, tmp_path):
    base, fts, b, ms = hf
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", shard_size=700)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 2
    assert sorted(set(index["weight_map"].values())) == [s.name for s in shards]
    assert set(index["weight_map"]) == set(base)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    for s in shards:
        assert s.stat().st_size <= 700 + 1024 or len(load_file(str(s))) == 1  # header + at most shard_size
    assert_same_state(load_dir(out), tiesmerge.merge(base, fts, "ties"))
    assert not (out / "model.safetensors").exists()


def test_single_file_output_when_small(hf, tmp_path):
    base, fts, b, ms = hf
    out = tiesmerge.merge(b, ms, "average", output=tmp_path / "out")
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    assert_same_state(load_dir(out), tiesmerge.merge(base, fts, "average"))


def test_config_and_tokenizer_copied_from_base(hf, tmp_path):
    _, _, b, ms = hf
    (b / "merges.txt").write_text("a b\n")
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out")
    for name in ["config.json", "merges.txt", *TOKENIZER_FILES]:
        assert (out / name).read_bytes() == (b / name).read_bytes(), name
    assert not list(out.glob("model-*-of-00003.safetensors"))  # base's shards are not copied


def test_existing_output_refused_unless_force(hf, tmp_path):
    base, fts, b, ms = hf
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    write_earlier_manifest(out)  # a previous merge: --force replaces only those
    with pytest.raises(OutputError, match="not empty") as info:
        tiesmerge.merge(b, ms, "ties", output=out)
    assert str(out) in str(info.value)
    assert (out / "keep.txt").read_text() == "mine" and leftovers(out) == [out.absolute()]
    tiesmerge.merge(b, ms, "ties", output=out, force=True)
    assert not (out / "keep.txt").exists()
    assert_same_state(load_dir(out), tiesmerge.merge(base, fts, "ties"))
    assert leftovers(out) == [out.absolute()]


@pytest.mark.parametrize("dtype,want", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                        ("float64", torch.float64), (torch.bfloat16, torch.bfloat16)])
def test_dtype_changes_floating_outputs_only(hf, tmp_path, dtype, want):
    base, fts, b, ms = hf
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", dtype=dtype)
    got = load_dir(out)
    for k, t in got.items():
        assert t.dtype == (want if base[k].is_floating_point() else base[k].dtype), k
    ref = tiesmerge.merge(base, fts, "ties")
    torch.testing.assert_close(got["lm_head.weight"], ref["lm_head.weight"].to(want))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(want).removeprefix("torch.")
    assert json.loads((out / "tiesmerge.json").read_text())["output"]["dtype"] == str(want).removeprefix("torch.")


def test_output_dtype_defaults_to_the_base(tmp_path):
    base, fts = make_family(2, dtype=torch.bfloat16)
    fts[1] = {k: v.float() if v.is_floating_point() else v for k, v in fts[1].items()}  # a float32 fine-tune
    b = write_hf_dir(tmp_path / "base", base, config={"torch_dtype": "bfloat16"})
    ms = [write_safetensors(tmp_path / f"ft{k}.safetensors", ft) for k, ft in enumerate(fts)]
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out")
    got = load_dir(out)
    assert got["lm_head.weight"].dtype == torch.bfloat16
    assert got["model.position_ids"].dtype == torch.int64
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert_same_state(got, tiesmerge.merge(base, fts, "ties"))



@pytest.mark.parametrize("said", ["bfloat16", "int8", 5])
def test_the_outputs_config_names_the_dtype_its_weights_are_written_in(tmp_path, said):
    """hp68a c41: a base whose config.json said bfloat16 (or int8, or 5) over float32 weights passed it on to the
    merged model, whose float32 weights transformers would then load as bfloat16. A config that already names the
    written dtype is copied byte for byte."""
    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base, config={"torch_dtype": said, "dtype": said})
    ms = [write_safetensors(tmp_path / f"ft{k}.safetensors", ft) for k, ft in enumerate(fts)]
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == config["dtype"] == "float32" and load_dir(out)["lm_head.weight"].dtype == \
        torch.float32
    nested = write_hf_dir(tmp_path / "nested", base, config={"torch_dtype": "bfloat16", "text_config": {
        "torch_dtype": "bfloat16"}, "kv_cache_config": {"dtype": "int8"}})  # hp69a c51: not a weights' dtype
    tiesmerge.merge(nested, ms, "ties", output=tmp_path / "out3")
    config = json.loads((tmp_path / "out3" / "config.json").read_text())
    assert config["text_config"]["torch_dtype"] == "float32" and config["kv_cache_config"]["dtype"] == "int8"
    right = write_hf_dir(tmp_path / "right", base, config={"torch_dtype": "float32"})
    tiesmerge.merge(right, ms, "ties", output=tmp_path / "out2")
    assert (tmp_path / "out2" / "config.json").read_bytes() == (right / "config.json").read_bytes()


def test_a_copied_json_file_holding_nan_is_said(tmp_path):
    """hp68a c42: a base's generation_config.json holding NaN and 1e400 was copied without a word (a truncated one is
    refused)."""
    from tiesmerge.errors import MergeWarning

    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    (b / "generation_config.json").write_text('{"bos_token_id": 1e400, "max_length": NaN, "eos": [1, 2]}')
    ms = [write_safetensors(tmp_path / f"ft{k}.safetensors", ft) for k, ft in enumerate(fts)]
    with pytest.warns(MergeWarning, match=r"generation_config.json holds number\(s\) that are not finite "
                                          r"\(bos_token_id = inf, max_length = nan: "):
        tiesmerge.merge(b, ms, "ties", output=tmp_path / "out")
    assert "NaN" in (tmp_path / "out" / "generation_config.json").read_text()  # carried as it is

def test_integer_and_bool_tensors_copied_from_the_base(tmp_path):
    base, fts = make_family(2)
    base["mask"] = torch.tensor([True, False, True])
    for k, ft in enumerate(fts):
        ft["model.position_ids"] = ft["model.position_ids"] + 100 * (k + 1)  # differs: must not matter
        ft["mask"] = torch.tensor([False, False, k == 0])
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    for out in (tiesmerge.merge(b, ms, "ties", dtype="bfloat16"),
                load_dir(tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", dtype="bfloat16"))):
        assert out["model.position_ids"].dtype == torch.int64
        assert torch.equal(out["model.position_ids"], base["model.position_ids"])
        assert out["mask"].dtype == torch.bool and torch.equal(out["mask"], base["mask"])
    man = json.loads((tmp_path / "out" / "tiesmerge.json").read_text())
    assert man["tensors"]["copied"] == 2


def test_progress_bar_runs(hf, tmp_path, capsys):
    _, _, b, ms = hf
    tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", progress=True)
    assert "merging" in capsys.readouterr().err


# ---------------------------------------------------------------- files, CLI-facing API and errors
def test_merge_from_statistics_directories_records_them(tmp_path):
    base, models = make_family(2)
    write_hf_dir(tmp_path / "base", base)
    dirs = [write_hf_dir(tmp_path / f"ft{k}", m) for k, m in enumerate(models)]
    names = float_names(base)
    stats_dirs = [save_stats(tmp_path / f"fisher{k}", Statistics(StatsManifest("fisher", 1, model_digest=files_digest(
        dirs[k])), {n: torch.rand(base[n].shape) for n in names})) for k in range(2)]
    out = tiesmerge.merge(tmp_path / "base", dirs, "fisher", stats=stats_dirs, output=tmp_path / "out")
    manifest = (out / "tiesmerge.json").read_text()
    assert "fisher" in manifest and str(stats_dirs[0]) in manifest
    in_memory = merge(base, models, Fisher(), [str(d) for d in stats_dirs])
    from safetensors.torch import load_file
    written = load_file(out / "model.safetensors")
    for n in names:
        assert torch.equal(written[n], in_memory[n])


# ------------------------------------------------------------------ inputs are left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", ["ties", "average", "task_arithmetic"])
def test_merge_never_modifies_the_callers_state_dicts(tmp_path, dtype, method):
    """Regression: a float32 CPU base was read without a copy and the merge added into it in place."""
    base, fts = make_family(2, dtype=dtype)
    before = [{k: v.clone() for k, v in sd.items()} for sd in (base, *fts)]
    first = tiesmerge.merge(base, fts, method)
    tiesmerge.merge(base, fts, method, output=tmp_path / "out")
    for sd, snapshot in zip((base, *fts), before, strict=True):
        assert_same_state(sd, snapshot)
    assert_same_state(tiesmerge.merge(base, fts, method), first)  # so merging twice gives the same result


def test_merge_never_modifies_pickle_inputs(tmp_path):
    base, fts = make_family(2)
    path = tmp_path / "base.pt"
    torch.save(base, path)
    raw = path.read_bytes()
    ms = [write_safetensors(tmp_path / f"ft{k}.safetensors", ft) for k, ft in enumerate(fts)]
    a = tiesmerge.merge(path, ms, "ties", allow_pickle=True)
    b = tiesmerge.merge(path, ms, "ties", allow_pickle=True)
    assert_same_state(a, b)
    assert path.read_bytes() == raw


def test_error_does_not_wait_for_hashing_every_input(tmp_path, monkeypatch):
    """On an error the files not hashed yet are skipped, so the error shows at once."""
    import tiesmerge.io.card as card

    base, fts = make_family(2)
    fts[1]["model.norm.weight"][0] = float("nan")
    b = write_hf_dir(tmp_path / "base", base, shards=3)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft, shards=3) for k, ft in enumerate(fts)]
    real, calls = card._sha256, []

    def slow(path):
        calls.append(path)
        import time
        time.sleep(0.2)
        return real(path)

    monkeypatch.setattr(card, "_sha256", slow)
    with pytest.raises(tiesmerge.errors.InvalidTensorError):
        tiesmerge.merge(b, ms, "ties", output=tmp_path / "out")
    assert len(calls) < 9
    assert_no_output(tmp_path / "out")
