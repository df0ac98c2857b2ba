"""YAML recipes (recipe.py): parsing, path resolution, per-model weights and statistics, round trips,
every problem at once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tiesmerge.cli.main import main
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Average, Ties
from tiesmerge.recipe import MergeRecipe, load_recipe, parse_dtype, read_recipe_data, recipe_from_dict


def _write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_full_recipe(tmp_path):
    sub = tmp_path / "recipes"
    sub.mkdir()
    path = _write(sub, """
method: ties
base: ./llama-base
models:
  - ./llama-math
  - path: /abs/llama-code
parameters: {density: 0.3, lam: 1.2, scope: per_tensor, zero_sign: majority}
dtype: bfloat16
shard_size: 2GB
memory_budget: 512MiB
device: cpu
vocab_policy: truncate
allow_pickle: true
""")
    r = load_recipe(path)
    assert r.method == Ties(density=0.3, lam=1.2, scope="per_tensor", zero_sign="majority")
    # relative paths are resolved against the recipe's folder, absolute ones kept
    assert r.base == str(sub / "llama-base")
    assert r.models == (str(sub / "llama-math"), "/abs/llama-code")
    assert (r.dtype, r.shard_size, r.memory_budget, r.device, r.vocab_policy, r.allow_pickle) == (
        "bfloat16", "2GB", "512MiB", "cpu", "truncate", True)


def test_defaults(tmp_path):
    r = load_recipe(_write(tmp_path, "method: average\nbase: b\nmodels: [x, y]\n"))
    assert r.method == Average()
    assert (r.dtype, r.shard_size, r.memory_budget, r.device, r.vocab_policy, r.allow_pickle) == (
        None, "5GB", "2GiB", "cpu", "error", False)


def test_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    r = recipe_from_dict({"method": "ties", "base": "~/base", "models": ["~/a"]})
    assert r.base == str(tmp_path / "base") and r.models == (str(tmp_path / "a"),)


def test_per_model_weights_become_method_weights(tmp_path):
    r = load_recipe(_write(tmp_path, """
method: task_arithmetic
base: b
models: [{path: x, weight: 0.5}, {path: y, weight: 2}]
parameters: {lam: 0.4}
"""))
    assert r.method.weights == (0.5, 2) and r.method.lam == 0.4
    assert r.to_dict()["parameters"]["weights"] == [0.5, 2]


def test_round_trip_through_yaml():
    r = recipe_from_dict({"method": "dare_ties", "base": "/b", "models": ["/x", "/y"],
                          "parameters": {"drop_rate": 0.5, "seed": 3, "weights": [1, 2]}, "dtype": "float16"})
    again = recipe_from_dict(yaml.safe_load(r.to_yaml()))
    assert again == r
    assert isinstance(again, MergeRecipe)
    d = r.to_dict()
    assert "dtype" in d and d["parameters"]["weights"] == [1, 2]
    assert "allow_pickle" not in d  # a safety switch is never written into shared recipes


def test_to_dict_omits_none_options():
    r = recipe_from_dict({"method": "ties", "base": "/b", "models": ["/x"]})
    assert "weights" not in r.to_dict()["parameters"] and "dtype" not in r.to_dict()


def test_every_problem_reported_at_once(tmp_path):
    path = _write(tmp_path, """
method: ties
models: []
parameters: {density: 20, lam: .nan, scope: layer}
dtype: int8
shard_size: huge
memory_budget: -1GiB
device: tpu
vocab_policy: pad
outptu: ./merged
""")
    with pytest.raises(ConfigError) as info:
        load_recipe(path)
    problems = info.value.problems
    text = "\n".join(problems)
    for needle in ["'base' is missing", "'models' must be a non-empty list", "density must be a fraction",
                   "not a percent", "lam must be a finite number", "scope='layer'", "'int8'", "shard_size",
                   "memory_budget", "'tpu'", "'pad'", "unknown key 'outptu'"]:
        assert needle in text, f"{needle!r} missing from:\n{text}"
    assert len(problems) >= 11
    assert all(p.startswith(str(path)) for p in problems)  # each problem names the file


def test_unknown_key_and_method_suggest(tmp_path):
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({"method": "tiess", "base": "b", "models": ["x"], "paramters": {}})
    text = str(info.value)
    assert "did you mean 'ties'" in text and "did you mean 'parameters'" in text


def test_unknown_option_does_not_hide_other_option_problems():
    with pytest.raises(ConfigError) as info:
        recipe_from_dict({"method": "ties", "base": "b", "models": ["x"], "parameters": {"densty": 0.2, "lam": "big"}})
    text = str(info.value)
    assert "did you mean 'density'" in text and "lam must be a finite number" in text


@pytest.mark.parametrize("data,needle", [
    ({"method": ["ties"]}, "must be one method name, got list ['ties'] (write method: ties)"),
    ({"dtype": ["bf16"]}, "dtype"),
    ({"allow_pickle": "no"}, "allow_pickle must be true or false"),
    ({"models": [{"path": "x", "weight": 1}, "y"]}, "give a weight to every model or to none"),
    ({"models": [{"path": "x", "weight": 1}], "parameters": {"weights": [1]}}, "both per model and in parameters"),
    ({"models": [{"path": "x", "wieght": 1}]}, "models[0]: unknown key 'wieght'"),
    ({"models": [3]}, "models[0]: expected a path"),
    ({"models": ["x", "y"], "parameters": {"weights": [1]}}, "1 weights given for 2 models"),
    ({"parameters": [1, 2]}, "'parameters' must be a mapping"),
])
def test_malformed_values_are_config_errors(data, needle):
    full = {"method": "ties", "base": "b", "models": ["x"], **data}
    with pytest.raises(ConfigError) as info:
        recipe_from_dict(full)
    assert needle in str(info.value)


def test_mergekit_recipe_is_recognised():
    # a mergekit recipe is read as mergekit's, and every problem is listed at once
    with pytest.raises(ConfigError, match="base_model is required") as info:
        recipe_from_dict({"merge_method": "ties", "models": []})
    assert "models must be a non-empty list" in str(info.value)
    assert "mergekit" in info.value.hint


@pytest.mark.parametrize("text,needle", [("method: [unclosed", "not valid YAML"), ("- a\n- b\n", "YAML mapping"),
                                         ("just words", "YAML mapping")])
def test_unreadable_recipe_files(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=needle) as info:
        load_recipe(path)
    assert str(path) in str(info.value)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the recipe") as info:
        load_recipe(tmp_path / "nope.yaml")
    assert str(tmp_path / "nope.yaml") in str(info.value)


def test_read_recipe_data_resolves_paths_only(tmp_path):
    data = read_recipe_data(_write(tmp_path, "method: ties\nbase: b\nmodels: [x, {path: y, weight: 2}]\nextra: 1\n"))
    assert data["base"] == str(tmp_path / "b")
    assert data["models"] == [str(tmp_path / "x"), {"path": str(tmp_path / "y"), "weight": 2}]
    assert data["extra"] == 1  # validation is recipe_from_dict's job


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("float32") is torch.float32
    assert parse_dtype(None) is None
    with pytest.raises(ConfigError, match="did you mean 'bfloat16'"):
        parse_dtype("bfloat")
    with pytest.raises(ConfigError, match="not one of"):
        parse_dtype(["bf16"])


def test_recipe_with_per_model_statistics(classifiers, tmp_path, capsys):
    root, base, fts, data = classifiers
    for k, ft in enumerate(fts):
        assert main(["stats", "gram", "--model", str(ft), "--data", str(data), "-o", str(tmp_path / f"g{k}")]) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: regmean\nbase: {base}\nmodels:\n"
                      + "".join(f"  - {{path: {ft}, stats: g{k}}}\n" for k, ft in enumerate(fts)))
    assert main(["validate", str(recipe)]) == 0
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    recipe.write_text(f"method: regmean\nbase: {base}\nmodels: [{fts[0]}, {fts[1]}]\nstats: [g0]\n")
    assert main(["validate", str(recipe)]) == 2
    assert "'stats' lists 1 statistics directory for 2 models: list one per model" in capsys.readouterr().err
