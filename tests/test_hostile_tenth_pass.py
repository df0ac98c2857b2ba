"""Issue 13, the tenth independent hostile pass: one case per finding, checked as the catalogue checks its cases."""

from __future__ import annotations

import os
import warnings

import pytest

import test_hostile_catalogue
from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import make_base, run_cli, write_hf_dir
from test_hostile_catalogue import _merge, check, snapshot

family = test_hostile_catalogue.family

DEEP = "(" * 499 + "a" + ")" * 499  # 999 characters: under the 1000-character limit on a pattern


def test_a_deeply_nested_exclude_pattern_is_refused(family, tmp_path, capsys):
    """F1: `--exclude` of 499 nested groups was "an unexpected RecursionError ... a bug" from re's parser."""
    inputs, b, ms = family
    before = snapshot(inputs)
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--method", "tsv_m", "--exclude", DEEP), capsys)
    check(rc, err, want_rc=2, needle=("nests groups 499 deep", "at most 50"), output=tmp_path / "out",
          inputs=inputs, before=before)
    assert "bug" not in err


def test_a_deeply_nested_alpha_pattern_names_the_adapter_config(tmp_path, capsys):
    """F1: the same key in a stranger's adapter_config.json `alpha_pattern`."""
    base = make_base(0)
    b = write_hf_dir(tmp_path / "inputs" / "base", base)
    adapters = [write_lora_dir(tmp_path / "inputs" / f"a{k}", random_lora(base, 2, k), alpha=4.0,
                               config={"alpha_pattern": {DEEP: 8}} if k == 0 else None) for k in range(2)]
    before = snapshot(tmp_path / "inputs")
    rc, _, err = run_cli(_merge(b, adapters, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=("adapter_config.json", "nests groups 499 deep"), output=tmp_path / "out",
          inputs=tmp_path / "inputs", before=before)


@pytest.mark.parametrize("weights", [(1, -1), (0, 0)])
def test_mergekit_linear_weights_summing_to_zero_say_how_to_fix_the_recipe(family, tmp_path, capsys, weights):
    """F2: the hint sent the user to `tiesmerge validate --help`'s options; the fix is the recipe's weights."""
    _, b, ms = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {ms[0]}\n    parameters: {{weight: {weights[0]}}}\n"
                      f"  - model: {ms[1]}\n    parameters: {{weight: {weights[1]}}}\n")
    for argv in (["validate", str(recipe)], ["merge", str(recipe), "-o", str(tmp_path / "out")]):
        rc, _, err = run_cli(argv, capsys)
        assert rc == 2 and "give weights with a nonzero sum" in err and "--help" not in err, err


def test_a_pipe_given_as_a_path_is_called_a_pipe(tmp_path):
    """Pass 9's NOTE pk3: `--data /proc/self/fd/0` with stdin a pipe was "a link to pipe:[...], which does not
    exist / fix or remove the dangling link"."""
    import os

    from tiesmerge.errors import CheckpointError
    from tiesmerge.paths import resolve

    read, write = os.pipe()
    try:
        with pytest.raises(CheckpointError) as caught:
            resolve(f"/proc/self/fd/{read}", "the data")
    finally:
        os.close(read)
        os.close(write)
    assert "is a pipe (pipe:[" in caught.value.message and "dangling" not in str(caught.value), str(caught.value)
    assert "regular files only" in caught.value.hint


def test_differing_vocabularies_suggest_union_too(tmp_path, capsys):
    """Pass 9's NOTE c33: the hint named only truncate, which drops every model's added tokens."""
    import torch

    from helpers_ckpt import finetune

    base = make_base(0)
    grown = finetune(base, 1)  # two tokens added after the base's 32
    grown["model.embed_tokens.weight"] = torch.cat([grown["model.embed_tokens.weight"],
                                                    base["model.embed_tokens.weight"][:2]])
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / "m0", finetune(base, 0)), write_hf_dir(tmp_path / "m1", grown)]
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out"), capsys)
    assert rc == 1 and "--vocab-policy union" in err and "--vocab-policy truncate" in err, err


def test_a_user_file_at_the_default_checkpoint_path_names_the_checkpoint_option(tmp_path):
    """Pass 9's NOTE ax1/ax2: the hint said "choose another path" without saying the path is --checkpoint's
    default beside the output."""
    import tiesmerge
    from test_adapt_hostile import _forward, _setup
    from tiesmerge.errors import OutputError

    base, fts, files = _setup(tmp_path)
    mine = tmp_path / "out.adapt-checkpoint.safetensors"
    mine.write_text("the user's own file")
    for force in (False, True):
        with pytest.raises(OutputError) as caught:
            tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, output=tmp_path / "out", force=force)
        assert "default checkpoint beside the output" in caught.value.hint and "--checkpoint" in caught.value.hint
        assert mine.read_text() == "the user's own file" and not (tmp_path / "out").exists()


def test_a_long_problem_list_is_capped_in_the_message():
    """Pass 9's NOTE: `validate` of a recipe naming 10,000 missing model paths printed 10,004 lines."""
    from tiesmerge.errors import MAX_LISTED, ConfigError

    error = ConfigError([f"model {k}: no such file" for k in range(10_000)])
    lines = error.message.splitlines()
    assert lines[0] == "10000 problems:" and len(lines) == MAX_LISTED + 2 and "and 9950 more" in lines[-1]
    assert len(error.problems) == 10_000


def test_a_quoted_tilde_in_the_output_is_named_as_the_working_folders(family, tmp_path, capsys):
    """Pass 9's NOTE k6: `-o "~/k6"` wrote ./~/k6 (as the shell would) but said "into ~/k6"."""
    _, b, ms = family
    rc, out, err = run_cli(_merge(b, ms, "~/k6"), capsys)
    assert rc == 0, err
    written = tmp_path / "work" / "~" / "k6"
    assert (written / "tiesmerge.json").is_file()
    assert "did not expand" in err and str(written) in err, err



def test_an_option_given_twice_is_said(family, tmp_path, capsys):
    """hp66a c26: `--density 0.2 --density 0.3` merged at 0.3 silently (argparse keeps the last); said, as a recipe's
    repeated key is. Repeatable options (--model) are not."""
    import json

    _, b, ms = family
    rc, out, err = run_cli(_merge(b, ms, tmp_path / "out", "--density", "0.2", "--density=0.3"), capsys)
    assert rc == 0, err
    assert "--density given twice: only the last value counts" in err and "--model" not in err
    # hp69a c06, c18, c19: a prefix argparse takes for the flag, a short option with its value attached
    for extra, said in ((["--memory", "1GiB", "--memory-budget", "2GiB"], "--memory then --memory-budget given twice"),
                        (["-o" + str(tmp_path / "x")], "-o given twice")):
        rc, out, err = run_cli(_merge(b, ms, tmp_path / "out2", "--dry-run", *extra), capsys)
        assert rc == 0 and said in err, err
    assert json.loads((tmp_path / "out" / "tiesmerge.json").read_text())["recipe"]["parameters"]["density"] == 0.3

def test_a_models_index_linked_outside_its_folder_is_not_read(family, tmp_path, capsys):
    """F3: a fine-tuned model's model.safetensors.index.json linking to a file elsewhere was opened (merged through,
    or its content echoed in the error); the base's was already refused."""
    import json
    import os

    from helpers_ckpt import finetune, make_base

    inputs, b, ms = family
    sharded = write_hf_dir(inputs / "sharded", finetune(make_base(0), 5), shards=2)
    index = sharded / "model.safetensors.index.json"
    secret = tmp_path / "elsewhere.json"
    secret.write_text(json.dumps({"weight_map": {"lm_head.weight": "TOPSECRET-123"}}))
    (tmp_path / "copy.json").write_text(index.read_text())  # a valid index, outside: merged through before
    index.unlink()
    for target in (secret, tmp_path / "copy.json"):
        if index.is_symlink():
            index.unlink()
        os.symlink(target, index)
        before = snapshot(inputs)
        rc, _, err = run_cli(_merge(b, [ms[0], sharded], tmp_path / "out"), capsys)
        check(rc, err, want_rc=1, needle=("the index file resolves to", "outside"), output=tmp_path / "out",
              inputs=inputs, before=before)
        assert "TOPSECRET" not in err


def test_float64_values_past_float32s_range_are_named_as_such(tmp_path, capsys):
    """F4: finite float64 weights of 1e300 were "Inf ... the checkpoint is damaged", after numpy's RuntimeWarning."""
    import torch
    from safetensors.torch import save_file

    import tiesmerge
    from tiesmerge.errors import InvalidTensorError

    base = {"w": torch.randn(4, 4, dtype=torch.float64)}
    paths = []
    for name, state in (("b", base), ("m0", {"w": base["w"] + 1e300}), ("m1", {"w": base["w"] + 1e300})):
        paths.append(tmp_path / "inputs" / f"{name}.safetensors")
        paths[-1].parent.mkdir(exist_ok=True)
        save_file(state, str(paths[-1]))
    before = snapshot(tmp_path / "inputs")
    for extra in ((), ("--dry-run",)):
        rc, _, err = run_cli(["merge", "--base", str(paths[0]), "--model", str(paths[1]), "--model", str(paths[2]),
                              "--method", "task_arithmetic", "-o", str(tmp_path / "out"), *extra], capsys)
        check(rc, err, want_rc=1, needle=("m0.safetensors: tensor 'w'", "beyond float32's range", "1e+300"),
              output=tmp_path / "out", inputs=tmp_path / "inputs", before=before)
        assert "Inf" not in err and "damaged" not in err and "RuntimeWarning" not in err, err
    with pytest.raises(InvalidTensorError, match="beyond float32's range"):
        tiesmerge.merge(base, [{"w": base["w"] + 1e300}, {"w": base["w"]}], "task_arithmetic")


def test_a_float16_adapter_whose_product_overflows_is_written_with_a_warning(tmp_path):
    """Pass 9's NOTE o6: `--dtype float16 --lam 1e9` wrote factors that fit float16 (|A| 9e3, |B| 1.3e4) whose
    product B·A is Inf where it is formed in float16, silently. PEFT upcasts float16 adapters to float32 by default, so
    the adapter is written (pass 8's F14 wants such factors kept), with a warning."""
    import tiesmerge
    from tiesmerge.errors import MergeWarning

    base = make_base(0)
    b = write_hf_dir(tmp_path / "inputs" / "base", base)
    adapters = [write_lora_dir(tmp_path / "inputs" / f"a{k}", random_lora(base, 2, k), alpha=4.0) for k in range(2)]
    one_warning = r"\(and 3 other tensor\(s\)\) reaches \|B·A\| = .* past float16's largest .* work on a float32 model"
    with pytest.warns(MergeWarning, match=one_warning):
        out = tiesmerge.merge(b, adapters, "task_arithmetic", lam=1e9, output=tmp_path / "out",
                              output_format="adapter", dtype="float16")
    assert (out / "adapter_model.safetensors").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)  # a product of ~1e3 fits: no warning of an overflow
        warnings.filterwarnings("ignore", "task_arithmetic: lam = 1000 scales", MergeWarning)  # (lam's own, hp27 N3)
        warnings.filterwarnings("ignore", "the merged LoRA adapter at rank 2 holds", MergeWarning)  # rank 2 of 2+2
        tiesmerge.merge(b, adapters, "task_arithmetic", lam=1e3, output=tmp_path / "ok", output_format="adapter",
                        dtype="float16")


def test_a_full_standard_output_after_the_merge_says_the_output_is_complete(family, tmp_path, capsys, monkeypatch):
    """Pass 9's NOTE p5: `merge > /dev/full` exited 1 with the complete output in place and no word about it."""
    import errno
    import sys

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

    _, b, ms = family
    monkeypatch.setattr(sys, "stdout", Full())
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out"), capsys)
    assert rc == 1 and "cannot write to standard output" in err, err
    assert f"the output {tmp_path / 'out'} was written completely" in err, err
    assert (tmp_path / "out" / "tiesmerge.json").is_file()
    rc, _, err = run_cli(["methods"], capsys)  # nothing written: no such claim
    assert rc == 1 and "was written completely" not in err, err


def test_a_consensus_lambda_past_float32s_range_is_refused(family, tmp_path, capsys):
    """F5: `--tall-lambda 1e39` was accepted (--lam refuses such values) and merged the base."""
    inputs, b, ms = family
    before = snapshot(inputs)
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--method", "consensus", "--tall-lambda", "1e39"), capsys)
    check(rc, err, want_rc=2, needle=("tall_lambda", "3.4e38"), output=tmp_path / "out", inputs=inputs,
          before=before)


def test_a_merge_that_changes_nothing_says_so(family, tmp_path, capsys):
    """F5: consensus of 2 models with k = 2 and tall_lambda 1 keeps no entry (|a| > |b| and |b| > |a| at once):
    the output was the base, silently."""
    _, b, ms = family
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--method", "consensus", "--k", "2", "--tall-lambda", "1"),
                         capsys)
    assert rc == 0 and "warning: consensus: the merge changed no entry" in err, err
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out2", "--method", "consensus", "--k", "1"), capsys)
    assert rc == 0 and "changed no entry" not in err, err


@pytest.mark.parametrize("revision", [".", "./main", "main/.", ".hidden", "a//b"])
def test_revisions_git_would_refuse_are_not_revisions(revision):
    """F6: `org/a@.` was "the cache's ref . ... is a directory", `org/a@./main` was read as main."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.hub import split_repo_id

    with pytest.raises(CheckpointError, match="is not a revision"):
        split_repo_id(f"org/a@{revision}")
    assert split_repo_id("org/a@refs/pr/1") == ("org", "a", "refs/pr/1")
    assert split_repo_id("org/a@v1.0") == ("org", "a", "v1.0")


def test_a_statistics_folders_index_linked_outside_is_not_read(tmp_path):
    """F3's class in a sharded statistics folder (the pass's sl4): its index is read only from inside."""
    import json
    import os

    import torch

    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.checkpoint import open_checkpoint

    folder = write_hf_dir(tmp_path / "stats", {"w": torch.ones(4, 4), "v": torch.ones(4)}, shards=2, tokenizer=False)
    outside = tmp_path / "outside.json"
    outside.write_text((folder / "model.safetensors.index.json").read_text())
    (folder / "model.safetensors.index.json").unlink()
    os.symlink(outside, folder / "model.safetensors.index.json")
    with pytest.raises(CheckpointError, match="the index file resolves to"):
        open_checkpoint(folder)
    assert json.loads(outside.read_text())["weight_map"]


def test_tune_scores_appear_only_with_the_best_merge(family, tmp_path, capsys, monkeypatch):
    """F7: `tune -o OUT --json S` wrote S, then the merge failed (a full disk): S stayed, and the same command was
    refused next time ("--json already exists ... pass --force")."""
    import errno

    import tiesmerge.api
    from tiesmerge.paths import write_error

    _, b, ms = family
    (tmp_path / "work" / "tenth_pass_eval.py").write_text("def score(state):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    scores, out = tmp_path / "scores.json", tmp_path / "best"
    argv = ["tune", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--evaluator",
            "tenth_pass_eval:score", "--grid", "density=0.5", "--grid", "lam=1", "--json", str(scores), "-o", str(out)]
    real = tiesmerge.api.merge

    def full_disk(*args, **kwargs):
        if kwargs.get("output") is not None:
            raise write_error(out / "model.safetensors", OSError(errno.ENOSPC, "No space left on device"))
        return real(*args, **kwargs)

    monkeypatch.setattr(tiesmerge.api, "merge", full_disk)
    rc, _, err = run_cli(argv, capsys)
    assert rc == 1 and "No space left" in err, err
    assert not scores.exists() and not out.exists(), list(tmp_path.iterdir())
    assert not list(tmp_path.glob(".tiesmerge-*")), list(tmp_path.iterdir())
    monkeypatch.setattr(tiesmerge.api, "merge", real)
    rc, _, err = run_cli(argv, capsys)  # the same command again, no --force needed
    assert rc == 0 and scores.is_file() and (out / "tiesmerge.json").is_file(), err


def test_an_evaluator_returning_a_tensor_that_requires_grad_is_read_quietly(recwarn):
    """F8: a 0-d tensor with requires_grad was read, after torch's UserWarning about converting it to a scalar."""
    import torch

    from tiesmerge.tuning.evaluator import guard

    weight = torch.tensor(0.75, requires_grad=True)
    evaluate = guard(lambda state: weight * 1.0, finite=True)
    assert evaluate({}) == 0.75
    assert not [w for w in recwarn if "requires_grad" in str(w.message)], [str(w.message) for w in recwarn]


def test_a_closed_pipe_on_standard_output_does_not_stop_the_work(family, tmp_path, capsys, monkeypatch):
    """F9: `tiesmerge tune ... -o OUT | head -1` exited 0 silently when head closed the pipe, with the remaining
    candidates never scored and OUT never written."""
    import sys

    class Closed:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    _, b, ms = family
    (tmp_path / "work" / "tenth_pass_pipe.py").write_text("def score(state):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    monkeypatch.setattr(sys, "stdout", Closed())
    out = tmp_path / "best"
    rc, _, err = run_cli(["tune", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--evaluator",
                          "tenth_pass_pipe:score", "--grid", "density=0.2,0.5", "--grid", "lam=1", "-o", str(out)],
                         capsys)
    assert rc == 0 and (out / "tiesmerge.json").is_file(), err


def test_analyze_offers_only_the_vocabulary_policies_it_runs(capsys):
    """F10: `analyze --help` offered {error,truncate,union}, and union was then refused."""
    from tiesmerge.cli.main import main

    with pytest.raises(SystemExit):
        main(["analyze", "--help"])
    out = capsys.readouterr().out
    assert "{error,truncate}" in out and "{error,truncate,union}" not in out, out


def test_a_local_folder_shadowing_a_cached_repository_is_said(tmp_path, monkeypatch):
    """Pass 9's NOTE rid1: a folder `org/a` beside the command won over the cached repository org/a, silently."""
    from tiesmerge.errors import MergeWarning
    from tiesmerge.hub import resolve_source

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub" / "models--org--a").mkdir(parents=True)
    (tmp_path / "work" / "org" / "a").mkdir(parents=True)
    (tmp_path / "work" / "org" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "work")
    with pytest.warns(MergeWarning, match="read from the local folder of that name, not from the Hugging Face"):
        assert resolve_source("org/a") == "org/a"
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        assert resolve_source("org/b") == "org/b"  # no repository of that name is cached: nothing to say


def test_a_staged_file_left_by_a_killed_run_is_removed_by_the_next(family, tmp_path, capsys, monkeypatch):
    """F11 (a regression of F7's fix): a tune killed outright (SIGKILL) while its --json was staged left
    `.tiesmerge-file-<pid>-....tmp` beside it, which no later run removed."""
    import subprocess
    import sys

    from tiesmerge.paths import write_file
    from tiesmerge.scratch import host_tag

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: its pid names a dead run
    left = tmp_path / f".tiesmerge-file-{host_tag()}-{pid}-abc123"
    left.write_text('{"partial": ')
    mine = tmp_path / f".tiesmerge-file-{host_tag()}-{os.getpid()}-def456"  # this process's own: kept
    mine.write_text("in progress")
    write_file(tmp_path / "scores.json", "{}\n")
    assert not left.exists() and mine.exists() and (tmp_path / "scores.json").read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, "inputs", "scores.json", "work"])
    _, b, ms = family
    (tmp_path / "work" / "tenth_pass_staged.py").write_text("def score(state):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    rc, _, err = run_cli(["tune", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--evaluator",
                          "tenth_pass_staged:score", "--grid", "lam=1", "--json",
                          str(tmp_path / ".tiesmerge-file-00000000-1-x")], capsys)
    assert rc == 1 and "tiesmerge's own temporary files" in err, err


@pytest.mark.parametrize("value,needle", [(1e20, "overflows float32: its factors are finite"),
                                          (float("inf"), "the LoRA factor")])
def test_a_lora_whose_product_overflows_is_not_called_damaged(tmp_path, capsys, value, needle):
    """F4 (addendum): LoRA factors of 1e20 (finite) whose B·A overflows float32 were "tensor ... holds Inf ... the
    checkpoint is damaged", naming a tensor the adapter file does not hold."""
    base = make_base(0)
    b = write_hf_dir(tmp_path / "inputs" / "base", base)
    factors = random_lora(base, 2, 0)
    factors = {m: (a * 0 + value, b_ * 0 + value) for m, (a, b_) in factors.items()}
    adapters = [write_lora_dir(tmp_path / "inputs" / "a0", factors, alpha=4.0),
                write_lora_dir(tmp_path / "inputs" / "a1", random_lora(base, 2, 1), alpha=4.0)]
    before = snapshot(tmp_path / "inputs")
    rc, _, err = run_cli(_merge(b, adapters, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=("a0/adapter_model.safetensors", needle), output=tmp_path / "out",
          inputs=tmp_path / "inputs", before=before)
    if value != float("inf"):
        assert "damaged" not in err, err


def test_a_huge_path_is_abridged_in_the_error(family, tmp_path, capsys):
    """F12: a 100,000-character --base (or a 900,000-character path in a recipe) was echoed whole in the error."""
    inputs, b, ms = family
    before = snapshot(inputs)
    huge = "/" + "y" * 100_000
    rc, _, err = run_cli(["merge", "--base", huge, "--model", str(ms[0]), "--model", str(ms[1]), "-o",
                          str(tmp_path / "out")], capsys)
    check(rc, err, want_rc=1, needle=("characters]…", "at most 4096 bytes"), output=tmp_path / "out", inputs=inputs,
          before=before)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {'z' * 900_000}\nmodels: [{ms[0]}, {ms[1]}]\n")
    rc, _, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert rc != 0 and len(err) < 4000 and "characters]" in err, err[:300]


def test_statistics_of_an_adapter_folder_say_it_is_no_model(tmp_path, capsys):
    """F13: `stats fisher --model LORA_DIR` (adapter files only) said the adapter lay "beside its model files"."""
    base = make_base(0)
    adapter = write_lora_dir(tmp_path / "inputs" / "a0", random_lora(base, 2, 0), alpha=4.0)
    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "hello", "label": 0}\n')
    before = snapshot(tmp_path / "inputs")
    rc, _, err = run_cli(["stats", "fisher", "--model", str(adapter), "--data", str(data), "-o",
                          str(tmp_path / "out")], capsys)
    check(rc, err, want_rc=1, needle=("is a PEFT adapter (adapter_config.json), not a model", "merge_and_unload"),
          output=tmp_path / "out", inputs=tmp_path / "inputs", before=before)
    assert "beside its model files" not in err


def test_adapt_does_not_warn_that_its_merge_changed_nothing(tmp_path):
    """F15 (a regression of F5's warning): every `adapt` printed "the merge changed no entry ... the output is the
    base itself": its task-vector pass returns zero deltas by design."""
    import tiesmerge
    from test_adapt_hostile import _forward, _setup

    base, fts, files = _setup(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test: none is expected here
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, output=tmp_path / "out")
    assert (tmp_path / "out" / "tiesmerge.json").is_file()


def test_an_error_raised_by_code_a_stop_signal_interrupted_is_the_stop(capsys, monkeypatch):
    """The suite's SIGVTALRM case once exited 1 with "unexpected RuntimeError: release unlocked lock": the signal's
    exception landed inside a lock's release in the writer's wait, and the lock's own error escaped instead."""
    import importlib
    import signal

    cli_main = importlib.import_module("tiesmerge.cli.main")  # the module (tiesmerge.cli.main is also its function)

    def interrupted(args):
        cli_main._stopping = True
        cli_main._stopped_by = cli_main.Terminated(signal.SIGVTALRM)
        raise RuntimeError("release unlocked lock")

    monkeypatch.setitem(cli_main.HANDLERS, "methods", interrupted)
    rc = cli_main.main(["methods"])
    err = capsys.readouterr().err
    assert rc == 128 + signal.SIGVTALRM and "terminated by SIGVTALRM" in err and "unexpected" not in err, err


@pytest.mark.parametrize("labels,needle", [
    ({"heads": {"task0": [], "task1": ["a", "b"]}}, "--heads of task 'task0' holds 0 class descriptions"),
    ({"heads": {"task0": ["a"], "task1": ["a", "b"]}}, "holds 1 class description: adapt minimizes the entropy"),
    ({"heads": {"task0": ["", "b"], "task1": ["a", "b"]}}, "entry 0 is empty"),
    ({"choices": {"task0": [], "task1": ["w3", "w4"]}}, "--choices of task 'task0' holds 0 answer choices"),
    ({"choices": {"other": ["a", "b"]}}, "--choices names 'other', which is no task (the tasks are 'task0', 'task1')"),
])
def test_adapt_checks_heads_and_choices_before_the_work(tmp_path, monkeypatch, labels, needle):
    """F17/F18: an empty --choices list was "unexpected ValueError ... a bug", after the model was loaded and the task
    vectors computed; empty, one-class or blank --heads were accepted (entropy over one class is always 0)."""
    import tiesmerge
    import tiesmerge.adamerging.run as adapt_run
    from test_adapt_hostile import _forward, _setup
    from tiesmerge.errors import ConfigError

    base, fts, files = _setup(tmp_path)

    def no_work(*args, **kwargs):
        raise AssertionError("the task vectors were computed before the labels were checked")

    monkeypatch.setattr(adapt_run, "collect_task_vectors", no_work)
    with pytest.raises(ConfigError) as caught:
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, **labels)
    assert needle in str(caught.value), str(caught.value)


def test_the_encoder_forward_accepts_a_checkpoint_with_a_pooler(recwarn):
    """F18: plain BertModel checkpoints hold pooler.dense.*, which the encoder forward (mean pooling) never loads:
    they were refused after the work; now merged at their initial coefficients, said in a warning."""
    import torch

    from tiesmerge.adamerging.learn import check_forward_names
    from tiesmerge.errors import ConfigError, MergeWarning

    class Forward(torch.nn.Module):
        prefix = "encoder.model."
        unused_prefixes = ("pooler.",)

        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Module()
            self.encoder.model = torch.nn.Linear(2, 2)

    names = ["weight", "bias", "pooler.dense.weight", "pooler.dense.bias"]
    with pytest.warns(MergeWarning, match="2 merged tensor\\(s\\) are not read by the forward"):
        assert check_forward_names(Forward(), names) == {"pooler.dense.weight", "pooler.dense.bias"}
    with pytest.raises(ConfigError, match="3 of the 4 merged tensors are not weights of the forward's model"):
        check_forward_names(Forward(), ["weight", "classifier.weight", "classifier.bias", "head.weight"])


def test_analyze_describes_only_the_models_that_change_the_base(family, tmp_path, capsys):
    """F14: with model 0 a copy of the base, the reading said "the figures below describe the others", then averaged
    model 0's 0 % into the L1 share and its empty mask into the Jaccard index (0.000 against 0.000)."""
    import shutil

    inputs, b, ms = family
    shutil.copytree(b, inputs / "copy")
    rc, out, err = run_cli(["analyze", "--base", str(b), "--model", str(inputs / "copy"), "--model", str(ms[0]),
                            "-o", str(tmp_path / "an"), "--no-progress"], capsys)
    assert rc == 0, err
    assert "from 0.0%" not in out and "Only model 1 changes the base" in out and "Jaccard" not in out, out
    rc, out, err = run_cli(["analyze", "--base", str(b), "--model", str(inputs / "copy"), "--model", str(ms[0]),
                            "--model", str(ms[1]), "-o", str(tmp_path / "an2"), "--no-progress"], capsys)
    assert rc == 0 and "against 0.000 for independent" not in out and "Jaccard index of" in out, out


def test_a_whole_tensor_budget_hint_names_a_budget_that_works(family, tmp_path, capsys):
    """F16: `tsv_m --memory-budget 200KiB` was refused with "raise --memory-budget to 64.11 MiB", while 1 MiB
    (and far less) was accepted."""
    import math
    import re

    _, b, ms = family
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--method", "tsv_m", "--memory-budget", "1KiB", "--dry-run"),
                         capsys)
    assert rc == 2, err
    hinted = re.search(r"raise --memory-budget to ([0-9.]+) KiB or more", err)
    assert hinted, err
    enough = f"{math.ceil(float(hinted.group(1)))}KiB"
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--method", "tsv_m", "--memory-budget", enough,
                                "--dry-run"), capsys)
    assert rc == 0, err


def test_weights_that_zero_the_merge_are_said(family, tmp_path, capsys):
    """F19: `ties --weights 0 0` and `task_arithmetic --weights 0 0` merged the base silently; weights of 1e-45 (a
    float32 subnormal) underflowed every product to 0, silently."""
    inputs, b, ms = family
    for method in ("ties", "task_arithmetic"):
        rc, _, err = run_cli(_merge(b, ms, tmp_path / method, "--method", method, "--weights", "0", "0"), capsys)
        assert rc == 0 and f"warning: {method}: every model's weight is 0" in err, err
    before = snapshot(inputs)
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "tiny", "--method", "ties", "--weights", "1e-45", "1e-45"), capsys)
    check(rc, err, want_rc=2, needle="must be 0 or at least 1.2e-38", output=tmp_path / "tiny", inputs=inputs,
          before=before)


def test_file_and_method_spec_errors_hint_at_their_own_fix(family, tmp_path, capsys):
    """F2's leftovers: a UTF-16 recipe, a non-UTF-8 lm-perplexity file, `analyze --method tsv_m:rank_fraction=2` and
    union with --sign-from were hinted at "`tiesmerge ... --help` lists the options" (or "fold the adapters first",
    with no adapter involved)."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import LMPerplexity

    _, b, ms = family
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\n".encode("utf-16"))
    rc, _, err = run_cli(["validate", str(recipe)], capsys)
    assert rc == 2 and "not UTF-8" in err and "convert it to UTF-8 (`iconv -f UTF-16" in err, err
    assert "--help" not in err, err
    text = tmp_path / "latin1.txt"
    text.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(ConfigError) as caught:
        LMPerplexity(b, text)
    assert "save the text as UTF-8" in caught.value.hint
    rc, _, err = run_cli(["analyze", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--method",
                          "tsv_m:rank_fraction=2", "-o", str(tmp_path / "an")], capsys)
    assert rc == 2 and "`tiesmerge methods tsv_m` lists its options" in err, err
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--vocab-policy", "union", "--sign-from", str(ms[0])), capsys)
    assert rc == 2 and "adapter" not in err.split("hint:")[1] and "--vocab-policy truncate" in err, err
