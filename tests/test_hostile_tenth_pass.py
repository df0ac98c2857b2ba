"""Issue 13, the tenth independent hostile pass: one case per finding, checked as the catalogue checks its cases."""

from __future__ import annotations

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
