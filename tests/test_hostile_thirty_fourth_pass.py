"""Hostile pass 34 (issue 13), and the notes of earlier passes closed in the same session."""

from __future__ import annotations

import os

import pytest

from helpers_ckpt import run_cli


@pytest.mark.parametrize("written", ["-1e400", "1e400", "1.5E+309", "-2_000e306"])
def test_a_yaml_number_past_the_float_range_is_named_as_written(tmp_path, capsys, written):
    """hp33 C110: `lam: -1e400` was reported as "lam must be a finite number, got -inf", a value nobody wrote (YAML
    reads the literal as an infinity). Now the number is named as written, with its line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: b\nmodels: [m0]\nparameters:\n  lam: {written}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 2
    assert f"{written} (line 5) is too large for a float: it reads as {'-' if written[0] == '-' else ''}inf" in err
    assert "got -inf" not in err and "got inf" not in err and "Traceback" not in err


def test_an_infinity_written_as_such_is_still_refused_by_the_option(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: ties\nbase: b\nmodels: [m0]\nparameters: {lam: -.inf}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 2 and "lam must be a finite number, got -inf" in err


def test_a_flag_past_the_float_range_is_named_as_written(capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(["merge", "--base", "b", "--model", "m", "-o", "o", "--lam", "1e400"], capsys)
    assert stop.value.code == 2
    assert "argument --lam: 1e400 is too large for a float: it reads as inf" in capsys.readouterr().err


def test_a_grid_value_past_the_float_range_is_named_as_written(tmp_path, capsys):
    rc, _, err = run_cli(["tune", "--base", tmp_path, "--model", tmp_path, "--model", tmp_path, "--evaluator", "e:f",
                          "--grid", "lam=1,-1e999", "-o", tmp_path / "out"], capsys)
    assert rc == 2 and "--grid 'lam=1,-1e999': -1e999 is too large for a float: it reads as -inf" in err


def _copy_with_config(source, target, **changes):
    import json
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("changes", [{"intermediate_size": 200_000_000}, {"num_attention_heads": 1, "hidden_size": 16,
                                                                          "intermediate_size": 3_000_000}])
def test_a_config_describing_a_far_larger_model_is_refused_before_transformers_allocates_it(classifiers, tmp_path,
                                                                                              capsys, changes):
    """hp34 D21: stats on a classifier whose config.json claims intermediate_size=200,000,000 beside 32-wide
    weights: transformers allocated the model (24 GB, the OOM killer) before comparing shapes. The model the config
    describes is built on the meta device first and held to the weights' size: any sizing field, named or not."""
    import resource

    _root, base, _fts, data = classifiers
    model = _copy_with_config(base, tmp_path / "huge", **changes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc, _, err = run_cli(["stats", "fisher", "--model", model, "--data", data, "-o", tmp_path / "st"], capsys)
    assert rc == 1, err
    assert "describes a model of" in err and "the weights hold" in err and "intermediate" in err
    assert not (tmp_path / "st").exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: nothing was allocated


def test_a_config_that_describes_its_weights_still_loads_with_a_fresh_head(classifiers, tmp_path, capsys):
    """The check's slack: an encoder checkpoint loaded as a classifier builds its head afresh (more parameters than
    stored), and that is no reason to refuse it."""
    _root, base, _fts, data = classifiers
    rc, _, err = run_cli(["stats", "fisher", "--model", base, "--data", data, "-o", tmp_path / "st", "--limit", "2"],
                         capsys)
    assert rc == 0, err


def test_rays_private_folder_fits_a_seven_digit_pid_in_tmp_and_the_hint_gives_a_length_that_works(tmp_path,
                                                                                                    monkeypatch):
    """hp34 D5: with TMPDIR=/tmp/t34 (8 bytes) `search --ray` was refused as too long, the hint's "a short folder"
    did not work below 6 bytes, and the default /tmp failed for any pid of 6 digits or more (pid_max is 4194304 on
    systemd hosts). The folder's name is shorter, the check uses the real pid, and the hint says how short."""
    import re
    import shutil

    from tiesmerge import scratch
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import executors

    def new_folder(length: int) -> str:  # a folder of /tmp of exactly ``length`` bytes, made here, never one found
        import random
        import string

        for _ in range(100):
            path = "/tmp/" + "".join(random.choices(string.ascii_lowercase, k=length - len("/tmp/")))
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            made.append(path)
            return path
        raise AssertionError("no free name")

    monkeypatch.setattr(os, "getpid", lambda: 4_194_303)
    monkeypatch.setattr(scratch, "_FOLDERS", [])
    made: list[str] = []
    try:
        for tmpdir in ("/tmp", new_folder(len("/tmp/t34"))):
            monkeypatch.setattr("tempfile.tempdir", tmpdir)
            made.append(executors._ray_folder())
        long = tmp_path / ("t" * 60)
        long.mkdir()
        monkeypatch.setattr("tempfile.tempdir", str(long))
        with pytest.raises(ConfigError) as caught:
            executors._ray_folder()
        room = int(re.search(r"set TMPDIR to a folder of at most (\d+) bytes", str(caught.value)).group(1))
        assert len("/tmp/t34") <= room < len(str(long))
        monkeypatch.setattr("tempfile.tempdir", new_folder(room))
        made.append(executors._ray_folder())
    finally:
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("where", ["added", "vocab"])
def test_a_token_id_written_as_a_string_is_refused_where_json_holds_numbers(tmp_path, where):
    """hp34 D24: an added token's id written as the string "65" was accepted (-5 and 65.0 were refused as damaged),
    though tokenizers itself cannot load such a file ("expected u32"). Only added_tokens_decoder's keys, which JSON
    makes strings, may be the text of an id."""
    import json

    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.vocab import read_vocab

    vocab = {"[UNK]": 0, "a": 1, "b": "2" if where == "vocab" else 2}
    added = [{"id": "3" if where == "added" else 3, "content": "<x>", "special": True}]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab},
                                                         "added_tokens": added}))
    with pytest.raises(CheckpointError, match=r"token id '[23]' is not an integer .* \(a string, where the file holds"):
        read_vocab(tmp_path, "the base")
    if where == "added":  # the same id as a key of tokenizer_config.json's added_tokens_decoder is the norm
        added[0]["id"] = 3
        (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab},
                                                             "added_tokens": added}))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"added_tokens_decoder": {"3": {"content": "<x>", "special": True}}}))
        assert read_vocab(tmp_path, "the base").tokens[3] == "<x>"


def test_weights_of_other_shapes_than_the_config_describes_are_said_so_without_a_helpers_name(classifiers, tmp_path):
    """hp34 D35: a config whose sizes differ from the weights' (within the size check's slack) failed with
    "llx: _lm_loader cannot load the base (RuntimeError: You set `ignore_mismatched_sizes` to `False` … look at the
    above report!)": a helper's name, and a report tiesmerge keeps quiet."""
    from transformers import AutoModelForSequenceClassification

    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation.loading import from_pretrained

    def _chooses_its_class(directory, **kwargs):
        return AutoModelForSequenceClassification.from_pretrained(directory, **kwargs)

    model = _copy_with_config(classifiers[1], tmp_path / "wider", intermediate_size=48)  # weights: 32
    with pytest.raises(CheckpointError) as caught:
        from_pretrained(_chooses_its_class, model, "the base")
    message = str(caught.value)
    assert "the weights' shapes are not those of the model its config.json describes" in message
    assert "transformers cannot load the base" in message and "intermediate_size" in message
    assert "_chooses_its_class" not in message and "report" not in message


def test_a_name_too_long_for_the_file_system_gets_the_same_advice_for_every_output(tmp_path):
    """hp34 D28: tune --json and search --dir with a 256-byte name said "cannot check …" with the generic hint
    "`tiesmerge tune --help` lists the options", where -o says "use a shorter name"."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file, check_search_dir

    name = tmp_path / ("j" * 256)
    for check in (lambda: check_output_file(name, False, [], "--json"), lambda: check_search_dir(name)):
        with pytest.raises(OutputError) as caught:
            check()
        assert caught.value.hint == "use a shorter name (a file system allows 255 bytes per name)"
