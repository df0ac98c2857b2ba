"""The SVD methods (TSV-M, Iso-C, Iso-CTS) through the command line on tiny checkpoints:
`tiesmerge methods`, a recipe, `tiesmerge tune` on each method's own grid, a dry run under a
too-small memory budget, and the analysis report's merged-magnitude section."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import tiesmerge
from helpers_ckpt import cli_flags, run_cli, write_hf_dir
from helpers_svd import svd_family
from tiesmerge.tuning import paper_grid

SVD_METHODS = ("tsv_m", "iso_c", "iso_cts")


@pytest.fixture
def family(tmp_path):
    base, models = svd_family(3, seed=11)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{i}", m) for i, m in enumerate(models)]
    return base, models, b, ms


def test_methods_lists_them_with_reference_and_grid(capsys) -> None:
    rc, out, _ = run_cli(["methods"], capsys)
    assert rc == 0 and all(f"{name}  —" in out for name in SVD_METHODS)
    for name in SVD_METHODS:
        rc, out, _ = run_cli(["methods", name], capsys)
        assert rc == 0
        assert "tune searches 0.1..3.0 step 0.1" in out  # lam, the authors' alpha grid
        assert "Follows the authors' code" in out and "Deliberate differences" in out
    assert paper_grid("iso_cts") == {"lam": tuple(round(0.1 * i, 6) for i in range(1, 31))}


@pytest.mark.parametrize("name, params", [("tsv_m", {"lam": 0.8}), ("iso_c", {"lam": 1.3}),
                                          ("iso_cts", {"lam": 1.5, "common_fraction": 0.5})])
def test_a_recipe_merges_as_the_api_does(family, tmp_path, capsys, name, params) -> None:
    base, models, b, ms = family
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: {name}\nbase: base\nmodels: [ft0, ft1, ft2]\nparameters: {json.dumps(params)}\n")
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "out"], capsys)
    assert rc == 0, err
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = tiesmerge.merge(base, models, name, **params)
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-6, atol=1e-6)
    manifest = json.loads((tmp_path / "out" / "tiesmerge.json").read_text())
    assert manifest["recipe"]["method"] == name and manifest["recipe"]["parameters"]["lam"] == params["lam"]


def test_tune_sweeps_the_methods_own_grid(family, tmp_path, monkeypatch, capsys) -> None:
    base, models, b, ms = family
    torch.save(tiesmerge.merge(base, models, "iso_cts", lam=1.7), tmp_path / "target.pt")
    (tmp_path / "svd_eval.py").write_text(textwrap.dedent(f"""
        import torch
        TARGET = torch.load({str(tmp_path / 'target.pt')!r})
        def score(state):
            return -float((state["layer.weight"].float() - TARGET["layer.weight"].float()).abs().sum())
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("svd_eval", None)
    rc, out, err = run_cli(["tune", *cli_flags(b, ms), "--method", "iso_cts", "--evaluator", "svd_eval:score",
                            "--json", tmp_path / "grid.json"], capsys)
    assert rc == 0, err
    assert "best:  lam=1.7" in out or "best: lam=1.7" in out
    grid = json.loads((tmp_path / "grid.json").read_text())
    assert len(grid["points"]) == 30 and grid["best"]["lam"] == pytest.approx(1.7)


@pytest.mark.parametrize("name", SVD_METHODS)
def test_a_dry_run_refuses_a_budget_too_small_for_the_svd(family, tmp_path, capsys, name) -> None:
    _, _, b, ms = family
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "--method", name, "-o", tmp_path / "out", "--dry-run",
                          "--memory-budget", "16KiB"], capsys)
    assert rc == 2
    assert "does not fit one chunk" in err and "raise --memory-budget to" in err
    rc, out, err = run_cli(["merge", *cli_flags(b, ms), "--method", name, "-o", tmp_path / "out", "--dry-run"],
                           capsys)
    assert rc == 0, err


def test_analyze_shows_the_methods_merged_magnitudes(family, tmp_path, capsys) -> None:
    base, models, b, ms = family
    rc, out, err = run_cli(["analyze", *cli_flags(b, ms), "-o", tmp_path / "r", "--no-progress",
                            "--method", "tsv_m", "--method", "iso_cts"], capsys)
    assert rc == 0, err
    data = json.loads((tmp_path / "r" / "analysis.json").read_text())
    section = data["magnitudes"]["by_influence"]
    assert {"averaging", "TIES", "tsv_m", "iso_cts"} <= set(section["mean"])
    assert data["magnitudes"]["methods"]["iso_cts"]["common_fraction"] == 0.8
    html = (tmp_path / "r" / "report.html").read_text()
    assert "tsv_m" in html and "iso_cts" in html
    # the groups partition every merged entry: their count-weighted mean is the merge's mean |delta|
    for name in ("tsv_m", "iso_cts"):
        merged = tiesmerge.merge(base, models, name)
        deltas = torch.cat([(merged[k].double() - base[k].double()).reshape(-1) for k in base
                            if base[k].is_floating_point()])
        counts = torch.tensor(section["count"], dtype=torch.float64)
        pooled = float((counts * torch.tensor(section["mean"][name], dtype=torch.float64)).sum() / counts.sum())
        assert pooled == pytest.approx(float(deltas.abs().mean()), rel=1e-5)


def test_analyze_refuses_an_unknown_method_before_reading(family, tmp_path, capsys) -> None:
    _, _, b, ms = family
    rc, _, err = run_cli(["analyze", *cli_flags(b, ms), "-o", tmp_path / "r", "--method", "tsv_n"], capsys)
    assert rc == 2 and "unknown method 'tsv_n'" in err and "tsv_m" in err
    assert not (tmp_path / "r").exists()
