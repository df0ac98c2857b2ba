"""Issue 13: the fifth hostile pass's NOTE rows that were real defects (silent or misleading), each checked as the
catalogue checks its cases (exit status, message, no traceback, nothing left, inputs unchanged).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

import test_hostile_catalogue
from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import make_base, run_cli
from test_hostile_catalogue import _merge, check, snapshot

family = test_hostile_catalogue.family


def test_a_relative_cache_dir_is_ignored_with_a_warning_not_created_in_the_working_folder(family, tmp_path, capsys,
                                                                                          monkeypatch):
    inputs, b, ms = family  # the working folder is tmp_path/work
    monkeypatch.setenv("TIESMERGE_CACHE_DIR", "relative/cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out"), capsys)
    assert rc == 0, err
    assert "warning: TIESMERGE_CACHE_DIR='relative/cache' is not an absolute path: ignored" in err, err
    assert not (tmp_path / "work" / "relative").exists()
    assert (tmp_path / "xdg" / "tiesmerge" / "digests.json").is_file()  # the default place instead


def test_a_model_whose_weights_are_hard_links_of_another_is_listed_twice(family, tmp_path, capsys):
    inputs, b, ms = family
    twin = inputs / "twin"
    twin.mkdir()
    for f in ms[0].iterdir():
        os.link(f, twin / f.name) if f.suffix == ".safetensors" else shutil.copy(f, twin / f.name)
    before = snapshot(inputs)
    rc, _, err = run_cli(_merge(b, [ms[0], twin], tmp_path / "out"), capsys)
    check(rc, err, want_rc=2, needle=("model 1 is listed twice (also model 0)", "the same weights files"),
          output=tmp_path / "out", inputs=inputs, before=before)
    base_twin = inputs / "base_twin"  # the base's own files under another name: "the base itself"
    base_twin.mkdir()
    for f in b.iterdir():
        os.link(f, base_twin / f.name)
    rc, _, err = run_cli(_merge(b, [ms[0], base_twin], tmp_path / "out"), capsys)
    check(rc, err, want_rc=2, needle=("is the base itself", "weights files are the base's"), output=tmp_path / "out",
          inputs=inputs, before=snapshot(inputs))


def test_a_copy_of_the_base_among_the_models_is_merged_with_a_warning(family, tmp_path, capsys):
    inputs, b, ms = family
    copy = shutil.copytree(b, inputs / "copy")
    rc, _, err = run_cli(_merge(b, [ms[0], copy], tmp_path / "out"), capsys)
    assert rc == 0, err
    assert "warning: model(s) 1 (" in err and "same weights files as the base, byte for byte" in err, err
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out2"), capsys)
    assert rc == 0 and "warning" not in err, err  # real fine-tunes: no warning


def test_a_base_without_config_json_warns_that_the_output_has_none(family, tmp_path, capsys):
    inputs, b, ms = family
    (b / "config.json").unlink()
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out"), capsys)
    assert rc == 0, err
    assert "warning: the base" in err and "has no config.json" in err, err
    assert not (tmp_path / "out" / "config.json").exists()


def test_an_empty_recipe_says_what_a_recipe_is(tmp_path, capsys, monkeypatch):
    from tiesmerge.errors import ConfigError
    from tiesmerge.recipe import recipe_from_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    rc, _, err = run_cli(["merge", "empty.yaml", "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "an empty file" in err and "hint: start from an example" in err, err
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(None)
    assert "got nothing (empty)" in str(info.value) and info.value.hint


def test_the_same_option_swept_twice_is_refused_not_replaced():
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.search import parse_grid

    with pytest.raises(ConfigError) as info:
        parse_grid("ties", ["density=0.2", "density=0.3"])
    assert "density is already swept by --grid 'density=0.2'" in str(info.value), info.value
    assert parse_grid("ties", ["density=0.2,0.3", "lam=1"])["density"] == (0.2, 0.3)


def _lora_pair(inputs, config):
    base = make_base()
    from helpers_ckpt import write_hf_dir

    b = write_hf_dir(inputs / "base", base)
    loras = [write_lora_dir(inputs / f"lora{k}", random_lora(base, 2, k), alpha=4.0, config=config)
             for k in range(2)]
    return b, loras


def test_an_alpha_pattern_out_of_range_is_named_as_alpha_pattern(tmp_path, capsys):
    inputs = tmp_path / "inputs"
    b, loras = _lora_pair(inputs, {"alpha_pattern": {"q_proj": 1e39}})
    before = snapshot(inputs)
    rc, _, err = run_cli(_merge(b, loras, tmp_path / "out", "--method", "task_arithmetic"), capsys)
    check(rc, err, want_rc=1, needle=("(alpha_pattern 1e+39 / r 2)", "hint: fix alpha_pattern"),
          output=tmp_path / "out", inputs=inputs, before=before)
    assert "lora_alpha 1e+39" not in err


@pytest.mark.parametrize("config,ok", [({"layers_to_transform": [0, 1]}, True), ({"layers_to_transform": 1}, False),
                                       ({"layers_to_transform": [5]}, False),
                                       ({"layers_to_transform": [0, 1], "layers_pattern": "blocks"}, False),
                                       ({"layers_to_transform": [0, 1], "layers_pattern": ["layers"]}, True),
                                       ({"layers_to_transform": "all"}, False)])
def test_layers_to_transform_must_describe_the_factors(tmp_path, capsys, config, ok):
    inputs = tmp_path / "inputs"
    b, loras = _lora_pair(inputs, config)
    before = snapshot(inputs)
    rc, _, err = run_cli(_merge(b, loras, tmp_path / "out", "--method", "task_arithmetic"), capsys)
    if ok:
        assert rc == 0, err
        return
    needle = "not a layer index or a list" if config["layers_to_transform"] == "all" else \
        "the config does not describe these weights"
    check(rc, err, want_rc=1, needle=("layers_to_transform", needle), output=tmp_path / "out", inputs=inputs,
          before=before)


def test_an_added_token_at_two_ids_is_refused_by_the_vocabulary_union(tmp_path):
    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.vocab import read_vocab

    folder = tmp_path / "m"
    folder.mkdir()
    vocab = {f"w{i}": i for i in range(64)}
    added = [{"id": 64, "content": "<x>", "special": True}, {"id": 65, "content": "<x>", "special": True}]
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab},
                                                       "added_tokens": added}))
    with pytest.raises(CheckpointError) as info:
        read_vocab(folder, "m")
    assert "gives the added token '<x>' two ids, 64 and 65" in str(info.value), info.value
    added[1]["id"] = 64  # listed twice at one id: the same token
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab},
                                                       "added_tokens": added}))
    assert read_vocab(folder, "m").tokens[64] == "<x>"


def test_a_reference_that_is_a_device_is_named_as_the_reference(family, tmp_path, capsys):
    inputs, b, ms = family
    before = snapshot(inputs)
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--sign-from", os.devnull), capsys)
    check(rc, err, want_rc=1, needle="the reference model (sign_from) is a character device", output=tmp_path / "out",
          inputs=inputs, before=before)


def test_an_existing_link_at_a_file_output_is_called_a_link(tmp_path):
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file

    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    (tmp_path / "link.json").symlink_to(mine)
    with pytest.raises(OutputError) as info:
        check_output_file(tmp_path / "link.json", False, [], "the results file")
    assert "already exists as a link" in str(info.value) and "tiesmerge output" not in str(info.value)
    assert mine.read_text() == "{}"


def test_one_model_merged_is_one_model(family, tmp_path, capsys):
    inputs, b, ms = family
    rc, out, err = run_cli(_merge(b, ms[:1], tmp_path / "out"), capsys)
    assert rc == 0 and "merged 1 model with ties" in out, out + err


def test_a_gradient_with_layers_zero_says_layers_is_not_set():
    from tiesmerge.errors import ConfigError
    from tiesmerge.methods.slerp import Slerp

    with pytest.raises(ConfigError) as info:
        Slerp(t_by_name="mlp=0,1", layers=0).requirements()
    assert "layers is 0 (not set)" in str(info.value)


def test_heads_and_choices_are_files_in_the_help(capsys):
    with pytest.raises(SystemExit):
        run_cli(["adapt", "--help"], capsys)
    out = capsys.readouterr().out
    assert "--heads FILE" in out and "--choices FILE" in out and "--heads JSON" not in out


def test_torch_free_sources_for_identity_are_none():
    from tiesmerge.inputs import _weights_identity

    assert _weights_identity({"w": torch.zeros(1)}) is None
    assert _weights_identity("org/name@main") is None
