"""mergekit recipes of the issue-12 methods read as they are (recipe_mergekit.py): what each becomes,
mergekit's defaults, slerp's filters and gradients, the errors, and float32 merges from the YAML
equal bit for bit to mergekit's operations re-done here."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from helpers_ckpt import write_hf_dir
from tiesmerge.cli.main import main
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Breadcrumbs, BreadcrumbsTies, Della, DellaLinear, ModelStock, NuSlerp, Slerp
from tiesmerge.recipe import load_recipe

SLERP_FILTERS = """
merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {m1}}}]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
"""


def _load(tmp_path, text, **paths):
    path = tmp_path / "recipe.yaml"
    path.write_text(text.format(**{k: str(v) for k, v in paths.items()}))
    return load_recipe(path)


def _family(tmp_path, n=3, layers=2):
    """base + n fine-tunes, float32 HF directories with a config.json of ``layers`` layers."""
    g = torch.Generator().manual_seed(0)
    names = ["model.embed_tokens.weight"] + [f"model.layers.{i}.{m}" for i in range(layers) for m in
                                             ("self_attn.q_proj.weight", "mlp.up_proj.weight",
                                              "input_layernorm.weight")] + ["model.norm.weight"]
    base = {k: torch.randn((6,) if "norm" in k else (10, 6), generator=g) for k in names}
    paths = {"base": write_hf_dir(tmp_path / "base", base)}
    states = {"base": base}
    for i in range(1, n + 1):
        state = {k: v + torch.round(torch.randn(v.shape, generator=g) * 8) / 64 for k, v in base.items()}
        paths[f"m{i}"] = write_hf_dir(tmp_path / f"m{i}", state)
        states[f"m{i}"] = state
    for p in paths.values():
        (p / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": layers}))
    return paths, states


def _merge_yaml(tmp_path, text, paths) -> dict[str, torch.Tensor]:
    recipe = tmp_path / "run.yaml"
    recipe.write_text(text.format(**{k: str(v) for k, v in paths.items()}))
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "-o", str(out), "--force", "--no-progress"]) == 0
    return load_file(str(out / "model.safetensors"))


def test_slerp_filters_and_gradients_become_t_by_name(tmp_path):
    paths, _ = _family(tmp_path, n=1, layers=5)
    recipe = _load(tmp_path, SLERP_FILTERS, **paths)
    m = recipe.method
    assert isinstance(m, Slerp) and m.anchor == "base" and m.layers == 5
    assert m.t_by_name == "self_attn=0.0,0.5,0.3,0.7,1.0;mlp=1.0,0.5,0.7,0.3,0.0;*=0.5"
    assert recipe.models == (str(paths["m1"]),) and recipe.origin["base_listed_among_models"]
    assert m.t_for("model.layers.4.self_attn.q_proj.weight") == 1.0
    assert m.t_for("model.layers.2.mlp.up_proj.weight") == 0.7
    assert m.t_for("model.embed_tokens.weight") == 0.5
    scalar = _load(tmp_path, SLERP_FILTERS.replace("  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n"
                                                   "    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n"
                                                   "    - value: 0.5", "  t: 0.3"), **paths)
    assert scalar.method.t == 0.3 and scalar.method.t_by_name is None


def test_each_family_method_translates_with_mergekits_defaults(tmp_path):
    paths, _ = _family(tmp_path)
    common = "base_model: {base}\nmodels:\n  - {{model: {m1}, parameters: {{weight: 1.0}}}}\n" \
             "  - {{model: {m2}, parameters: {{weight: 0.5}}}}\n"
    bc = _load(tmp_path, "merge_method: breadcrumbs\n" + common + "parameters: {{density: 0.3}}\n", **paths).method
    assert isinstance(bc, Breadcrumbs)
    assert (bc.density, bc.gamma, bc.normalize_weights, bc.rescale, bc.scope, bc.threshold_ties) == \
        (0.3, 0.01, False, "none", "per_tensor", "sort")
    bt = _load(tmp_path, "merge_method: breadcrumbs_ties\n" + common + "parameters: {{density: 0.3, gamma: 0.05, "
               "normalize: true}}\n", **paths).method
    assert isinstance(bt, BreadcrumbsTies) and (bt.aggregate, bt.zero_sign, bt.gamma) == ("mean", "positive", 0.05)
    de = _load(tmp_path, "merge_method: della\n" + common + "parameters: {{density: 0.5}}\n", **paths)
    assert isinstance(de.method, Della) and (de.method.aggregate, de.method.rescale, de.method.epsilon) == \
        ("mean", "l1", 0.15)
    assert any("random draws differ" in w for w in de.origin["warnings"])
    dl = _load(tmp_path, "merge_method: della_linear\n" + common + "parameters: {{density: 0.5, epsilon: 0.1, "
               "rescale: false}}\n", **paths).method
    assert isinstance(dl, DellaLinear) and (dl.normalize_weights, dl.rescale, dl.epsilon) == (False, "none", 0.1)
    ms = _load(tmp_path, "merge_method: model_stock\nbase_model: {base}\nmodels: [{{model: {m1}}}, {{model: {m2}}}]\n"
               "parameters: {{filter_wise: true}}\n", **paths).method
    assert isinstance(ms, ModelStock) and ms.filter_wise
    nu = _load(tmp_path, "merge_method: nuslerp\n" + common, **paths)
    assert isinstance(nu.method, NuSlerp) and nu.method.of == "task_vectors" and nu.method.weights == (1.0, 0.5)
    free = _load(tmp_path, "merge_method: nuslerp\nmodels:\n  - {{model: {m1}, parameters: {{weight: 1.0}}}}\n"
                 "  - {{model: {m2}, parameters: {{weight: 3.0}}}}\nparameters: {{nuslerp_flatten: false}}\n", **paths)
    assert free.method.of == "base_and_model" and free.method.t == 0.75 and not free.method.flatten
    assert free.base == str(paths["m1"]) and free.models == (str(paths["m2"]),)


@pytest.mark.parametrize("text,needle", [
    ("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {m1}}}, {{model: {m2}}}]\nparameters: {{t: 0.5}}\n",
     "exactly one other model"),
    ("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {m1}}}]\n", "parameters.t"),
    ("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {m1}}}]\n"
     "parameters: {{t: [{{filter: mlp, value: 0.2}}]}}\n", "every tensor"),
    ("merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {m1}}}]\nparameters: {{t: 0.5, embed_slerp: true}}\n",
     "embed_slerp"),
    ("merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n"
     "  - {{model: {m1}, parameters: {{weight: 1, density: 0.2}}}}\n"
     "  - {{model: {m2}, parameters: {{weight: 1, density: 0.3}}}}\n", "differ"),
    ("merge_method: model_stock\nbase_model: {base}\nmodels: [{{model: {m1}}}]\n", "at least two"),
    ("merge_method: nuslerp\nbase_model: {base}\nmodels: [{{model: {m1}, parameters: {{weight: 1}}}}]\n",
     "exactly two"),
    ("merge_method: della\nbase_model: {base}\nmodels:\n  - {{model: {m1}, parameters: {{weight: 1}}}}\n"
     "parameters: {{density: 0.9, epsilon: 0.15}}\n", "epsilon"),
])
def test_family_recipe_errors_say_what_is_wrong(tmp_path, text, needle):
    paths, _ = _family(tmp_path)
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, text, **paths)
    assert needle in str(info.value)


def test_slerp_gradient_without_a_layer_count_is_an_error(tmp_path):
    paths, _ = _family(tmp_path, n=1)
    (paths["base"] / "config.json").unlink()
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        _load(tmp_path, SLERP_FILTERS, **paths)


def _mergekit_breadcrumbs_ties_f32(base, taus, weights, density, gamma, normalize):
    """mergekit 0.1.5's breadcrumbs_ties on one float32 tensor: magnitude_outliers, then the sum
    consensus (sign of the weighted sum, + on 0) and the agreeing weighted deltas."""
    masked = []
    for tau in taus:
        n = tau.numel()
        kept, top = int(density * n), int(gamma * n)
        bottom = max(0, n - kept - top)
        order = torch.sort(tau.abs().reshape(-1), descending=False).indices
        mask = torch.zeros(n)
        mask[order[bottom:bottom + kept]] = 1
        masked.append(tau * mask.reshape(tau.shape))
    deltas = torch.stack(masked)
    w = torch.tensor(weights).reshape(-1, *([1] * tau.dim()))
    deltas = deltas * w
    sign = deltas.sign()
    majority = (deltas.sum(dim=0) >= 0).float() * 2 - 1
    mask = sign == majority
    mixed = (deltas * mask).sum(dim=0)
    if normalize:
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return base + mixed


@pytest.mark.parametrize("normalize", [False, True])
def test_breadcrumbs_ties_yaml_is_mergekits_float32_bit_for_bit(tmp_path, normalize):
    paths, states = _family(tmp_path)
    text = ("merge_method: breadcrumbs_ties\nbase_model: {base}\nmodels:\n"
            "  - {{model: {m1}, parameters: {{weight: 1.0}}}}\n  - {{model: {m2}, parameters: {{weight: 0.7}}}}\n"
            "  - {{model: {m3}, parameters: {{weight: 0.5}}}}\n"
            f"parameters: {{{{density: 0.4, gamma: 0.05, normalize: {str(normalize).lower()}}}}}\ndtype: float32\n")
    out = _merge_yaml(tmp_path, text, paths)
    for k, b in states["base"].items():
        taus = [states[f"m{i}"][k] - b for i in (1, 2, 3)]
        assert torch.equal(out[k], _mergekit_breadcrumbs_ties_f32(b, taus, [1.0, 0.7, 0.5], 0.4, 0.05, normalize)), k


def test_family_yaml_merges_equal_the_methods_they_name(tmp_path):
    paths, states = _family(tmp_path, layers=3)
    ms = [states[f"m{i}"] for i in (1, 2, 3)]
    import tiesmerge

    out = _merge_yaml(tmp_path, SLERP_FILTERS, paths)
    schedule = "self_attn=0,0.5,0.3,0.7,1;mlp=1,0.5,0.7,0.3,0;*=0.5"
    want = tiesmerge.merge(states["base"], ms[:1], Slerp(anchor="base", t_by_name=schedule, layers=3))
    assert all(torch.equal(out[k], want[k]) for k in want)
    out = _merge_yaml(tmp_path, "merge_method: model_stock\nbase_model: {base}\nmodels: [{{model: {m1}}}, "
                      "{{model: {m2}}}, {{model: {m3}}}]\n", paths)
    want = tiesmerge.merge(states["base"], ms, ModelStock())
    assert all(torch.equal(out[k], want[k]) for k in want)
    out = _merge_yaml(tmp_path, "merge_method: della\nbase_model: {base}\nmodels:\n"
                      "  - {{model: {m1}, parameters: {{weight: 1.0}}}}\n"
                      "  - {{model: {m2}, parameters: {{weight: 0.5}}}}\n"
                      "parameters: {{density: 1.0}}\n", paths)  # density 1: the deterministic part
    want = tiesmerge.merge(states["base"], ms[:2], "ties", density=1.0, weights=(1.0, 0.5), zero_sign="positive",
                           scope="per_tensor")
    assert all(torch.equal(out[k], want[k]) for k in want)
