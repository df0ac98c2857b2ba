"""Issue 13, the seventh hostile pass's NOTE rows (no input lost, but a message short of the promise):
every error ends with a hint, CLI wording in CLI hints, no ``semantics: None``, a dangling auto_map said."""

from __future__ import annotations

import json

import pytest

import test_hostile_catalogue
from helpers_ckpt import make_family, run_cli, write_hf_dir
from test_hostile_catalogue import _merge

family = test_hostile_catalogue.family


@pytest.mark.parametrize("grid", ["lam=1,nan", "nope=1", "lam=", "density=0.1:0.9:0"])
def test_a_refused_tune_grid_says_what_a_grid_is(family, capsys, grid):
    _, b, ms = family
    rc, _, err = run_cli(["tune", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--evaluator",
                          "x:y", "--grid", grid], capsys)
    assert rc == 2 and "\nhint: each --grid is NAME=v1,v2,... or NAME=start:stop:step" in err, err
    assert "`tiesmerge methods ties`" in err


def test_an_error_without_a_hint_of_its_own_points_to_the_commands_help(family, capsys):
    _, b, ms = family
    rc, _, err = run_cli(["search", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "--evaluator",
                          "x:y", "--strategy", "random", "--budget", "4", "--axis", "lam", "--range", "lam=2:1",
                          "--dir", "s"], capsys)
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert err.rstrip().splitlines()[-1].startswith("hint: "), err


def test_an_adapter_output_of_full_models_hints_in_the_command_lines_words(family, tmp_path, capsys):
    _, b, ms = family
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--output-format", "adapter"), capsys)
    assert rc != 0 and "--output-format adapter" in err and "leave out --output-format adapter" in err, err


def test_an_origin_without_semantics_prints_no_none(family, tmp_path, capsys):
    _, b, ms = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\norigin: {{a: 1}}\n")
    rc, out, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"], capsys)
    assert rc == 0, err
    assert "None" not in out, out


def test_a_base_config_naming_custom_code_is_said_to_need_it(tmp_path, capsys):
    base, fts = make_family(2)
    config = {"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}
    b = write_hf_dir(tmp_path / "base", base, config=config, extra_files={"modeling_x.py": "raise SystemExit(9)\n"})
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    rc, _, err = run_cli(_merge(b, ms, tmp_path / "out"), capsys)
    assert rc == 0, err
    assert "warning: the base's config.json names custom code (auto_map: modeling_x.XForCausalLM)" in err, err
    assert not (tmp_path / "out" / "modeling_x.py").exists()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]  # kept: the user decides
