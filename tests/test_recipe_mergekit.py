"""mergekit recipes read as they are: translation, errors, and mergekit's semantics by hand."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers_ckpt import write_hf_dir
from tiesmerge.cli.main import main
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Average, DareTies, TaskArithmetic, Ties
from tiesmerge.recipe import load_recipe

# Recipes in the shapes mergekit's README and examples use (paths made local).
DOC_TIES = """
models:
  - model: ./models/orca
    parameters: {density: 0.7, weight: 1.0}
  - model: ./models/platypus
    parameters: {density: 0.5, weight: 0.3}
  - model: ./models/wizardmath
    parameters: {density: 0.33, weight: 0.5}
merge_method: ties
base_model: ./models/llama-base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""
DOC_TIES_GRADIENT = """
models:
  - model: ./models/orca
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: ./models/wizardmath
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: ./models/llama-base
parameters: {normalize: true}
dtype: float16
"""
DOC_LINEAR = """
models:
  - model: ./models/a
    parameters: {weight: 1.0}
  - model: ./models/b
    parameters: {weight: 0.3}
merge_method: linear
dtype: float16
"""
DOC_TASK_ARITHMETIC = """
base_model: ./models/base
models:
  - model: ./models/base
  - model: ./models/a
    parameters: {weight: 0.6}
  - model: ./models/b
    parameters: {weight: 0.4}
merge_method: task_arithmetic
parameters: {lambda: 0.8}
tokenizer_source: base
dtype: bfloat16
"""
DOC_DARE_TIES = """
models:
  - model: ./models/base
  - model: ./models/a
    parameters: {density: 0.53, weight: 0.4}
  - model: ./models/b
    parameters: {density: 0.53, weight: 0.3}
merge_method: dare_ties
base_model: ./models/base
parameters: {int8_mask: true}
dtype: bfloat16
"""


def _load(tmp_path, text):
    path = tmp_path / "mergekit.yaml"
    path.write_text(text)
    return load_recipe(path)


def test_documentation_ties_recipe_translates(tmp_path):
    recipe = _load(tmp_path, DOC_TIES)
    m = recipe.method
    assert isinstance(m, Ties)
    assert (m.scope, m.elect, m.zero_sign, m.aggregate, m.lam) == ("per_tensor", "mass", "positive", "mean", 1.0)
    assert m.weights == (1.0, 0.3, 0.5) and m.densities == (0.7, 0.5, 0.33)
    assert recipe.dtype == "float16" and recipe.base == "models/llama-base"  # relative to the working directory
    assert recipe.origin["format"] == "mergekit" and "int8_mask" in recipe.origin["warnings"][0]


def test_documentation_recipes_with_gradients_and_filters_list_every_problem(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, DOC_TIES_GRADIENT)
    text = str(info.value)
    assert "models[0].parameters.density" in text and "gradient" in text
    assert "models[1].parameters.weight" in text


def test_documentation_linear_becomes_a_weighted_mean_on_the_first_model(tmp_path):
    recipe = _load(tmp_path, DOC_LINEAR)
    assert isinstance(recipe.method, Average)
    assert recipe.base == "models/a" and recipe.models == ("models/b",)
    assert recipe.method.base_weight == 1.0 and recipe.method.weights == (0.3,)
    text = DOC_LINEAR.replace("weight: 1.0", "weight: 0.7") + "parameters: {normalize: false}\n"
    not_normalized = _load(tmp_path, text)
    # Σ w θ over the models' own values, undivided, in mergekit's order (hp40b C61: not θ_0 + Σ w (θ − θ_0))
    assert isinstance(not_normalized.method, Average) and not_normalized.method.normalize_weights is False
    assert (not_normalized.method.base_weight, not_normalized.method.weights) == (0.7, (0.3,))
    # hp70a c16: weights of 1e-9 and 2e-9 (a sum of 3e-9, which mergekit divides by) were refused as summing to 0
    tiny = _load(tmp_path, DOC_LINEAR.replace("weight: 1.0", "weight: 1e-9").replace("weight: 0.3", "weight: 2e-9"))
    assert (tiny.method.base_weight, tiny.method.weights) == (1e-9, (2e-9,))
    with pytest.raises(ConfigError, match="the weights sum to 0"):
        _load(tmp_path, DOC_LINEAR.replace("weight: 0.3", "weight: -1.0"))
    # hp71a c09: weights of 3e38 each sum past float32 (found only after the merge, as a non-finite value)
    with pytest.raises(ConfigError, match=r"add up, in this order, to 6e\+38 after 2 of them, past float32's 3\.4e38"):
        _load(tmp_path, DOC_LINEAR.replace("weight: 1.0", "weight: 3.0e+38").replace("weight: 0.3", "weight: 3.0e+38"))


def test_documentation_task_arithmetic_drops_the_listed_base(tmp_path):
    recipe = _load(tmp_path, DOC_TASK_ARITHMETIC)
    assert isinstance(recipe.method, TaskArithmetic)
    assert recipe.models == ("models/a", "models/b")
    assert recipe.method.weights == (0.6, 0.4) and recipe.method.lam == 0.8
    assert recipe.origin["base_listed_among_models"] is True


def test_documentation_dare_ties(tmp_path):
    recipe = _load(tmp_path, DOC_DARE_TIES)
    m = recipe.method
    assert isinstance(m, DareTies)
    assert m.drop_rate == pytest.approx(0.47) and m.aggregate == "sum" and m.weights == (0.4, 0.3)
    assert any("bernoulli" in w for w in recipe.origin["warnings"])


@pytest.mark.parametrize("extra,needle", [
    ({"merge_method": "passthrough"}, "merge_method 'passthrough' is not supported"),
    ({"slices": []}, "slices"),
    ({"tokenizer_source": "model:other"}, "tokenizer_source 'model:other'"),  # union is read since pass 11
    ({"parameters": {"epsilon": 0.1}}, "parameters.epsilon"),
    ({"chat_template": "chatml"}, "chat_template"),
])
def test_unsupported_mergekit_keys_are_listed(tmp_path, extra, needle):
    data = yaml.safe_load(DOC_TIES)
    data.update(extra)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        _load(tmp_path, yaml.safe_dump(data))


def test_missing_weight_is_an_error_as_in_mergekit(tmp_path):
    data = yaml.safe_load(DOC_TIES)
    del data["models"][1]["parameters"]["weight"]
    with pytest.raises(ConfigError, match="every model needs a weight"):
        _load(tmp_path, yaml.safe_dump(data))


def _mergekit_ties_by_hand(base, models, densities, weights, lam=1.0, normalize=True):
    """mergekit's ties on one tensor, entry by entry in Python floats (the reference)."""
    flat_base = base.reshape(-1).tolist()
    deltas = []
    for model, density in zip(models, densities):
        delta = [m - b for m, b in zip(model.reshape(-1).tolist(), flat_base)]
        k = max(1, int(density * len(delta)))
        keep = sorted(range(len(delta)), key=lambda i: -abs(delta[i]))[:k]
        deltas.append([d if i in keep else 0.0 for i, d in enumerate(delta)])
    out = []
    for i, b in enumerate(flat_base):
        weighted = [w * d[i] for w, d in zip(weights, deltas)]
        sign = 1.0 if sum(weighted) >= 0 else -1.0  # + on a zero sum
        agree = [j for j, v in enumerate(weighted) if v != 0 and (v > 0) == (sign > 0)]
        total = sum(weighted[j] for j in agree)
        divisor = sum(weights[j] for j in agree) if normalize else 1.0
        out.append(b + lam * total / (divisor if divisor != 0 else 1.0))
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


@pytest.mark.parametrize("normalize", [True, False])
def test_tiny_mergekit_ties_equals_the_hand_computed_reference(tmp_path, normalize):
    g = torch.Generator().manual_seed(7)
    base = torch.randn(6, 5, generator=g)
    models = [base + torch.randn(6, 5, generator=g) * s for s in (0.5, 1.0, 0.8)]
    for k, value in enumerate([base, *models]):
        write_hf_dir(tmp_path / f"m{k}", {"layer.weight": value, "norm.weight": value[0].clone()})
    densities, weights = [0.5, 0.3, 0.8], [1.0, 0.6, -0.4]
    recipe = {"merge_method": "ties", "base_model": str(tmp_path / "m0"),
              "models": [{"model": str(tmp_path / f"m{k + 1}"), "parameters": {"density": d, "weight": w}}
                         for k, (d, w) in enumerate(zip(densities, weights))],
              "parameters": {"normalize": normalize, "lambda": 0.9}, "dtype": "float32"}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "mk.yaml"), "-o", str(tmp_path / "out")]) == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = _mergekit_ties_by_hand(base, models, densities, weights, lam=0.9, normalize=normalize)
    torch.testing.assert_close(merged["layer.weight"].double(), expected, atol=1e-6, rtol=1e-6)
    manifest = json.loads((tmp_path / "out" / "tiesmerge.json").read_text())
    assert manifest["recipe"]["origin"]["format"] == "mergekit"
    assert "sum" in manifest["recipe"]["origin"]["semantics"]


def test_mergekit_lora_reference_on_the_base_is_the_adapter(tmp_path):
    from helpers_adapters import LORA_MODULES, lora_delta, random_lora, write_lora_dir
    from helpers_ckpt import make_base

    base = make_base(0)
    write_hf_dir(tmp_path / "base", base)
    factors = random_lora(base, 2, seed=0)
    write_lora_dir(tmp_path / "lora", factors, alpha=4.0)
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"),
              "models": [{"model": f"{tmp_path / 'base'}+{tmp_path / 'lora'}", "parameters": {"weight": 0.5}}]}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "mk.yaml"), "-o", str(tmp_path / "out")]) == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    delta = lora_delta(factors, 4.0)
    for module in LORA_MODULES:
        name = module + ".weight"
        torch.testing.assert_close(merged[name], base[name] + 0.5 * delta[name], atol=1e-6, rtol=1e-5)


def test_exact_k_trim_keeps_exactly_k_with_ties_at_the_threshold():
    from tiesmerge.methods import ops

    tau = torch.tensor([[3.0, 1.0, -1.0, 1.0, 2.0, -1.0, 0.5, 1.0]])  # five entries tie at |1|
    keep = torch.tensor([4])
    kept = ops.trim_sorted_k(tau.clone(), keep)
    assert int((kept != 0).sum()) == 4  # 3, 2 and two of the five ties
    assert kept[0, 0] == 3.0 and kept[0, 4] == 2.0 and kept[0, 6] == 0.0
    # the default keeps every tie: seven entries
    assert int((ops.trim_at(tau.clone(), torch.tensor([1.0])) != 0).sum()) == 7


def test_exact_k_needs_per_tensor_scope_and_whole_tensors():
    import tiesmerge
    from helpers_ckpt import make_family

    with pytest.raises(ConfigError, match="per_tensor"):
        Ties(threshold_ties="sort")
    base, models = make_family(1)
    method = Ties(scope="per_tensor", threshold_ties="sort", density=0.3)
    merged = tiesmerge.merge(base, models, method)  # one model: the merged τ is its trimmed τ
    for name, value in base.items():
        if value.is_floating_point():
            expected = max(1, int(0.3 * value.numel()))
            assert int(((merged[name] - value) != 0).sum()) == expected, name
    with pytest.raises(ConfigError, match="one chunk"):
        tiesmerge.merge(base, models, method, memory_budget=2048)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("listed_base", [False, True])
def test_mergekit_linear_equals_its_float32_operations_bit_for_bit(tmp_path, dtype, listed_base):
    """mergekit 0.1.5's linear: result = 0; result.addcmul_(θ_i, w_i) in the models' order (float32,
    bf16 values widened), then result / Σ w (float32), cast to the output dtype."""
    g = torch.Generator().manual_seed(3)
    stored = getattr(torch, dtype)
    values = [(torch.randn(33, 17, generator=g) * s).to(stored) for s in (1.0, 0.7, 1.3)]
    for k, value in enumerate(values):
        write_hf_dir(tmp_path / f"m{k}", {"layer.weight": value})
    weights = [0.5, 0.3, 0.2]
    recipe = {"merge_method": "linear", "dtype": dtype,
              "models": [{"model": str(tmp_path / f"m{k}"), "parameters": {"weight": w}}
                         for k, w in enumerate(weights)]}
    if listed_base:  # base_model among the models: it is read as the base and counts with its weight
        recipe["base_model"] = str(tmp_path / "m1")
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "mk.yaml"), "-o", str(tmp_path / "out")]) == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))["layer.weight"]
    w = torch.tensor(weights, dtype=torch.float32)
    result = torch.zeros(33, 17)
    for value, coefficient in zip(values, w.unbind(0), strict=True):
        result.addcmul_(value, coefficient)
    expected = result.div_(w.sum()).to(stored)
    assert merged.dtype == stored
    assert torch.equal(merged.view(torch.int16 if stored == torch.bfloat16 else torch.int32),
                       expected.view(torch.int16 if stored == torch.bfloat16 else torch.int32))


def test_validate_lists_a_density_that_keeps_nothing_with_the_other_problems(tmp_path, capsys):
    """hp22 N4: a recipe's `density: -1` was reported only once its four other problems were fixed."""
    from helpers_ckpt import run_cli, write_family_dirs

    b, ms = write_family_dirs(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\n"
                      f"    parameters: {{weight: .nan, density: 0.5}}\n  - model: {ms[1]}\n"
                      f"    parameters: {{weight: 1, density: -1}}\nparameters: {{lambda: .inf}}\n")
    rc, out, err = run_cli(["validate", str(recipe)], capsys)
    assert rc == 2 and "3 problems" in err and "models[1].parameters.density: -1 keeps nothing" in err, err
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\n"
                      f"    parameters: {{weight: 1}}\n  - model: {ms[1]}\n    parameters: {{weight: 1}}\n"
                      "parameters: {density: 0}\n")
    rc, out, err = run_cli(["validate", str(recipe)], capsys)
    assert rc == 2 and err.count("parameters.density: 0 keeps nothing") == 1, err
