"""Hostile pass 40b, C61: mergekit recipes whose float32 outputs differed from mergekit 0.1.5's by a rounding.

mergekit cannot be imported here: each test computes mergekit's float32 operations by hand, in its order (its
``merge_methods/linear.py`` and ``generalized_task_arithmetic.py``), and asks for the same bits."""

from __future__ import annotations

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiesmerge
from helpers_ckpt import make_family, run_cli, write_hf_dir
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Average, DareLinear, TaskArithmetic

SHAPE = (64, 48)


def _family(tmp_path, n: int, seed: int):
    """A base and n fine-tunes near it, plus a tensor every model holds unchanged."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*SHAPE, generator=g)
    same = torch.randn(7, 5, generator=g)
    tuned = [base + 0.1 * torch.randn(*SHAPE, generator=g) for _ in range(n)]
    write_hf_dir(tmp_path / "base", {"layer.weight": base, "same.weight": same})
    for k, value in enumerate(tuned):
        write_hf_dir(tmp_path / f"m{k}", {"layer.weight": value, "same.weight": same})
    return base, same, tuned


def _merge(tmp_path, recipe: dict, capsys) -> dict[str, torch.Tensor]:
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    rc, _, err = run_cli(["merge", str(tmp_path / "mk.yaml"), "-o", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    return load_file(str(tmp_path / "out" / "model.safetensors"))


def _bits(value: torch.Tensor) -> torch.Tensor:
    return value.contiguous().view(torch.int32)


def _mergekit_linear(values: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    """mergekit 0.1.5's linear: result = 0; result.addcmul_(θ_i, w_i) in the models' order (float32 weights), then
    result / Σ w with normalize."""
    w = torch.tensor(weights, dtype=torch.float32)
    result = torch.zeros_like(values[0], dtype=torch.float32)
    for value, coefficient in zip(values, w.unbind(0), strict=True):
        result.addcmul_(value, coefficient)
    return result.div_(w.sum()) if normalize else result


def _mergekit_dare_linear_density_1(base: torch.Tensor, values: list[torch.Tensor], weights: list[float],
                                    normalize: bool, lam: float) -> torch.Tensor:
    """mergekit 0.1.5's generalized task arithmetic without sparsification (density 1 draws nothing) and without a
    consensus: deltas = θ_t − base; deltas *= w (float32); mixed = deltas.sum(0); / w.sum() (1 below 1e-8) with
    normalize; * lambda where it is not 1; base + mixed."""
    deltas = torch.stack([v - base for v in values])
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * base.dim()))
    deltas.mul_(w)
    mixed = deltas.sum(dim=0)
    divisor = w.sum(dim=0)
    divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return base + mixed


@pytest.mark.parametrize("kernels", ["1", "0"])  # the fused kernel and the torch path
@pytest.mark.parametrize("weights,listed_base", [
    ((0.5, 0.5), False),  # hp40b C61's recipe
    ((0.01, 0.78, 0.21), False),  # float32's sum of these is 0.99999994: a division by it would show
    ((0.3, 0.2, 0.5), True),  # base_model listed among the models (second): it counts with its weight, in place
])
def test_mergekit_linear_without_normalize_equals_its_float32_operations_bit_for_bit(tmp_path, capsys, monkeypatch,
                                                                                     weights, listed_base, kernels):
    """hp40b C61: mergekit `linear` with `normalize: false` (weights 0.5/0.5, dtype float32) differed from mergekit
    0.1.5 by one float32 ulp in about a tenth of the entries: it ran as θ_0 + Σ w_i (θ_i − θ_0) on the first model,
    where mergekit sums w_i θ_i from 0 over the models' own values and divides by nothing."""
    monkeypatch.setenv("TIESMERGE_KERNELS", kernels)
    base, same, tuned = _family(tmp_path, 3, seed=61)
    if listed_base:
        paths = [tmp_path / "m0", tmp_path / "base", tmp_path / "m1"]
        values = [tuned[0], base, tuned[1]]
    else:
        paths = [tmp_path / f"m{k}" for k in range(len(weights))]
        values = tuned[:len(weights)]
    recipe = {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
              "models": [{"model": str(p), "parameters": {"weight": w}} for p, w in zip(paths, weights, strict=True)]}
    if listed_base:
        recipe["base_model"] = str(tmp_path / "base")
    merged = _merge(tmp_path, recipe, capsys)
    assert torch.equal(_bits(merged["layer.weight"]), _bits(_mergekit_linear(values, list(weights), False)))
    assert torch.equal(_bits(merged["same.weight"]), _bits(_mergekit_linear([same] * len(weights), list(weights),
                                                                            False)))


@pytest.mark.parametrize("kernels", ["1", "0"])
@pytest.mark.parametrize("weights,normalize,lam", [
    ((0.7, 0.4), True, 1.0),  # hp40b C61's recipe
    ((0.7, 0.4, 0.25), True, 0.8),
    ((0.7, -0.4), True, 1.0),
    ((0.7, 0.4), False, 1.5),
])
def test_mergekit_dare_linear_at_density_1_equals_its_float32_operations_bit_for_bit(tmp_path, capsys, monkeypatch,
                                                                                     weights, normalize, lam, kernels):
    """hp40b C61: mergekit `dare_linear` at density 1 (nothing drawn), weights 0.7/0.4, normalize true, differed from
    mergekit 0.1.5 in 6,022 of 24,736 entries (by up to 1.2e-7): the weights were divided by their sum (in float64)
    before the weighted task vectors were summed, where mergekit divides the float32 sum by the weights' float32
    sum."""
    monkeypatch.setenv("TIESMERGE_KERNELS", kernels)
    base, same, tuned = _family(tmp_path, len(weights), seed=62)
    recipe = {"merge_method": "dare_linear", "base_model": str(tmp_path / "base"), "dtype": "float32",
              "parameters": {"normalize": normalize, "lambda": lam},
              "models": [{"model": str(tmp_path / f"m{k}"), "parameters": {"weight": w, "density": 1.0}}
                         for k, w in enumerate(weights)]}
    merged = _merge(tmp_path, recipe, capsys)
    expected = _mergekit_dare_linear_density_1(base, tuned, list(weights), normalize, lam)
    assert torch.equal(_bits(merged["layer.weight"]), _bits(expected))
    assert torch.equal(merged["same.weight"], same)


def test_the_translations_follow_mergekits_order():
    """linear without normalize becomes average's weighted sum of the models' own values (nothing divided, the first
    model standing as the base); dare_linear keeps the weights as given and divides after the sum."""
    from tiesmerge.recipe_mergekit import translate_mergekit

    recipe, origin = translate_mergekit({"merge_method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": "a", "parameters": {"weight": 0.25}}, {"model": "b", "parameters": {"weight": 0.75}}]})
    assert recipe["method"] == "average" and recipe["base"] == "a" and recipe["models"] == ["b"]
    assert recipe["parameters"] == {"base_weight": 0.25, "weights": [0.75], "normalize_weights": False}
    assert "undivided" in origin["semantics"]
    recipe, origin = translate_mergekit({"merge_method": "dare_linear", "base_model": "base",
                                         "parameters": {"normalize": True}, "models": [
                                             {"model": "a", "parameters": {"weight": 0.7, "density": 0.5}},
                                             {"model": "b", "parameters": {"weight": 0.4, "density": 0.5}}]})
    assert recipe["method"] == "dare_linear"
    assert recipe["parameters"]["weights"] == [0.7, 0.4] and recipe["parameters"]["normalize_weights"] is True
    assert recipe["parameters"]["drop_rate"] == pytest.approx(0.5)


def test_the_methods_options_keep_their_own_semantics():
    """average's normalize_weights false is the undivided sum of the models' own values, with base_weight only;
    dare_linear's normalize_weights divides after the sum (as task_arithmetic's), and its default sums as before."""
    base, models = make_family(2, seed=3)
    with pytest.raises(ConfigError, match="^average: normalize_weights false needs base_weight") as caught:
        Average(weights=(0.5, 0.5), normalize_weights=False)  # named once (hp69a c40: "average: average: ..."),
    assert "give base_weight and weights" in caught.value.hint  # its hint kept
    summed = tiesmerge.merge(base, models, Average(weights=(0.3, 0.5), base_weight=0.2, normalize_weights=False))
    divided = tiesmerge.merge(base, models, Average(weights=(0.6, 1.0), base_weight=0.4))
    for name, value in base.items():
        if value.is_floating_point():
            expected = _mergekit_linear([value, models[0][name], models[1][name]], [0.2, 0.3, 0.5], False)
            assert torch.equal(_bits(summed[name]), _bits(expected)), name
            torch.testing.assert_close(summed[name], divided[name])
    # no division where the weights sum to 0: nothing to divide by, nothing refused
    zero = tiesmerge.merge(base, models, Average(weights=(1.0, -1.0), base_weight=0.0, normalize_weights=False))
    for name, value in base.items():
        if value.is_floating_point():
            torch.testing.assert_close(zero[name], models[0][name].float() - models[1][name].float())
    weights = (0.7, 0.4)
    dare = tiesmerge.merge(base, models, DareLinear(drop_rate=0.0, lam=0.8, weights=weights, normalize_weights=True))
    ta = tiesmerge.merge(base, models, TaskArithmetic(lam=0.8, weights=weights, normalize_weights=True))
    plain = tiesmerge.merge(base, models, DareLinear(drop_rate=0.0, lam=0.8, weights=weights))
    for name in base:
        assert torch.equal(dare[name], ta[name]), name
    changed = [n for n, v in base.items() if v.is_floating_point() and not torch.equal(dare[n], plain[n])]
    assert changed  # Σ w = 1.1: the division shows
    assert DareLinear(weights=weights, normalize_weights=True).weights_multiply is False
    assert DareLinear(weights=weights).weights_multiply is True


def test_dare_linear_with_a_random_drop_and_normalize_still_merges(tmp_path, capsys):
    """density < 1 (random masks): normalize divides the dropped, weighted sum by Σ w, as mergekit's; the same merge
    as the weights divided first but for roundings."""
    base, same, tuned = _family(tmp_path, 2, seed=63)
    recipe = {"merge_method": "dare_linear", "base_model": str(tmp_path / "base"), "dtype": "float32",
              "parameters": {"normalize": True},
              "models": [{"model": str(tmp_path / f"m{k}"), "parameters": {"weight": w, "density": 0.5}}
                         for k, w in enumerate((0.7, 0.4))]}
    merged = _merge(tmp_path, recipe, capsys)
    manual = tiesmerge.merge({"layer.weight": base}, [{"layer.weight": t} for t in tuned],
                             DareLinear(drop_rate=0.5, weights=(0.7 / 1.1, 0.4 / 1.1)))
    torch.testing.assert_close(merged["layer.weight"], manual["layer.weight"], rtol=0, atol=1e-6)
    assert not torch.equal(merged["layer.weight"], base)
    dropped = (merged["layer.weight"] - base).abs() < 1e-9
    assert 0.1 < float(dropped.float().mean()) < 0.5  # both dropped with probability 1/4
