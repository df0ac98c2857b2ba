"""TSV-M (methods/tsv.py) against a float64 reference written from the authors' code (zero-padded
factors, whitened by a second SVD), its treatment of vectors, excluded names and small matrices,
the randomized SVD option, and the planner's workspace (a too-small budget names what it needs)."""

from __future__ import annotations

import re

import pytest
import torch

import tiesmerge
from helpers_svd import assemble, assert_close_state, polar64, svd_family, task_vectors64
from tiesmerge.engine.plan import FIXED_OVERHEAD, bytes_per_entry
from tiesmerge.errors import ConfigError
from tiesmerge.methods import TsvMerge
from tiesmerge.sizes import format_size


def ref_tsv_m(base, models, *, lam=1.0, rank_fraction=None, exclude="text_projection"):
    """The authors' compute_and_sum_svd_mem_reduction in float64, with our one documented change:
    a matrix with fewer singular values than tasks (k = 0) is averaged, not zeroed."""
    n = len(models)
    merged = {}
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        taus = task_vectors64(base, models, name)
        k = 0
        if b.dim() == 2 and not (exclude and re.search(exclude, name)):
            rows, cols = b.shape
            r = min(rows, cols)
            k = r // n if rank_fraction is None else int(r * rank_fraction)
        if k == 0:
            merged[name] = lam * sum(taus) / n
            continue
        sum_u = torch.zeros(rows, r, dtype=torch.float64)
        sum_s = torch.zeros(r, dtype=torch.float64)
        sum_v = torch.zeros(r, cols, dtype=torch.float64)
        for i, tau in enumerate(taus):
            u, s, vh = torch.linalg.svd(tau, full_matrices=False)
            sum_u[:, i * k:(i + 1) * k] = u[:, :k]
            sum_s[i * k:(i + 1) * k] = s[:k]
            sum_v[i * k:(i + 1) * k] = vh[:k]
        merged[name] = lam * polar64(sum_u) @ torch.diag(sum_s) @ polar64(sum_v)
    return assemble(base, merged)


@pytest.mark.parametrize("opts", [{}, {"lam": 0.7, "rank_fraction": 0.25}, {"exclude": "", "lam": 2.0}])
def test_tsv_m_matches_the_float64_reference(opts) -> None:
    base, models = svd_family(3)
    out = tiesmerge.merge(base, models, "tsv_m", **opts)
    assert_close_state(out, ref_tsv_m(base, models, **opts))


def test_tsv_m_averages_what_it_does_not_decompose() -> None:
    base, models = svd_family(3, seed=1)
    out = tiesmerge.merge(base, models, TsvMerge(lam=1.5))
    for name in ("layer.bias", "conv.weight", "head.weight", "text_projection"):  # vector, n-D, r < T, excluded
        want = base[name].double() + 1.5 * sum(t for t in task_vectors64(base, models, name)) / 3
        torch.testing.assert_close(out[name].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(out["position_ids"], base["position_ids"])
    # a decomposed matrix is not the average: the method did something else there
    avg = base["layer.weight"].double() + 1.5 * sum(task_vectors64(base, models, "layer.weight")) / 3
    assert float((out["layer.weight"].double() - avg).abs().max()) > 0.1


def test_tsv_m_of_one_model_with_full_rank_is_that_model() -> None:
    base, models = svd_family(1, seed=2)
    out = tiesmerge.merge(base, models, "tsv_m", exclude="")
    for name in ("layer.weight", "layer.wide"):
        torch.testing.assert_close(out[name], models[0][name], rtol=1e-5, atol=1e-5)


def test_randomized_svd_option_is_close_to_the_exact_merge_and_seeded() -> None:
    base, models = svd_family(3, seed=3)
    exact = tiesmerge.merge(base, models, "tsv_m")
    fast = tiesmerge.merge(base, models, "tsv_m", randomized_above=100, seed=5)
    again = tiesmerge.merge(base, models, "tsv_m", randomized_above=100, seed=5)
    other = tiesmerge.merge(base, models, "tsv_m", randomized_above=100, seed=6, power_iters=0)
    for name in ("layer.weight", "layer.wide"):
        d_exact = exact[name] - base[name]
        rel = float((fast[name] - exact[name]).norm() / d_exact.norm())
        assert rel < 1e-3, (name, rel)
        assert torch.equal(fast[name], again[name])
        assert not torch.equal(fast[name], other[name])


def test_the_planner_counts_the_svd_workspace_and_names_the_budget_it_needs() -> None:
    shape = (96, 64)
    base, models = svd_family(3, seed=4, shapes={"w": shape})
    per_entry = bytes_per_entry(3, 4, 4, temporaries=0)  # the SVD methods plan their memory as workspace
    workspace = TsvMerge().workspace(shape, 3)
    assert workspace > 0 and TsvMerge().workspace((96,), 3) == 0
    # a budget that holds the tensor's working set but not the SVD's workspace (small budgets plan with half)
    budget = 2 * (96 * 64 * per_entry + workspace // 2)
    with pytest.raises(ConfigError) as caught:
        tiesmerge.merge(base, models, "tsv_m", memory_budget=budget)
    message = str(caught.value)
    assert "'w' (96, 64)" in message and "needs each tensor whole" in message
    assert f"with {format_size(workspace)} of workspace" in message
    # the smallest budget that works: a small budget's working half holds the tensor and its workspace (a large
    # one all but FIXED_OVERHEAD); hinted as 64 MiB more than needed before hostile pass 10's F16
    core = 96 * 64 * per_entry + workspace
    needed = 2 * core if core <= FIXED_OVERHEAD else core + FIXED_OVERHEAD
    assert f"raise --memory-budget to {format_size(needed)}" in message
    # the same budget is enough for a method without the workspace
    tiesmerge.merge(base, models, "task_arithmetic", memory_budget=budget)
    out = tiesmerge.merge(base, models, "tsv_m", memory_budget=needed)  # the hinted budget works
    assert out["w"].shape == shape


@pytest.mark.parametrize("bad, needle", [({"rank_fraction": 1.5}, "rank_fraction"), ({"exclude": "a("}, "exclude"),
                                         ({"svd_precision": "half"}, "svd_precision"), ({"seed": -1}, "seed")])
def test_bad_options_are_refused(bad, needle) -> None:
    with pytest.raises(ConfigError, match=needle):
        TsvMerge(**bad)


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts"])
def test_models_equal_to_the_base_merge_to_the_base(method) -> None:
    # zero task vectors: zero spectra, arbitrary singular vectors, and still exactly no change
    base, _ = svd_family(1, seed=12)
    out = tiesmerge.merge(base, [dict(base), dict(base), dict(base)], method, lam=2.0)
    assert all(torch.equal(out[k], base[k]) for k in base)
