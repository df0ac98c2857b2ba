"""The analysis run (analysis/runner.py): statistics end to end by hand, streaming (chunked == whole),
fused == torch, the seeded subset sample, and typed errors."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from helpers_ckpt import make_family
from tiesmerge.errors import ConfigError, InvalidTensorError

# -- end to end on state dicts: one tensor of 10 entries, density 0.2 keeps 2 per model
BASE = {"w": torch.zeros(10)}


M0 = torch.tensor([5.0, 4.0, 1, 1, 1, 1, 1, 1, 1, 1])  # keeps entries 0, 1


M1 = torch.tensor([-5.0, 0.1, 4.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # keeps 0, 2


M2 = torch.tensor([6.0, -5.0, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])  # keeps 0, 1


def _hand_analysis(**kw):
    return tiesmerge.analyze(BASE, [{"w": M0.clone()}, {"w": M1.clone()}, {"w": M2.clone()}],
                             subsets_per_size=None, **kw)


def test_analyze_end_to_end_by_hand():
    data = _hand_analysis()
    assert data["kept_per_model"] == 2 and data["parameters"] == 10
    pairs, everyone = data["sign_conflicts"]["by_size"]
    # all three: entry 0 (+, -, +) and entry 1 (+4 vs -5) conflict; both are kept by >= 2 models
    assert everyone["subsets"][0]["conflicts"] == 2
    assert everyone["mean_of_parameters"] == pytest.approx(0.2)
    assert everyone["mean_of_kept_by_two_or_more"] == pytest.approx(1.0)
    # pairs (0,1): entry 0; (0,2): entry 1; (1,2): entry 0 -> one conflict in 10 each
    assert [s["conflicts"] for s in pairs["subsets"]] == [1, 1, 1]
    assert pairs["mean_of_parameters"] == pytest.approx(0.1)
    assert pairs["total_subsets"] == 3
    # redundancy: m0 keeps 5 + 4 of its L1 mass 17, and 25 + 16 of its squared norm 49
    red = data["redundancy"]
    assert red["at_density"]["l1_share"][0] == pytest.approx(9 / 17)
    assert red["at_density"]["l2_share"][0] == pytest.approx(41 / 49)
    assert red["l1_share"][0][red["densities"].index(0.2)] == pytest.approx(9 / 17, rel=2**-8)
    assert red["l1_share"][0][-1] == pytest.approx(1.0)
    # overlap: m0 and m1 share entry 0 of 3 kept between them
    assert data["overlap"]["jaccard"][0][1] == pytest.approx(1 / 3)
    assert data["overlap"]["jaccard"][0][2] == pytest.approx(1.0)
    # Fig. 6: entries 0, 1 are kept by > 1 model; TIES gives 5.5 (5, 6 agree) and 5 (-5 elected)
    mags = data["magnitudes"]["by_influence"]
    assert mags["count"] == [7, 1, 2]
    assert mags["mean"]["TIES"][2] == pytest.approx(5.25)
    assert mags["mean"]["averaging"][2] == pytest.approx((2.0 + 0.3) / 2)
    assert mags["mean"]["trim + disjoint mean"][2] == pytest.approx((2.0 + 0.5) / 2)
    assert mags["std"]["TIES"][2] == pytest.approx(0.25)
    assert mags["mean"]["TIES"][1] == pytest.approx(4.0)  # entry 2: only m1 keeps it
    assert mags["mean"]["TIES"][0] == 0.0  # nothing kept, nothing merged


def test_chunked_stream_gives_the_same_statistics(tmp_path):
    base, models = make_family(3, seed=3)
    whole = tiesmerge.analyze(base, models, memory_budget="1GiB", subsets_per_size=None)
    chunked = tiesmerge.analyze(base, models, memory_budget=4096, subsets_per_size=None)
    assert chunked["engine"]["chunks_per_pass"] > whole["engine"]["chunks_per_pass"]
    for key in ("sign_conflicts", "by_tensor", "overlap", "thresholds", "kept_per_model"):
        assert chunked[key] == whole[key], key
    for key in ("redundancy", "magnitudes"):
        assert _close(chunked[key], whole[key]), key


def _close(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-6, abs=1e-12)  # float32 sums within blocks
    return a == b


def test_fused_and_torch_histograms_agree(monkeypatch):
    base, models = make_family(3, seed=5)
    fused = tiesmerge.analyze(base, models)
    monkeypatch.setenv("TIESMERGE_KERNELS", "0")
    plain = tiesmerge.analyze(base, models)
    for key in ("thresholds", "redundancy", "sign_conflicts"):
        assert fused[key] == plain[key], key
    # exact: each model's k-th largest |tau| over its whole model
    names = [k for k, v in base.items() if v.is_floating_point()]
    for t, m in enumerate(models):
        tau = torch.cat([(m[k] - base[k]).flatten() for k in names]).abs()
        keep = int(0.2 * tau.numel())
        assert fused["thresholds"][t] == float(tau.sort(descending=True).values[keep - 1])


def test_subset_sample_is_seeded_and_bounded():
    base, models = make_family(6, seed=1)
    a = tiesmerge.analyze(base, models, subsets_per_size=4, seed=7)
    b = tiesmerge.analyze(base, models, subsets_per_size=4, seed=7)
    sizes = {s["size"]: s for s in a["sign_conflicts"]["by_size"]}
    assert [len(s["subsets"]) for s in a["sign_conflicts"]["by_size"]] == [4, 4, 4, 4, 1]
    assert sizes[3]["total_subsets"] == 20
    assert a["sign_conflicts"] == b["sign_conflicts"]


def test_bad_settings_and_inputs_are_typed_errors():
    base, models = make_family(2)
    with pytest.raises(ConfigError, match="at least 2"):
        tiesmerge.analyze(base, models[:1])
    with pytest.raises(ConfigError, match="not a percent"):
        tiesmerge.analyze(base, models, density=20)
    bad = {k: v.clone() for k, v in models[1].items()}
    bad["model.norm.weight"][3] = float("nan")
    with pytest.raises(InvalidTensorError, match="model.norm.weight"):
        tiesmerge.analyze(base, [models[0], bad])
