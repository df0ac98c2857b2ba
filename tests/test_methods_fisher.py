"""Fisher merging (methods/fisher.py) through the streaming engine: a float64 reference,
reductions to averaging, parameters without statistics, and the options' checks."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from helpers_ckpt import make_family
from helpers_merge import fisher_stats, float_names, merge
from tiesmerge.errors import ConfigError
from tiesmerge.methods import Fisher, RegMean


# ---------------------------------------------------------------- Fisher
def test_fisher_with_equal_information_is_averaging():
    base, models = make_family(3)
    names = float_names(base)
    g = torch.Generator().manual_seed(5)
    shared = {n: torch.rand(base[n].shape, generator=g) for n in names}
    merged = merge(base, models, Fisher(), [fisher_stats(shared) for _ in models])
    for n in names:
        torch.testing.assert_close(merged[n], torch.stack([m[n] for m in models]).mean(0), rtol=1e-5, atol=1e-6)
    assert torch.equal(merged["model.position_ids"], base["model.position_ids"])


@pytest.mark.parametrize("normalize", ["none", "rms"])
def test_fisher_weighted_mean_matches_float64_reference(normalize):
    base, models = make_family(2)
    names = float_names(base)
    g = torch.Generator().manual_seed(6)
    fishers = [{n: torch.rand(base[n].shape, generator=g) ** 4 * 3 for n in names} for _ in models]
    fishers[0]["model.norm.weight"].zero_()  # floored: model 1 decides alone where model 0 has 0...
    fishers[1]["model.norm.weight"].zero_()  # ...and where both are 0, the mean
    eps = 1e-3
    merged = merge(base, models, Fisher(epsilon=eps, normalize=normalize), [fisher_stats(f) for f in fishers],
                   memory_budget=1)
    scales = [1.0, 1.0]
    if normalize == "rms":
        scales = [1 / float(torch.cat([f[n].double().reshape(-1) for n in names]).square().mean().sqrt())
                  for f in fishers]
    for n in names:
        w = [(f[n].double() * s).clamp_min(eps) for f, s in zip(fishers, scales)]
        expected = (w[0] * models[0][n].double() + w[1] * models[1][n].double()) / (w[0] + w[1])
        torch.testing.assert_close(merged[n].double(), expected, rtol=1e-5, atol=1e-6)
    mean = (models[0]["model.norm.weight"] + models[1]["model.norm.weight"]) / 2
    torch.testing.assert_close(merged["model.norm.weight"], mean)


def test_parameters_without_statistics_are_averaged():
    base, models = make_family(2)
    names = float_names(base)
    fishers = [{n: torch.full(base[n].shape, 1.0 + 9 * k) for n in names if "embed" not in n} for k in range(2)]
    merged = merge(base, models, Fisher(), [fisher_stats(f) for f in fishers])
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(merged[emb], (models[0][emb] + models[1][emb]) / 2)
    other = "lm_head.weight"
    torch.testing.assert_close(merged[other], (models[0][other] + 10 * models[1][other]) / 11)
    plan = tiesmerge.plan_merge(base, models, Fisher(), stats=[fisher_stats(f) for f in fishers])
    assert any("averaged for want of fisher statistics" in note for note in plan.notes)


def test_method_options_are_checked():
    with pytest.raises(ConfigError, match="alpha"):
        RegMean(alpha=1.5)
    with pytest.raises(ConfigError, match="epsilon"):
        Fisher(epsilon=0)
    with pytest.raises(ConfigError, match="normalize"):
        Fisher(normalize="sum")
    assert {"fisher", "regmean"} <= set(tiesmerge.METHODS)
