"""Fisher merging and RegMean through the streaming engine: closed forms, reductions to
averaging, fallbacks, and typed errors for statistics that do not fit their models."""

from __future__ import annotations

import pytest
import torch

import tiesmerge
from helpers_ckpt import assert_no_output, make_family, write_hf_dir
from helpers_merge import clone_state
from tiesmerge.errors import ConfigError, IncompatibleCheckpointsError, InvalidTensorError
from tiesmerge.methods import Fisher, RegMean
from tiesmerge.stats import Statistics, StatsManifest, gram_matrices, save_stats


def fisher_stats(tensors: dict[str, torch.Tensor]) -> Statistics:
    return Statistics(StatsManifest("fisher", 1), tensors)


def gram_stats(tensors: dict[str, torch.Tensor]) -> Statistics:
    return Statistics(StatsManifest("gram", 1), tensors)


def merge(base, models, method, stats, **opts):
    return tiesmerge.merge(clone_state(base), [clone_state(m) for m in models], method, stats=stats, **opts)


def float_names(state):
    return [k for k, v in state.items() if v.is_floating_point()]


# ---------------------------------------------------------------- RegMean
def linear_family(in_features: int = 5, out_features: int = 7, n_models: int = 3):
    g = torch.Generator().manual_seed(3)
    base = {"layer.weight": torch.randn(out_features, in_features, generator=g),
            "layer.bias": torch.randn(out_features, generator=g)}
    models = [{k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_models)]
    return base, models


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


# ---------------------------------------------------------------- files, CLI-facing API and errors
def test_merge_from_statistics_directories_records_them(tmp_path):
    base, models = make_family(2)
    write_hf_dir(tmp_path / "base", base)
    dirs = [write_hf_dir(tmp_path / f"ft{k}", m) for k, m in enumerate(models)]
    names = float_names(base)
    stats_dirs = [save_stats(tmp_path / f"fisher{k}", fisher_stats({n: torch.rand(base[n].shape) for n in names}))
                  for k in range(2)]
    out = tiesmerge.merge(tmp_path / "base", dirs, "fisher", stats=stats_dirs, output=tmp_path / "out")
    manifest = (out / "tiesmerge.json").read_text()
    assert "fisher" in manifest and str(stats_dirs[0]) in manifest
    in_memory = merge(base, models, Fisher(), [str(d) for d in stats_dirs])
    from safetensors.torch import load_file
    written = load_file(out / "model.safetensors")
    for n in names:
        assert torch.equal(written[n], in_memory[n])


def test_statistics_of_another_model_are_refused_by_digest(tmp_path):
    base, models = make_family(2)
    write_hf_dir(tmp_path / "base", base)
    dirs = [write_hf_dir(tmp_path / f"ft{k}", m) for k, m in enumerate(models)]
    holder = torch.nn.Module()
    holder.lm_head = torch.nn.Linear(8, 32, bias=False)
    with torch.no_grad():
        holder.lm_head.weight.copy_(models[0]["lm_head.weight"])
    stats = [gram_matrices(holder, [torch.randn(6, 8)], lambda m, b: m.lm_head(b), model=d) for d in dirs]
    save_stats(tmp_path / "g0", stats[0])
    save_stats(tmp_path / "g1", stats[1])
    ok = tiesmerge.merge(tmp_path / "base", dirs, "regmean", stats=[tmp_path / "g0", tmp_path / "g1"],
                         output=tmp_path / "ok")
    assert ok.is_dir()
    with pytest.raises(IncompatibleCheckpointsError, match="computed with another model"):
        tiesmerge.merge(tmp_path / "base", dirs, "regmean", stats=[tmp_path / "g1", tmp_path / "g0"],
                        output=tmp_path / "swapped")
    assert_no_output(tmp_path / "swapped")


def test_statistics_that_do_not_fit_give_typed_errors(tmp_path):
    base, models = make_family(2)
    names = float_names(base)
    good = {n: torch.rand(base[n].shape) for n in names}
    wrong_shape = {**good, "model.norm.weight": torch.rand(9)}
    with pytest.raises(IncompatibleCheckpointsError, match=r"'model.norm.weight' is \(9,\).*\(8,\)"):
        merge(base, models, Fisher(), [fisher_stats(good), fisher_stats(wrong_shape)])
    save_stats(tmp_path / "extra", fisher_stats({**good, "model.layers.9.mlp.up_proj.weight": torch.rand(16, 8)}))
    with pytest.raises(IncompatibleCheckpointsError, match=r"extra.*'model.layers.9.mlp.up_proj.weight'.*not a tensor"):
        merge(base, models, Fisher(), [fisher_stats(good), str(tmp_path / "extra")])
    with pytest.raises(IncompatibleCheckpointsError, match="no statistic for any tensor"):
        merge(base, models, Fisher(), [fisher_stats(good), fisher_stats({})])
    with pytest.raises(IncompatibleCheckpointsError, match="only 2-D weights have Gram"):
        merge(base, models, RegMean(), [gram_stats({"model.norm.weight": torch.eye(8)})] * 2)
    with pytest.raises(IncompatibleCheckpointsError, match=r"is \(16, 16\).*takes a gram statistic of shape \(8, 8\)"):
        merge(base, models, RegMean(), [gram_stats({"model.layers.0.mlp.up_proj.weight": torch.eye(16)})] * 2)
    with pytest.raises(IncompatibleCheckpointsError, match="1 statistics given for 2 models"):
        merge(base, models, Fisher(), [fisher_stats(good)])
    with pytest.raises(ConfigError, match="holds gram statistics, but the method needs fisher"):
        merge(base, models, Fisher(), [gram_stats(good)] * 2)
    with pytest.raises(ConfigError, match="needs fisher statistics of every model"):
        merge(base, models, Fisher(), None)
    with pytest.raises(ConfigError, match="does not use them"):
        merge(base, models, "ties", [fisher_stats(good)] * 2)
    negative = {**good, "lm_head.weight": -torch.rand(32, 8)}
    with pytest.raises(InvalidTensorError, match="negative"):
        merge(base, models, Fisher(), [fisher_stats(good), fisher_stats(negative)])


def test_method_options_are_checked():
    with pytest.raises(ConfigError, match="alpha"):
        RegMean(alpha=1.5)
    with pytest.raises(ConfigError, match="epsilon"):
        Fisher(epsilon=0)
    with pytest.raises(ConfigError, match="normalize"):
        Fisher(normalize="sum")
    assert {"fisher", "regmean"} <= set(tiesmerge.METHODS)


@pytest.mark.gpu
def test_fisher_and_regmean_on_cuda_match_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    base, models = linear_family()
    grams = [gram_stats({"layer.weight": (lambda x: x.T @ x / 9)(torch.randn(9, 5))}) for _ in models]
    fishers = [fisher_stats({n: torch.rand(v.shape) for n, v in base.items()}) for _ in models]
    for method, stats in ((RegMean(), grams), (Fisher(), fishers)):
        cpu = merge(base, models, method, stats)
        gpu = merge(base, models, method, stats, device="cuda")
        for n in cpu:
            torch.testing.assert_close(gpu[n], cpu[n], rtol=1e-5, atol=1e-5)
