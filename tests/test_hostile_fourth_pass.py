"""Issue 13, after the third hostile pass: what the lead and the fourth independent pass found, one case each
(checked as the catalogue checks its cases: exit status, message, no traceback, nothing left, inputs unchanged).

- an overflow to float16 is reported once, by the typed error, without numpy's RuntimeWarning printed first;
- ``--force`` keeps an earlier output in which a user edited a file tiesmerge wrote (the model card with their
  results), naming the file: each output records its files' sizes and modification times;
- ``adapt --checkpoint`` inside the output directory is refused before the training, not after it;
- a Hugging Face cache ref linked out of its repository folder is refused before it is read, and a damaged
  ref's content is never echoed (it could be a token);
- control characters in a name or path (an index's shard name, a folder name) never reach the terminal raw, and
  a newline in a name cannot forge an ``error:`` line;
- the base's ``additional_chat_templates/*.jinja`` (read by transformers with the tokenizer) are checked like
  every other model file (no link out) and copied into the output;
- config, tokenizer and template files larger than transformers can sensibly read are refused by size;
- a pickle that would run code is named as such in one line with a hint (never torch's advice to load it with
  weights_only=False);
- the digest cache creates no folder in a home that does not exist, nor under a relative XDG_CACHE_HOME;
- a folder holding a full model and a PEFT adapter is refused before transformers loads (and applies) it;
- ``merge(base, "one/path", output=...)`` names the models argument, not the output;
- a mergekit ``base_model: BASE+LORA`` is refused for what it is;
- an output path whose files would pass PATH_MAX is refused before the work;
- ``validate`` and ``--dry-run`` list every input problem at once (missing, damaged, given twice).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import test_hostile_catalogue
import tiesmerge
from helpers_ckpt import write_hf_dir
from test_adapt_hostile import _forward, _setup
from test_hostile_catalogue import _merge, _run, check, snapshot
from tiesmerge.errors import OutputError
from tiesmerge.paths import changed_files

family = test_hostile_catalogue.family


def test_a_float16_overflow_prints_no_numpy_warning_before_the_error(tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "inputs"
    base = {"w": torch.full((4, 4), 60000.0, dtype=torch.float16)}
    fts = [{"w": torch.full((4, 4), 65000.0, dtype=torch.float16)} for _ in range(2)]
    b = write_hf_dir(inputs / "base", base)
    ms = [write_hf_dir(inputs / f"ft{k}", ft) for k, ft in enumerate(fts)]
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "ties", "--lam", "2"), capsys)
    check(rc, err, want_rc=1, needle=("tensor 'w'", "wider dtype"), output=tmp_path / "out", inputs=inputs,
          before=before)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]


@pytest.mark.parametrize("edited", ["README.md", "model.safetensors"])
def test_force_keeps_an_output_whose_files_the_user_edited(family, capsys, edited):
    inputs, b, ms = family
    assert _run(_merge(b, ms, "out"), capsys)[0] == 0
    stamps = json.loads(Path("out/tiesmerge.json").read_text())["written_stamps"]
    assert "README.md" in stamps and "tiesmerge.json" not in stamps  # the marker is rewritten: never stamped
    assert changed_files(Path("out").absolute()) == []
    with open(Path("out") / edited, "ab") as f:
        f.write(b"\nmy own evaluation: 99%\n")
    kept = (Path("out") / edited).read_bytes()
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, "out", "--force"), capsys)
    assert rc == 1 and "Traceback" not in err
    assert f"1 of another size: {edited}" in err and "move them out" in err, err
    assert (Path("out") / edited).read_bytes() == kept
    assert snapshot(inputs) == before
    assert not [p for p in os.listdir(".") if p.startswith(".tiesmerge")]


def test_force_replaces_an_untouched_output_and_one_whose_file_the_user_removed(family, capsys):
    inputs, b, ms = family
    assert _run(_merge(b, ms, "out"), capsys)[0] == 0
    assert _run(_merge(b, ms, "out", "--force"), capsys)[0] == 0
    (Path("out") / "README.md").unlink()  # nothing of the user's is lost with a file they removed
    assert _run(_merge(b, ms, "out", "--force"), capsys)[0] == 0
    assert (Path("out") / "README.md").is_file()


def test_an_adapt_checkpoint_inside_the_output_is_refused_before_the_training(tmp_path):
    base, fts, files = _setup(tmp_path)
    out = tmp_path / "out"
    for checkpoint in (out / "ck.safetensors", out, out / "sub" / "ck.safetensors"):
        with pytest.raises(OutputError, match="lies at or inside the output directory"):
            tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, output=out, checkpoint=checkpoint)
    assert not out.exists()


# ------------------------------------------------------------------ the Hugging Face cache's refs


def _cache_repo(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    repo = cache / "models--org--a"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots" / ("c" * 40)).mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return repo


def test_a_cache_ref_linked_out_of_the_repository_is_refused_unread(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    repo = _cache_repo(tmp_path, monkeypatch)
    secret = tmp_path / "token"
    secret.write_text("hf_SECRETTOKEN123\n")
    (repo / "refs" / "main").symlink_to(secret)
    rc, err = _run(_merge(b, ["org/a", ms[0]], "out"), capsys)
    assert rc != 0 and "Traceback" not in err
    assert "outside" in err and "refs/main" in err and "SECRETTOKEN" not in err, err


def test_a_damaged_cache_ref_is_not_echoed(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    repo = _cache_repo(tmp_path, monkeypatch)
    (repo / "refs" / "main").write_text("hf_SECRETTOKEN123\n")
    rc, err = _run(_merge(b, ["org/a", ms[0]], "out"), capsys)
    assert rc != 0 and "not a commit hash" in err and "SECRETTOKEN" not in err, err


# ------------------------------------------------------------------ control characters in messages


def test_control_characters_in_a_shard_name_reach_the_terminal_escaped(family, capsys):
    inputs, b, ms = family
    evil = inputs / "evil"
    evil.mkdir()
    for f in ms[0].iterdir():
        (evil / f.name).write_bytes(f.read_bytes())
    weights = next(evil.glob("*.safetensors"))
    from safetensors import safe_open
    with safe_open(str(weights), "pt") as f:
        names = list(f.keys())
    shard = "x\x1b[2K\r\x1b[32mall good: merged OK\x1b[0m\u202e.safetensors"
    (evil / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {names[0]: shard}}))
    weights.unlink()
    rc, err = _run(_merge(b, [evil, ms[1]], "out"), capsys)
    assert rc != 0 and "Traceback" not in err
    assert "\x1b" not in err and "\r" not in err and "\u202e" not in err, repr(err)
    assert "\\x1b[2K" in err, err  # shown, as an escape


def test_a_newline_in_a_folder_name_cannot_forge_an_error_line(family, capsys):
    inputs, b, ms = family
    odd = inputs / "nl\nerror: fake line"
    odd.mkdir()
    rc, err = _run(_merge(b, [odd, ms[1]], "out"), capsys)
    assert rc != 0 and "Traceback" not in err
    lines = err.splitlines()
    assert sum(line.startswith("error:") for line in lines) == 1, err
    assert any(line.startswith("  error: fake line") for line in lines), err


# ------------------------------------------------------------------ chat templates and file sizes


def test_a_chat_template_linked_out_of_the_base_is_refused(family, tmp_path, capsys):
    inputs, b, ms = family
    secret = tmp_path / "secret.jinja"
    secret.write_text("{{ secret }}")
    (b / "additional_chat_templates").mkdir()
    (b / "additional_chat_templates" / "x.jinja").symlink_to(secret)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, "out"), capsys)
    check(rc, err, want_rc=1, needle=("x.jinja", "outside"), output=Path("out"), inputs=inputs, before=before)


def test_the_bases_chat_templates_are_copied_into_the_output(family, capsys):
    inputs, b, ms = family
    (b / "additional_chat_templates").mkdir()
    (b / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")
    (b / "additional_chat_templates" / "notes.txt").write_text("not a template")
    assert _run(_merge(b, ms, "out"), capsys)[0] == 0
    assert (Path("out") / "additional_chat_templates" / "tool_use.jinja").read_text() == "{{ tools }}"
    assert not (Path("out") / "additional_chat_templates" / "notes.txt").exists()
    manifest = json.loads(Path("out/tiesmerge.json").read_text())
    assert "additional_chat_templates/tool_use.jinja" in manifest["written"]


def test_a_config_file_too_large_to_read_whole_is_refused_by_its_size(family, capsys):
    inputs, b, ms = family
    with open(b / "tokenizer_config.json", "wb") as f:  # sparse: no disk used
        f.truncate(3 << 30)
    rc, err = _run(_merge(b, ms, "out"), capsys)
    assert rc == 1 and "tokenizer_config.json" in err and "3.00 GiB" in err and "Traceback" not in err, err
    assert not Path("out").exists()


# ------------------------------------------------------------------ pickles, caches, adapters, API, recipes, paths


def test_a_pickle_that_would_run_code_is_named_in_one_line(family, tmp_path, capsys):
    inputs, b, ms = family

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    evil = inputs / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((ms[0] / "config.json").read_text())
    torch.save({"x": Evil()}, evil / "pytorch_model.bin")
    rc, err = _run(_merge(b, [evil, ms[1]], "out", "--allow-pickle"), capsys)
    assert rc == 1 and "calls posix.system" in err and "hint:" in err, err
    assert "weights_only" not in err and "Traceback" not in err, err
    assert not (tmp_path / "PWNED").exists() and not Path("out").exists()


def test_the_digest_cache_makes_no_folder_in_a_missing_home_or_under_a_relative_xdg(tmp_path, monkeypatch):
    from tiesmerge.io.card import _cache_file

    monkeypatch.delenv("TIESMERGE_CACHE_DIR", raising=False)
    monkeypatch.delenv("TIESMERGE_DIGEST_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "relcache")
    monkeypatch.setenv("HOME", str(tmp_path / "nonexistent"))
    assert _cache_file() is None
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _cache_file() == tmp_path / ".cache" / "tiesmerge" / "digests.json"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _cache_file() == tmp_path / "xdg" / "tiesmerge" / "digests.json"


def test_a_model_folder_holding_an_adapter_too_is_refused_before_transformers_loads_it(family):
    from tiesmerge.errors import CheckpointError
    from tiesmerge.paths import check_model_dir

    inputs, b, ms = family
    (ms[0] / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    with pytest.raises(CheckpointError, match="holds a PEFT adapter"):
        check_model_dir(ms[0], "model 0", tokenizer=False)


def test_a_single_path_as_models_is_named_not_blamed_on_the_output(family, tmp_path):
    from tiesmerge.errors import ConfigError

    inputs, b, ms = family
    with pytest.raises(ConfigError, match="models must be a non-empty list"):
        tiesmerge.merge(b, str(ms[0]), "ties", output=tmp_path / "api_out")


def test_a_mergekit_lora_on_the_base_model_is_refused_for_what_it_is(family, capsys):
    inputs, b, ms = family
    recipe = Path("mk.yaml")
    recipe.write_text(f"merge_method: ties\nbase_model: {b}+{ms[0]}\nmodels:\n"
                      + "".join(f"  - model: {m}\n    parameters: {{weight: 1, density: 0.5}}\n" for m in ms))
    rc, err = _run(["validate", str(recipe)], capsys)
    assert rc == 2 and "applies an adapter to the base itself" in err and "other than base_model" not in err, err


def test_an_output_path_near_path_max_is_refused_before_the_work(family, tmp_path, capsys):
    inputs, b, ms = family
    deep = tmp_path
    while len(os.fsencode(str(deep))) < 3900:
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    rc, err = _run(_merge(b, ms, deep / "out-with-a-long-name", "--dry-run"), capsys)
    assert rc == 1 and "bytes long" in err and "shorter output path" in err, err


def test_validate_lists_every_input_problem_at_once(family, capsys):
    inputs, b, ms = family
    damaged = inputs / "damaged"
    damaged.mkdir()
    (damaged / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    recipe = Path("r.yaml")
    recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, /nope/b, {damaged}, {ms[0]}]\n")
    rc, err = _run(["validate", str(recipe)], capsys)
    assert rc == 1 and "3 problems with the inputs" in err, err
    assert "/nope/b" in err and "damaged" in err and "listed twice" in err and "Traceback" not in err, err


def test_a_density_that_keeps_no_entry_merges_the_base_with_a_warning(tmp_path, capsys, monkeypatch):
    """Pass 4's 5d2: ``--density 1e-9`` on a small model keeps nothing, so the merge is the base. k = 0 is defined
    that way (the trim keeps nothing), so it runs, but the CLI says so in one ``warning:`` line with the density that
    keeps an entry, and the API issues a MergeWarning."""
    from safetensors.torch import load_file

    from tiesmerge import merge
    from tiesmerge.errors import MergeWarning

    inputs = tmp_path / "inputs"
    base = {"w": torch.zeros(8, 8), "b": torch.zeros(8)}
    b = write_hf_dir(inputs / "base", base)
    ms = [write_hf_dir(inputs / f"ft{k}", {"w": torch.randn(8, 8), "b": torch.randn(8)}) for k in range(2)]
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "ties", "--density", "1e-9"), capsys)
    assert rc == 0, err
    assert err.count("warning:") == 1 and "keeps no entry of any tensor" in err and "0.0139" in err, err
    assert "Traceback" not in err and "MergeWarning" not in err and ".py:" not in err, err
    merged = load_file(next((tmp_path / "out").glob("*.safetensors")))
    assert all(torch.equal(merged[k], base[k]) for k in base)
    assert snapshot(inputs) == before

    # the density suggested keeps one entry of the largest scope (the paper's global one: all 72 entries)
    rc, err = _run(_merge(b, ms, tmp_path / "out2", "--method", "ties", "--density", "0.0139"), capsys)
    assert rc == 0 and "warning:" not in err, err

    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        with pytest.raises(MergeWarning, match="keeps no entry"):
            merge(b, ms, "ties", density=1e-9)
