"""What tiesmerge.merge writes: the HF directory, shards + index, copied files, card, manifest,
dtypes, integer buffers, tied weights and vocabulary truncation."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiesmerge
from helpers_ckpt import (
    TOKENIZER_FILES,
    assert_no_output,
    finetune,
    leftovers,
    make_base,
    make_family,
    write_hf_dir,
    write_safetensors,
)
from tiesmerge.errors import IncompatibleCheckpointsError, OutputError
from tiesmerge.io import writer as writer_mod


def _load_dir(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = load_file(str(path / f))
        assert not set(part) & set(state), f"tensor in two shards: {set(part) & set(state)}"
        state.update(part)
    return state


def _assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(got[k], want[k]), k


@pytest.fixture
def hf(tmp_path):
    """base (3 shards + index, config, tokenizer files) and two fine-tunes as HF dirs."""
    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base, shards=3)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft, shards=k + 1) for k, ft in enumerate(fts)]
    return base, fts, b, ms


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
    assert re.fullmatch(r"\.merged\.tiesmerge-tmp-.+", seen["dir"].name)
    assert seen["final_existed"] is False
    assert not seen["dir"].exists()
    assert leftovers(out) == [out.absolute()]
    _assert_same(_load_dir(out), tiesmerge.merge(base, fts, "ties"))


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
    _assert_same(_load_dir(out), tiesmerge.merge(base, fts, "ties"))
    assert not (out / "model.safetensors").exists()


def test_single_file_output_when_small(hf, tmp_path):
    base, fts, b, ms = hf
    out = tiesmerge.merge(b, ms, "average", output=tmp_path / "out")
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    _assert_same(_load_dir(out), tiesmerge.merge(base, fts, "average"))


def test_config_and_tokenizer_copied_from_base(hf, tmp_path):
    _, _, b, ms = hf
    (b / "merges.txt").write_text("a b\n")
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out")
    for name in ["config.json", "merges.txt", *TOKENIZER_FILES]:
        assert (out / name).read_bytes() == (b / name).read_bytes(), name
    assert not list(out.glob("model-*-of-00003.safetensors"))  # base's shards are not copied


def test_model_card_front_matter_and_recipe(hf, tmp_path):
    _, _, b, ms = hf
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", density=0.3, lam=1.5)
    card = (out / "README.md").read_text()
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    front = yaml.safe_load(m.group(1))
    assert front["base_model"] == str(b)
    assert {"merge", "tiesmerge"} <= set(front["tags"])
    recipe = yaml.safe_load(re.search(r"```yaml\n(.*?)```", card, re.S).group(1))
    assert recipe["method"] == "ties"
    assert recipe["base"] == str(b) and recipe["models"] == [str(p) for p in ms]
    assert recipe["parameters"]["density"] == 0.3 and recipe["parameters"]["lam"] == 1.5
    for p in ms:
        assert str(p) in card
    assert "arxiv.org/abs/2306.01708" in card


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


def test_existing_output_refused_unless_force(hf, tmp_path):
    base, fts, b, ms = hf
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not empty") as info:
        tiesmerge.merge(b, ms, "ties", output=out)
    assert str(out) in str(info.value)
    assert (out / "keep.txt").read_text() == "mine" and leftovers(out) == [out.absolute()]
    tiesmerge.merge(b, ms, "ties", output=out, force=True)
    assert not (out / "keep.txt").exists()
    _assert_same(_load_dir(out), tiesmerge.merge(base, fts, "ties"))
    assert leftovers(out) == [out.absolute()]


@pytest.mark.parametrize("dtype,want", [("bfloat16", torch.bfloat16), ("float16", torch.float16),
                                        ("float64", torch.float64), (torch.bfloat16, torch.bfloat16)])
def test_dtype_changes_floating_outputs_only(hf, tmp_path, dtype, want):
    base, fts, b, ms = hf
    out = tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", dtype=dtype)
    got = _load_dir(out)
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
    got = _load_dir(out)
    assert got["lm_head.weight"].dtype == torch.bfloat16
    assert got["model.position_ids"].dtype == torch.int64
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _assert_same(got, tiesmerge.merge(base, fts, "ties"))


def test_integer_and_bool_tensors_copied_from_the_base(tmp_path):
    base, fts = make_family(2)
    base["mask"] = torch.tensor([True, False, True])
    for k, ft in enumerate(fts):
        ft["model.position_ids"] = ft["model.position_ids"] + 100 * (k + 1)  # differs: must not matter
        ft["mask"] = torch.tensor([False, False, k == 0])
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    for out in (tiesmerge.merge(b, ms, "ties", dtype="bfloat16"),
                _load_dir(tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", dtype="bfloat16"))):
        assert out["model.position_ids"].dtype == torch.int64
        assert torch.equal(out["model.position_ids"], base["model.position_ids"])
        assert out["mask"].dtype == torch.bool and torch.equal(out["mask"], base["mask"])
    man = json.loads((tmp_path / "out" / "tiesmerge.json").read_text())
    assert man["tensors"]["copied"] == 2


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
    files = _load_dir(out)
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
    files = _load_dir(out)
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
    got = _load_dir(out)
    assert got["model.embed_tokens.weight"].shape == (32, 8)
    _assert_same(got, tiesmerge.merge(base, fts, "ties"))  # same as if the model had the base's vocab
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


def test_progress_bar_runs(hf, tmp_path, capsys):
    _, _, b, ms = hf
    tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", progress=True)
    assert "merging" in capsys.readouterr().err


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
        _assert_same(sd, snapshot)
    _assert_same(tiesmerge.merge(base, fts, method), first)  # so merging twice gives the same result


def test_merge_never_modifies_pickle_inputs(tmp_path):
    base, fts = make_family(2)
    path = tmp_path / "base.pt"
    torch.save(base, path)
    raw = path.read_bytes()
    ms = [write_safetensors(tmp_path / f"ft{k}.safetensors", ft) for k, ft in enumerate(fts)]
    a = tiesmerge.merge(path, ms, "ties", allow_pickle=True)
    b = tiesmerge.merge(path, ms, "ties", allow_pickle=True)
    _assert_same(a, b)
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
