"""Issue 13, the eleventh independent hostile pass: one case per finding, checked as the catalogue checks its cases."""

from __future__ import annotations

import json

import test_hostile_catalogue
from helpers_ckpt import run_cli

family = test_hostile_catalogue.family


class _OnText:
    """A built-in evaluator's shape: the file it scores on is its ``data``."""

    def __init__(self, data):
        self.data = data

    def __call__(self, state):
        return float(len(self.data.read_text()))


def test_mergekit_tokenizer_source_union_runs_as_the_vocabulary_union(tmp_path, capsys):
    """F1: `tokenizer_source: union` was refused ("not supported ... copies the base's tokenizer") without a word
    about --vocab-policy union, which does it; the CLI flag could not override the recipe either."""
    from test_vocab_union import _family

    base, fts = _family(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {base}\ntokenizer_source: union\nmodels:\n"
                      + "".join(f"  - model: {m}\n    parameters: {{weight: 1, density: 0.5}}\n" for m in fts))
    rc, _, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 0 and "tokenizer_source: union runs as --vocab-policy union" in err, err
    manifest = json.loads((tmp_path / "out" / "tiesmerge.json").read_text())
    assert manifest["recipe"]["vocab_policy"] == "union", manifest["recipe"]
    added = json.loads((tmp_path / "out" / "tokenizer.json").read_text())["added_tokens"]
    assert {"<|im_start|>", "<|im_end|>", "<tool>"} <= {t["content"] for t in added}
    recipe.write_text(recipe.read_text().replace("union", "model:elsewhere"))
    rc, _, err = run_cli(["validate", str(recipe)], capsys)
    assert rc == 2 and "tokenizer_source: union, as --vocab-policy union does" in err, err


def test_a_mergekit_model_without_a_weight_is_said_once(family, tmp_path, capsys):
    """F2: models without `parameters:` gave "models[i].parameters.weight: None must be a number" per model (a
    None the recipe never wrote) beside the right line, "every model needs a weight"."""
    _, b, ms = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\n  - model: {ms[1]}\n")
    rc, _, err = run_cli(["validate", str(recipe)], capsys)
    assert rc == 2 and "every model needs a weight" in err and "None" not in err, err


def test_rank_pattern_is_checked_against_the_factors(tmp_path, capsys):
    """F3: any non-empty rank_pattern turned the rank check off: `{"q_proj": 2}` over rank-4 factors (an adapter
    PEFT cannot load) was merged silently."""
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_base, write_hf_dir
    from test_hostile_catalogue import check, snapshot

    base = make_base(0)
    b = write_hf_dir(tmp_path / "inputs" / "base", base)
    other = write_lora_dir(tmp_path / "inputs" / "other", random_lora(base, 4, 1), alpha=8.0)
    for k, config in enumerate(({"rank_pattern": {"q_proj": 2}}, {"r": 8, "rank_pattern": {"q_proj": 4}})):
        bad = write_lora_dir(tmp_path / "inputs" / f"bad{k}", random_lora(base, 4, 0), alpha=8.0, config=config)
        before = snapshot(tmp_path / "inputs")
        rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(bad), "--model", str(other), "-o",
                              str(tmp_path / "out"), "--no-progress"], capsys)
        check(rc, err, want_rc=1, needle=("have rank 4", "rank_pattern gives" if k == 0 else "r is 8"),
              output=tmp_path / "out", inputs=tmp_path / "inputs", before=before)
    # ranks that differ by module, as rank_pattern says: merged
    factors = random_lora(base, 4, 2)
    factors = {m: ((a[:2], b_[:, :2]) if m.endswith("up_proj") else (a, b_)) for m, (a, b_) in factors.items()}
    good = write_lora_dir(tmp_path / "inputs" / "good", factors, alpha=8.0, config={"r": 4, "rank_pattern":
                                                                                     {"up_proj": 2}})
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(good), "--model", str(other), "-o",
                          str(tmp_path / "ok"), "--no-progress"], capsys)
    assert rc == 0, err


def test_inline_flags_in_a_pattern_are_named_as_such(family, tmp_path, capsys):
    """F4: `--exclude '(?i)Q_PROJ'` (flags at the start of what the user wrote) was "global flags not at the start
    of the expression at position 8", about tiesmerge's own wrapping of it."""
    _, b, ms = family
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--method", "tsv_m",
                          "--exclude", "(?i)Q_PROJ", "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "inline flags such as (?i)" in err and "position 8" not in err, err


def test_index_entries_that_are_no_shards_blame_the_index(family, tmp_path, capsys):
    """F5: an index entry naming config.json (or the index itself) blamed that file as a corrupt download; an
    absolute path to a shard inside the folder was called "outside" it."""
    from helpers_ckpt import finetune, make_base, write_hf_dir
    from test_hostile_catalogue import check, snapshot

    inputs, b, ms = family
    sharded = write_hf_dir(inputs / "sharded", finetune(make_base(0), 5), shards=2)
    index = sharded / "model.safetensors.index.json"
    original = json.loads(index.read_text())
    name, shard = next(iter(original["weight_map"].items()))
    for entry, needle in (("config.json", "which is no .safetensors shard"),
                          ("model.safetensors.index.json", "which is no .safetensors shard"),
                          (str(sharded / shard), "an absolute path (to a file of this folder)")):
        index.write_text(json.dumps({**original, "weight_map": {**original["weight_map"], name: entry}}))
        before = snapshot(inputs)
        rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(sharded), "-o",
                              str(tmp_path / "out")], capsys)
        check(rc, err, want_rc=1, needle=("model.safetensors.index.json: weight_map entry", needle),
              output=tmp_path / "out", inputs=inputs, before=before)
        assert "download or copy it again" not in err and "outside" not in err, err


def test_an_absurd_adapt_batch_is_refused_before_the_work(tmp_path, monkeypatch):
    """F6: `adapt --batch-size 1000000000` with 2-row data built a 10^9-row batch list in Python (memory growing until
    killed)."""
    import pytest

    import tiesmerge
    import tiesmerge.adamerging.run as adapt_run
    from test_adapt_hostile import _forward, _setup
    from tiesmerge.errors import ConfigError

    base, fts, files = _setup(tmp_path)
    monkeypatch.setattr(adapt_run, "collect_task_vectors", lambda *a, **k: pytest.fail("work began"))
    with pytest.raises(ConfigError, match="batch_size must be at most 65,536"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, batch_size=10**9)


def _demo(workdir, capsys):
    return run_cli(["demo", "--synthetic", "--params", "0.05", "--workdir", str(workdir)], capsys)


def test_the_demo_rewrites_only_its_own_unchanged_files(tmp_path, capsys):
    """F8: a forged (empty) demo marker beside a user's base/config.json and shards, or a user's edit of a file an
    earlier demo wrote: the demo overwrote them silently (only merged-*/ were checked)."""
    wd = tmp_path / "wd"
    assert _demo(wd, capsys)[0] == 0
    assert _demo(wd, capsys)[0] == 0  # its own files, unchanged: rewritten
    config = wd / "base" / "config.json"
    config.write_text(config.read_text().replace("bfloat16", "float16"))  # the user's edit
    rc, _, err = _demo(wd, capsys)
    assert rc == 1 and "changed since (base/config.json)" in err and "float16" in config.read_text(), err
    forged = tmp_path / "forged"
    (forged / "base").mkdir(parents=True)
    (forged / ".tiesmerge-demo").write_text("")
    (forged / "base" / "config.json").write_text('{"mine": true}')
    rc, _, err = _demo(forged, capsys)
    assert rc == 1 and "base/config.json" in err and (forged / "base" / "config.json").read_text() == '{"mine": true}'


def test_the_demo_never_writes_through_a_link(tmp_path, capsys):
    """F9: a demo marker that is a link to a user's file was written through (the file replaced by the marker's
    text); a ft-* folder linked outside the workdir received the demo's model files."""
    import os

    victim = tmp_path / "outside" / "victim"
    victim.parent.mkdir()
    victim.write_text("secret")
    wd = tmp_path / "wd"
    wd.mkdir()
    os.symlink(victim, wd / ".tiesmerge-demo")
    rc, _, err = _demo(wd, capsys)
    assert rc == 1 and "not a regular file" in err and victim.read_text() == "secret", err
    wd2 = tmp_path / "wd2"
    wd2.mkdir()
    (wd2 / ".tiesmerge-demo").write_text("")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, wd2 / "ft-math")
    rc, _, err = _demo(wd2, capsys)
    assert rc == 1 and "ft-math (a link)" in err and not list(elsewhere.iterdir()), err


def test_a_union_refuses_added_token_flags_no_tokenizer_would_load(tmp_path, capsys):
    """F7: a model's added token with `"special": "yes"` (or `lstrip: 1`, `normalized: null`) was copied into the
    output's tokenizer.json, which AutoTokenizer then refused to load."""
    from test_hostile_catalogue import check, snapshot
    from test_vocab_union import _family

    base, fts = _family(tmp_path / "inputs")
    tj = fts[0] / "tokenizer.json"
    data = json.loads(tj.read_text())
    data["added_tokens"][-1]["special"] = "yes"
    tj.write_text(json.dumps(data))
    before = snapshot(tmp_path / "inputs")
    rc, _, err = run_cli(["merge", "--base", str(base), "--model", str(fts[0]), "--model", str(fts[1]),
                          "--vocab-policy", "union", "-o", str(tmp_path / "out")], capsys)
    check(rc, err, want_rc=1, needle=("tokenizer.json", "has special = 'yes', not true or false"),
          output=tmp_path / "out", inputs=tmp_path / "inputs", before=before)


def test_non_string_recipe_option_keys_are_named(family, tmp_path, capsys):
    """F11: `parameters: {2001-12-14: 1}` (or 1, null, true, 1.5 as a key) was "unexpected TypeError ... a bug"
    (the did-you-mean suggestion was fed a key that is no string)."""
    _, b, ms = family
    recipe = tmp_path / "r.yaml"
    for key, shown in (("2001-12-14", "datetime.date(2001, 12, 14)"), ("1", "1"), ("null", "None"), ("1.5", "1.5")):
        recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\nparameters: {{{key}: 1}}\n")
        rc, _, err = run_cli(["validate", str(recipe)], capsys)
        assert rc == 2 and f"ties: unknown option {shown}" in err and "bug" not in err, err


def test_slerp_layers_the_model_contradicts_are_warned(family, tmp_path, capsys):
    """F12: `--layers 1000` (or 1) on a 2-layer model: the t_by_name gradient never reached its end (or ran past
    it), silently."""
    _, b, ms = family
    for layers, needle in (("1000", "never reaches its last values"), ("1", "is past its end for layers 1 to 1")):
        rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--method",
                              "slerp", "--t-by-name", "*=0.1,0.9", "--layers", layers, "-o",
                              str(tmp_path / f"o{layers}"), "--no-progress"], capsys)
        assert rc == 0 and "layers 2 (--layers 2), the count the tensors hold" in err and needle in err, err
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--method", "slerp",
                          "--t-by-name", "*=0.1,0.9", "--layers", "2", "-o", str(tmp_path / "ok"), "--no-progress"],
                         capsys)
    assert rc == 0 and "warning" not in err, err


def test_a_search_does_not_resume_over_an_evaluator_file_that_changed(tmp_path):
    """F13: `search --evaluator lm-perplexity:t.txt --dir d`, a line appended to t.txt, then the same search with a
    larger budget: it resumed, ranking scores of the old text and the new one as one list."""
    import pytest

    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.driver import run_search

    text = tmp_path / "t.txt"
    text.write_text("one line\n")
    base, models = make_family(2)
    log = tmp_path / "log.jsonl"
    run_search(base, models, "ties", _OnText(text), strategy="random", budget=2, log=log)
    run_search(base, models, "ties", _OnText(text), strategy="random", budget=3, log=log)  # the same text: resumed
    with text.open("a") as f:
        f.write("another line\n")
    with pytest.raises(ConfigError, match="differs in: the evaluator.s data file"):
        run_search(base, models, "ties", _OnText(text), strategy="random", budget=4, log=log)


def test_pass_eleven_leftovers(tmp_path):
    """Pass 11's leftovers: a batch larger than every task's data is warned (each example scored thousands of times a
    step); a search's evaluator data is compared by content (a byte-identical copy resumes)."""
    import shutil

    import pytest

    import tiesmerge
    from helpers_ckpt import make_family
    from test_adapt_hostile import _forward, _setup
    from tiesmerge.errors import MergeWarning
    from tiesmerge.tuning.driver import run_search

    base, fts, files = _setup(tmp_path)
    with pytest.warns(MergeWarning, match="batch_size 600 is more than any task's examples \\(at most 6\\)"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, batch_size=600)

    text = tmp_path / "t.txt"
    text.write_text("one line\n")
    backup = tmp_path / "backup.txt"
    shutil.copy(text, backup)
    b, models = make_family(2)
    log = tmp_path / "log.jsonl"
    run_search(b, models, "ties", _OnText(text), strategy="random", budget=2, log=log)
    text.unlink()
    shutil.copy(backup, text)  # the same bytes, a new file: the same search
    run_search(b, models, "ties", _OnText(text), strategy="random", budget=3, log=log)
