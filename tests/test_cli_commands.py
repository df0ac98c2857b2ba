"""What each `tiesmerge` subcommand does (cli/commands.py): merge (flags, recipe, dry run, adapters,
errors), methods, validate, analyze, tune."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiesmerge
from helpers_adapters import LORA_MODULES, TARGETS
from helpers_ckpt import (
    assert_no_output,
    cli_flags,
    make_family,
    run_cli,
    write_earlier_manifest,
    write_hf_dir,
)
from tiesmerge.cli.main import main
from tiesmerge.registry import METHODS


def test_merge_with_flags(models, tmp_path, capsys):
    base, fts, b, ms = models
    out = tmp_path / "out"
    rc, stdout, err = run_cli(["merge", *cli_flags(b, ms), "--method", "ties", "--density", "0.5", "--lam", "1.5",
                               "--scope", "per_tensor", "--dtype", "bfloat16", "--shard-size", "1KB", "-o", out,
                               "--no-progress"], capsys)
    assert rc == 0, err
    assert "merged 2 models with ties" in stdout and "tensors merged" in stdout and "phases:" in stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = {}
    for f in set(index["weight_map"].values()):
        got.update(load_file(str(out / f)))
    want = tiesmerge.merge(base, fts, "ties", density=0.5, lam=1.5, scope="per_tensor", dtype="bfloat16")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    man = json.loads((out / "tiesmerge.json").read_text())
    assert man["recipe"]["parameters"]["density"] == 0.5 and man["recipe"]["dtype"] == "bfloat16"


def test_merge_recipe_file_with_relative_paths(models, tmp_path, capsys, monkeypatch):
    base, fts, b, ms = models
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: task_arithmetic\nbase: base\nmodels: [ft0, {path: ft1}]\nparameters: {lam: 0.7}\n")
    monkeypatch.chdir(tmp_path.parent)  # paths are relative to the recipe, not to the working directory
    rc, stdout, err = run_cli(["merge", recipe, "-o", tmp_path / "out"], capsys)
    assert rc == 0, err
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = tiesmerge.merge(base, fts, "task_arithmetic", lam=0.7)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_flags_override_recipe(models, tmp_path, capsys):
    base, fts, b, ms = models
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: ties\nbase: base\nmodels: [ft0, ft1]\nparameters: {density: 0.3, lam: 2.0}\n")
    rc, _, err = run_cli(["merge", recipe, "--density", "0.6", "-o", tmp_path / "out"], capsys)
    assert rc == 0, err
    params = json.loads((tmp_path / "out" / "tiesmerge.json").read_text())["recipe"]["parameters"]
    assert params["density"] == 0.6 and params["lam"] == 2.0
    # another method drops the recipe's options, which belong to ties
    rc, _, err = run_cli(["merge", recipe, "--method", "average", "-o", tmp_path / "avg"], capsys)
    assert rc == 0, err
    got = load_file(str(tmp_path / "avg" / "model.safetensors"))
    want = tiesmerge.merge(base, fts, "average")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_empty_parameters_in_recipe_with_flag(models, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: ties\nbase: base\nmodels: [ft0, ft1]\nparameters:\n")
    rc, _, _ = run_cli(["merge", recipe, "--density", "0.5", "--dry-run"], capsys)
    assert rc == 0


def test_dry_run_prints_plan_and_writes_nothing(models, tmp_path, capsys):
    _, _, b, ms = models
    out = tmp_path / "out"
    rc, stdout, err = run_cli(["merge", *cli_flags(b, ms), "-o", out, "--dry-run"], capsys)
    assert rc == 0, err
    for needle in ("tensors", "9 merged, 1 copied", "bytes to read", "peak memory", "budget", "not written"):
        assert needle in stdout, stdout
    assert_no_output(out)
    rc, stdout, _ = run_cli(["merge", *cli_flags(b, ms), "--dry-run", "--memory-budget", "3KB"], capsys)
    assert rc == 0 and "row chunks" in stdout


def test_dry_run_reports_input_errors(models, tmp_path, capsys):
    _, _, b, ms = models
    rc, _, err = run_cli(["merge", "--base", b, "--model", ms[0], "--model", tmp_path / "nope", "--dry-run"], capsys)
    assert rc == 1 and "error:" in err and "nope" in err


@pytest.mark.parametrize("argv,needle", [
    (["--method", "average", "--density", "0.3"], "--density does not apply to method 'average'"),
    (["--method", "tie"], "did you mean 'ties'"),
    (["--density", "1.5"], "fraction"),
    (["--lam", "nan"], "finite"),
    (["--weights", "1", "2", "3"], "3 weights given for 2 models"),
    (["--memory-budget", "lots"], "memory_budget"),
])
def test_usage_errors_exit_2(models, tmp_path, capsys, argv, needle):
    _, _, b, ms = models
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), *argv, "-o", tmp_path / "out"], capsys)
    assert rc == 2, err
    assert err.startswith("error: ") and needle in err
    assert_no_output(tmp_path / "out")


def test_density_with_average_hint_lists_its_options(models, tmp_path, capsys):
    _, _, b, ms = models
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "--method", "average", "--density", "0.3", "--dry-run"], capsys)
    assert rc == 2 and "hint: average takes: --weights" in err


def test_existing_output_and_force(models, tmp_path, capsys):
    _, _, b, ms = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    write_earlier_manifest(out)  # a previous merge: --force replaces only those
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", out], capsys)
    assert rc == 1 and "not empty" in err and "--force" in err
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", out, "--force"], capsys)
    assert rc == 0, err
    assert not (out / "x").exists() and (out / "model.safetensors").is_file()


def test_allow_pickle_flag(tmp_path, capsys):
    base, fts = make_family(2)
    torch.save(base, tmp_path / "base.pt")
    for k, ft in enumerate(fts):
        torch.save(ft, tmp_path / f"ft{k}.pt")
    argv = ["merge", "--base", tmp_path / "base.pt", "--model", tmp_path / "ft0.pt", "--model", tmp_path / "ft1.pt",
            "-o", tmp_path / "out"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 1 and "pickle" in err and "--allow-pickle" in err
    rc, _, err = run_cli([*argv, "--allow-pickle"], capsys)
    assert rc == 0, err


def test_cli_merges_adapters_into_an_adapter(lora_family, tmp_path, capsys):
    from tiesmerge.cli.main import main

    base, base_dir, dirs, deltas = lora_family
    argv = ["merge", "--base", str(base_dir), *[a for d in dirs for a in ("--model", str(d))], "--scope", "per_tensor",
            "--output-format", "adapter", "--rank", "2", "-o", str(tmp_path / "cli")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "LoRA adapter at rank 2: relative reconstruction error at most" in out
    manifest = json.loads((tmp_path / "cli" / "tiesmerge.json").read_text())
    assert manifest["recipe"]["output_format"] == "adapter" and manifest["recipe"]["rank"] == 2
    errors = manifest["adapters"]["relative_reconstruction_error"]
    assert set(errors) == set(LORA_MODULES) and all(0 < e < 1 for e in errors.values())
    # the dry run plans the merge of the adapters' ΔW (the adapted tensors only)
    assert main(["merge", "--base", str(base_dir), "--model", str(dirs[0]), "--model", str(dirs[1]), "--dry-run"]) == 0
    assert f"tensors          {len(TARGETS)} merged" in capsys.readouterr().out


# ------------------------------------------------------------------ methods, validate


def test_methods_lists_every_method(capsys):
    rc, stdout, _ = run_cli(["methods"], capsys)
    assert rc == 0
    for name, cls in METHODS.items():
        assert name in stdout and cls.paper in stdout and cls.paper.startswith("https://")
    assert "--density" in stdout and "default 0.2" in stdout and "default 0.4" in stdout  # ties, task arithmetic
    rc, stdout, _ = run_cli(["methods", "ties"], capsys)
    assert rc == 0 and stdout.startswith("ties ") and "task_arithmetic" not in stdout
    rc, _, err = run_cli(["methods", "tie"], capsys)
    assert rc == 2 and "did you mean 'ties'" in err


def test_methods_lists_the_data_aware_methods(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "fisher" in out and "regmean" in out and "--alpha" in out and "--normalize" in out


def test_validate_ok(models, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: ties\nbase: base\nmodels: [ft0, ft1]\nparameters: {density: 0.4}\n")
    rc, stdout, err = run_cli(["validate", recipe], capsys)
    assert rc == 0, err
    assert "ok" in stdout and "density = 0.4" in stdout and "inputs checked" in stdout
    # validate runs the merge plan's checks: a missing model is an error, not a warning
    recipe.write_text("method: ties\nbase: base\nmodels: [ft0, missing-ft]\nparameters: {density: 0.4}\n")
    rc, stdout, err = run_cli(["validate", recipe], capsys)
    assert rc == 1 and "missing-ft" in err and "ok" not in stdout


def test_validate_reports_every_problem_and_exits_2(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: ties\nbase: b\nmodels: [x, y]\n"
                      "parameters: {density: 20, lam: .inf, zero_sign: negative}\ndtype: fp8\nvocab_polcy: error\n")
    rc, stdout, err = run_cli(["validate", recipe], capsys)
    assert rc == 2
    # the recipe's five, its base that does not exist (hp31 C74), and its two models that do not (hp84a c29)
    assert err.startswith("error: 8 problems")
    for needle in ("density", "percent", "lam", "zero_sign", "'fp8'", "vocab_polcy", "did you mean 'vocab_policy'",
                   "b: no such file or directory", "x: no such file or directory", "y: no such file or directory"):
        assert needle in err, err
    assert str(recipe) in err


def test_validate_missing_file(tmp_path, capsys):
    rc, _, err = run_cli(["validate", tmp_path / "nope.yaml"], capsys)
    assert rc == 2 and "error:" in err and "nope.yaml" in err


# ------------------------------------------------------------------ analyze


def test_cli_analyze(tmp_path, capsys):
    base, models = make_family(2, seed=4)
    write_hf_dir(tmp_path / "base", base)
    args = ["analyze", "--base", str(tmp_path / "base")]
    for i, m in enumerate(models):
        args += ["--model", str(write_hf_dir(tmp_path / f"ft{i}", m))]
    assert main([*args, "-o", str(tmp_path / "r"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "report.html" in printed and "conflict in sign" in printed
    assert (tmp_path / "r" / "report.html").is_file()
    assert main([*args, "-o", str(tmp_path / "r")]) == 1  # exists: needs --force
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "-o", str(tmp_path / "r2"), "--density", "0"]) == 2
    assert not (tmp_path / "r2").exists()


# ------------------------------------------------------------------ tune


def _write(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def _tune_family(tmp_path, monkeypatch, module: str, names: str = "m{}.safetensors"):
    """A base and two models in files, and an evaluator ``module:score`` whose peak is TIES at density 0.2, lam 1.5:
    (base path, model paths, that merge)."""
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=g)}
    models = [{"w": base["w"] + torch.randn(8, 8, generator=g)} for _ in range(2)]
    b = _write(tmp_path / "base.safetensors", base)
    ms = [_write(tmp_path / names.format(i), m) for i, m in enumerate(models)]
    target = tiesmerge.merge(base, models, "ties", density=0.2, lam=1.5)
    torch.save(target, tmp_path / "target.pt")
    (tmp_path / f"{module}.py").write_text(textwrap.dedent(f"""
        import torch
        TARGET = torch.load({str(tmp_path / 'target.pt')!r})
        def score(state):
            return -float((state["w"].float() - TARGET["w"].float()).abs().sum())
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(module, None)
    return b, ms, target


def test_tune_finds_the_peak_and_writes_the_best_merge(tmp_path, monkeypatch, capsys):
    b, ms, target = _tune_family(tmp_path, monkeypatch, "my_eval")
    rc = main(["tune", "--base", b, "--model", ms[0], "--model", ms[1], "--evaluator", "my_eval:score",
               "--grid", "density=0.1,0.2", "--grid", "lam=1.0:2.0:0.5", "--json", str(tmp_path / "grid.json"),
               "-o", str(tmp_path / "best")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "best: density=0.2 lam=1.5" in out
    grid = json.loads((tmp_path / "grid.json").read_text())
    assert len(grid["points"]) == 2 * 3
    merged = load_file(str(tmp_path / "best" / "model.safetensors"))
    torch.testing.assert_close(merged["w"], target["w"])



def test_tune_whose_output_fails_says_how_to_write_the_best_merge(tmp_path, monkeypatch, capsys):
    """hp67b c26: a tune whose output could not be written (a full disk) lost the grid's scores with it (--json is
    written with the merge or not at all). The error says the scores were printed and gives the merge command of the
    best point; that command, run, writes the merge the tune would have."""
    import re
    import shlex

    import tiesmerge.api
    from tiesmerge.errors import OutputError

    b, ms, target = _tune_family(tmp_path, monkeypatch, "my_eval2", names="m {}.safetensors")  # a space: quoted
    real_merge = tiesmerge.api.merge

    def disk_full(*args, **kwargs):
        raise OutputError("best: cannot write it (No space left on device)")

    monkeypatch.setattr(tiesmerge.api, "merge", disk_full)
    rc = main(["tune", "--base", b, "--model", ms[0], "--model", ms[1], "--evaluator", "my_eval2:score",
               "--grid", "density=0.1,0.2", "--grid", "lam=1.0:2.0:0.5", "--json", str(tmp_path / "grid.json"),
               "-o", str(tmp_path / "best")])
    err = capsys.readouterr().err
    assert rc != 0 and "No space left on device" in err and not (tmp_path / "grid.json").exists()
    assert "the grid's scores were printed above" in err and "was not written" in err
    command = re.search(r"write the best merge without the grid: (tiesmerge merge .*)", err).group(1)
    words = shlex.split(command)
    assert words[words.index("--density") + 1] == "0.2" and words[words.index("--lam") + 1] == "1.5"
    monkeypatch.setattr(tiesmerge.api, "merge", real_merge)
    assert main(words[1:]) == 0
    torch.testing.assert_close(load_file(str(tmp_path / "best" / "model.safetensors"))["w"], target["w"])

def test_tune_rejects_a_bad_evaluator_and_grid(tmp_path, capsys):
    assert main(["tune", "--base", "b", "--model", "m", "--evaluator", "nocolon"]) == 2
    assert "MODULE:FUNCTION" in capsys.readouterr().err
    assert main(["tune", "--base", "b", "--model", "m", "--evaluator", "json:dumps", "--grid", "lam=x"]) == 2
    assert "--grid" in capsys.readouterr().err
