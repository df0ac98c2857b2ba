"""Hostile pass 76 (and the notes of 74 and 75 it re-tried): what a careless user's inputs still got wrong."""

from __future__ import annotations

import os
import unicodedata

import pytest


def _hard_linked_copy(source, target):
    target.mkdir()
    for f in source.iterdir():
        os.link(f, target / f.name)
    return target


@pytest.fixture()
def family(tmp_path):
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_family, write_hf_dir

    base, models = make_family(2, with_int=False)
    b = write_hf_dir(tmp_path / "b", base, shards=2)
    copy = _hard_linked_copy(b, tmp_path / "b_hl")
    m1 = write_hf_dir(tmp_path / "m1", models[0])
    loras = [write_lora_dir(tmp_path / f"l{k}", random_lora(base, 2, k), alpha=4) for k in range(2)]
    return tmp_path, b, copy, m1, loras


@pytest.mark.parametrize("spelling", ["b_hl", "b/model.safetensors.index.json"])
def test_a_hard_linked_copy_of_the_base_is_the_base_in_a_mergekit_recipe(family, capsys, spelling):
    """hp76a c12, c32: base_model's hard-linked copy (or its index file) was "a model other than base_model" in a
    BASE+LORA entry, and "not among models" in linear, where a symbolic link to it was read as the base."""
    from helpers_ckpt import run_cli

    tmp_path, b, _, m1, loras = family
    other = tmp_path / spelling
    recipe = tmp_path / "k.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nmodels:\n"
                      f"  - model: {other}+{loras[0]}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                      f"  - model: {b}+{loras[1]}\n    parameters: {{weight: 1.0, density: 0.5}}\n")
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o"], capsys)
    assert rc == 0, err
    if spelling.endswith(".json"):  # an index is no model path of its own (refused, the folder hinted)
        return
    linear = tmp_path / "h.yaml"
    linear.write_text(f"merge_method: linear\nbase_model: {b}\nmodels:\n  - model: {other}\n"
                      f"    parameters: {{weight: 1.0}}\n  - model: {m1}\n    parameters: {{weight: 1.0}}\n")
    rc, _, err = run_cli(["merge", linear, "-o", tmp_path / "o2"], capsys)
    assert rc == 0 and "not among models" not in err, err


def test_a_recipe_of_one_model_under_two_names_says_the_merge_is_the_model(family, capsys):
    """hp76a c01, c02: a base-less linear (or nuslerp) listing one model under two names hinted "list it once, with
    the sum of its weights", which a one-model linear or nuslerp refuses in turn."""
    from helpers_ckpt import run_cli

    tmp_path, b, copy, m1, _ = family
    for method in ("linear", "nuslerp"):
        recipe = tmp_path / f"{method}.yaml"
        recipe.write_text(f"merge_method: {method}\nmodels:\n  - model: {b}\n    parameters: {{weight: 1.0}}\n"
                          f"  - model: {copy}\n    parameters: {{weight: 1.0}}\n")
        rc, _, err = run_cli(["validate", recipe], capsys)
        assert rc != 0 and "a merge of a model with itself is that model" in err, err
        assert "sum of its weights" not in err
    three = tmp_path / "three.yaml"
    three.write_text(f"merge_method: linear\nmodels:\n  - model: {b}\n    parameters: {{weight: 1.0}}\n"
                     f"  - model: {copy}\n    parameters: {{weight: 1.0}}\n"
                     f"  - model: {m1}\n    parameters: {{weight: 1.0}}\n")
    rc, _, err = run_cli(["validate", three], capsys)
    assert rc != 0 and "list it once, with the sum of its weights" in err, err


def test_names_apart_only_in_normalization_are_said_so_in_a_recipe(family, capsys):
    """hp76a c38: 'café' and 'café' (composed, and decomposed as a hard-linked copy) were "one model" with no word
    of how the two names differ, and 'café+l0' under base_model café "a model other than base_model"."""
    from helpers_ckpt import run_cli

    tmp_path, b, _, m1, loras = family
    composed = _hard_linked_copy(b, tmp_path / "caf\u00e9")
    decomposed = _hard_linked_copy(b, tmp_path / unicodedata.normalize("NFD", "caf\u00e9"))
    recipe = tmp_path / "u1.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {composed}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {decomposed}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {m1}\n    parameters: {{weight: 1.0}}\n", encoding="utf-8")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc != 0 and "differ only in Unicode normalization" in err and "U+0301" in err, err
    ties = tmp_path / "u2.yaml"
    ties.write_text(f"merge_method: ties\nbase_model: {composed}\nmodels:\n"
                    f"  - model: {decomposed}+{loras[0]}\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                    f"  - model: {m1}\n    parameters: {{weight: 1.0, density: 0.5}}\n", encoding="utf-8")
    rc, _, err = run_cli(["merge", ties, "-o", tmp_path / "o"], capsys)
    assert rc == 0, err
