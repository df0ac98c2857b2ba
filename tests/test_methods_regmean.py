"""RegMean (methods/regmean.py) through the streaming engine: the closed form at alpha 1,
reductions to averaging, and the features no model saw."""

from __future__ import annotations

import pytest
import torch

from helpers_merge import gram_stats, linear_family, merge
from tiesmerge.methods import RegMean
from tiesmerge.stats import gram_matrices


@pytest.mark.parametrize("budget", [None, 1])  # 1 byte: one row per chunk, every Gram re-used across chunks
def test_regmean_alpha_1_is_the_joint_least_squares_solution(budget):
    base, models = linear_family()
    g = torch.Generator().manual_seed(4)
    inputs = [torch.randn(n, 5, generator=g) @ torch.randn(5, 5, generator=g) for n in (40, 25, 60)]
    stats = []
    for state, x in zip(models, inputs):
        layer = torch.nn.Linear(5, 7)
        layer.load_state_dict({"weight": state["layer.weight"], "bias": state["layer.bias"]})
        holder = torch.nn.Module()
        holder.layer = layer
        stats.append(gram_matrices(holder, [x[:10], x[10:]], lambda m, b: m.layer(b)))
    merged = merge(base, models, RegMean(alpha=1.0), stats, memory_budget=budget)
    # min_W sum_t ||X_t W^T - X_t W_t^T||^2 / N_t, solved as one stacked least-squares problem
    rows = [x.double() / len(x) ** 0.5 for x in inputs]
    targets = [r @ m["layer.weight"].double().T for r, m in zip(rows, models)]
    expected = torch.linalg.lstsq(torch.cat(rows), torch.cat(targets)).solution.T
    torch.testing.assert_close(merged["layer.weight"].double(), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged["layer.bias"], torch.stack([m["layer.bias"] for m in models]).mean(0))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.95, 1.0])
def test_regmean_with_identical_grams_is_averaging(alpha):
    base, models = linear_family()
    x = torch.randn(30, 5)
    gram = x.T @ x / 30
    merged = merge(base, models, RegMean(alpha=alpha), [gram_stats({"layer.weight": gram}) for _ in models])
    for name in base:
        torch.testing.assert_close(merged[name], torch.stack([m[name] for m in models]).mean(0), rtol=1e-5, atol=1e-5)


def test_regmean_alpha_shrinks_off_diagonal_entries():
    """alpha = 0 keeps only the diagonals: each input column becomes a diag-weighted mean."""
    base, models = linear_family(n_models=2)
    grams = [torch.diag(torch.tensor([1.0, 2, 3, 4, 5])) + 0.5, torch.diag(torch.tensor([5.0, 4, 3, 2, 1])) + 0.5]
    merged = merge(base, models, RegMean(alpha=0.0), [gram_stats({"layer.weight": g}) for g in grams])
    d = torch.stack([g.diagonal() for g in grams])  # (2, in)
    expected = (d[0] * models[0]["layer.weight"] + d[1] * models[1]["layer.weight"]) / d.sum(0)
    torch.testing.assert_close(merged["layer.weight"], expected, rtol=1e-5, atol=1e-6)


def test_regmean_feature_no_model_saw_is_averaged():
    base, models = linear_family(n_models=2)
    x = torch.randn(20, 5)
    x[:, 2] = 0  # no input ever on feature 2: a zero row and column in every Gram
    grams = [x.T @ x / 20, (2 * x).T @ (2 * x) / 20]
    merged = merge(base, models, RegMean(alpha=1.0), [gram_stats({"layer.weight": g}) for g in grams])
    mean = torch.stack([m["layer.weight"] for m in models]).mean(0)
    torch.testing.assert_close(merged["layer.weight"][:, 2], mean[:, 2])
    assert torch.isfinite(merged["layer.weight"]).all()


def test_a_model_whose_gram_statistic_is_all_zeros_is_said_to_have_no_say():
    """hp22 N5: an all-zero Gram matrix (an edited file, or a layer its data never reached) dropped that model from
    the tensor silently: the merge was the other model's exactly."""
    import warnings

    from tiesmerge.errors import MergeWarning

    base, models = linear_family(n_models=2)
    x = torch.randn(20, 5)
    grams = [torch.zeros(5, 5), x.T @ x / 20]
    with pytest.warns(MergeWarning, match=r"regmean: tensor 'layer.weight': the Gram statistic of model\(s\) 0 is all "
                                          r"zeros"):
        merged = merge(base, models, RegMean(alpha=1.0), [gram_stats({"layer.weight": g}) for g in grams])
    torch.testing.assert_close(merged["layer.weight"], models[1]["layer.weight"])
    # every model's zero: the plain mean, said once (statistics computed on nothing: hp88a c80)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        merge(base, models, RegMean(alpha=1.0), [gram_stats({"layer.weight": torch.zeros(5, 5)}) for _ in grams])
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and "every model's gram statistics are all zeros" in said[0], said
