"""The issue-12 methods through the command line on tiny checkpoints: ``tiesmerge methods NAME``,
merges by flags and by recipe, ``tiesmerge tune`` on each method's own grid, ``tiesmerge analyze
--method``, and the planner's refusal of a budget too small for a whole tensor."""

from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file

from helpers_ckpt import cli_flags, make_family, run_cli, write_hf_dir
from tiesmerge.methods.base import paper_grid
from tiesmerge.registry import method_class

# each method with options that make it do something on two models (slerp, nuslerp: exactly two)
CASES: dict[str, dict] = {
    "breadcrumbs": {"density": 0.3, "gamma": 0.05, "lam": 0.8, "rescale": "l1"},
    "breadcrumbs_ties": {"density": 0.3, "gamma": 0.05, "threshold_ties": "sort"},
    "della": {"density": 0.5, "epsilon": 0.1, "seed": 3},
    "della_linear": {"density": 0.5, "epsilon": 0.1, "rescale": "l1", "normalize_weights": True},
    "model_stock": {"filter_wise": True},
    "slerp": {"t": 0.3},
    "nuslerp": {"weights": [1.0, 2.0], "flatten": False},
    "consensus": {"k": 2, "tall_lambda": 0.3, "lam": 0.6},
}
WHOLE = ("slerp", "nuslerp", "model_stock", "della")  # each tensor in one chunk


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, models = make_family(2, seed=7)
    return write_hf_dir(root / "base", base), [write_hf_dir(root / f"ft{i}", m) for i, m in enumerate(models)]


def _flags(options: dict) -> list[str]:
    out = []
    for key, value in options.items():
        flag = key.replace("_", "-")
        if isinstance(value, bool):  # --flag / --no-flag
            out.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            out += [f"--{flag}", *[str(v) for v in (value if isinstance(value, list) else [value])]]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_methods_lists_the_reference_and_every_option(name, capsys):
    rc, out, _ = run_cli(["methods", name], capsys)
    assert rc == 0 and out.startswith(f"{name}  —")
    assert "paper: http" in out and ("Follows" in out or "follows" in out)  # which reference, where it differs
    cls = method_class(name)
    for field in dataclasses.fields(cls):
        assert f"--{field.name.replace('_', '-')}" in out
    assert paper_grid(cls), f"{name} declares no tuning grid"


@pytest.mark.parametrize("name", list(CASES))
def test_merge_by_flags_and_by_recipe_agree(name, family, tmp_path, capsys):
    base, models = family
    rc, _, err = run_cli(["merge", "--method", name, *cli_flags(base, models), *_flags(CASES[name]),
                          "-o", tmp_path / "flags", "--no-progress"], capsys)
    assert rc == 0, err
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": name, "base": str(base), "models": [str(m) for m in models],
                                      "parameters": CASES[name]}))
    rc, _, err = run_cli(["merge", str(recipe), "-o", tmp_path / "recipe", "--no-progress"], capsys)
    assert rc == 0, err
    by_flags = load_file(str(tmp_path / "flags" / "model.safetensors"))
    by_recipe = load_file(str(tmp_path / "recipe" / "model.safetensors"))
    base_sd = load_file(str(base / "model.safetensors"))
    assert all(torch.equal(by_flags[k], by_recipe[k]) for k in by_flags)
    moved = [k for k in base_sd if base_sd[k].is_floating_point() and not torch.equal(by_flags[k], base_sd[k])]
    assert moved, f"{name} left every tensor as the base's"
    manifest = json.loads((tmp_path / "flags" / "tiesmerge.json").read_text())
    assert manifest["method"]["name"] == name


@pytest.mark.parametrize("name", WHOLE + ("breadcrumbs",))
def test_whole_tensor_methods_refuse_a_budget_too_small(name, family, capsys):
    base, models = family
    options = {"threshold_ties": "sort"} if name == "breadcrumbs" else {}
    argv = ["merge", "--method", name, *cli_flags(base, models), *_flags(options), "--dry-run"]
    rc, _, err = run_cli([*argv, "--memory-budget", "4KiB"], capsys)
    assert rc == 2 and "needs each tensor whole" in err and "raise --memory-budget to" in err
    needed = "".join(err.split("raise --memory-budget to ")[1].split()[:2])  # "64.03 MiB" -> "64.03MiB"
    rc, out, err = run_cli([*argv, "--memory-budget", needed], capsys)
    assert rc == 0, err  # the budget it names is enough


def test_tune_searches_each_methods_own_grid(family, tmp_path, monkeypatch, capsys):
    base, models = family
    (tmp_path / "toy_eval.py").write_text(textwrap.dedent("""
        def score(state):
            return -float(sum(v.float().abs().sum() for v in state.values() if v.is_floating_point()))
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("toy_eval", None)
    for name in CASES:
        grid = paper_grid(method_class(name))
        # every axis but the method's last own one cut to one value (the suite stays fast); the
        # last is searched over the values the method declares
        own = [axis for axis in grid if axis != "lam"][-1]
        extra = [x for axis, values in grid.items() if axis != own
                 for x in ("--grid", f"{axis}={values[0] if axis != 'lam' else 1.0}")]
        rc, out, err = run_cli(["tune", "--base", base, "--model", models[0], "--model", models[1], "--method", name,
                                "--evaluator", "toy_eval:score", *extra, "--json", tmp_path / f"{name}.json"], capsys)
        assert rc == 0, (name, err)
        points = json.loads((tmp_path / f"{name}.json").read_text())["points"]
        assert {p[own] for p in points} == set(grid[own]), (name, own)
        assert len(points) == len(grid[own]) and "best:" in out


def test_analyze_adds_each_methods_merged_magnitudes(family, tmp_path, capsys):
    base, models = family
    specs = [f"{n}:" + ",".join(f"{k}={json.dumps(v)}" for k, v in o.items()) for n, o in CASES.items()]
    argv = ["analyze", *cli_flags(base, models), "-o", tmp_path / "r", "--no-progress"]
    rc, out, err = run_cli([*argv, *[x for s in specs for x in ("--method", s)]], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "r" / "analysis.json").read_text())
    report = (tmp_path / "r" / "report.html").read_text()
    for spec in specs:
        for part in ("by_influence", "by_agreement"):
            assert spec in data["magnitudes"][part]["mean"]
        assert spec.split(":")[0] in report
    influence = data["magnitudes"]["by_influence"]
    assert any(v > 0 for spec in specs for v in influence["mean"][spec])
    rc, _, err = run_cli([*argv, "--force", "--method", "slerp:t"], capsys)
    assert rc == 2 and "KEY=VALUE" in err


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda_matches_cpu(name):
    """Each method, whole tensors included, on the device as on the CPU (distinct magnitudes: the
    sorts of breadcrumbs' and DELLA's ranks have no ties whose order a device could choose)."""
    import tiesmerge

    g = torch.Generator().manual_seed(1)
    base = {"emb": torch.randn(257, 64, generator=g), "w": torch.randn(64, 96, generator=g),
            "b": torch.randn(96, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    cpu = tiesmerge.merge(base, models, name, **CASES[name])
    gpu = tiesmerge.merge(base, models, name, device="cuda", **CASES[name])
    for k in cpu:
        torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-6)
