"""The `tiesmerge` command: merge (flags, recipe, dry run), methods, validate, errors and exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiesmerge
from helpers_ckpt import assert_no_output, make_family, write_hf_dir
from tiesmerge.cli.main import main
from tiesmerge.engine import kernels
from tiesmerge.registry import METHODS

TIESMERGE_BIN = Path(sys.executable).parent / "tiesmerge"


@pytest.fixture
def models(tmp_path):
    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base, shards=2)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    return base, fts, b, ms


def _flags(b, ms):
    return ["--base", str(b), *[x for m in ms for x in ("--model", str(m))]]


def _run(argv, capsys):
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_merge_with_flags(models, tmp_path, capsys):
    base, fts, b, ms = models
    out = tmp_path / "out"
    rc, stdout, err = _run(["merge", *_flags(b, ms), "--method", "ties", "--density", "0.5", "--lam", "1.5",
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
    rc, stdout, err = _run(["merge", recipe, "-o", tmp_path / "out"], capsys)
    assert rc == 0, err
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = tiesmerge.merge(base, fts, "task_arithmetic", lam=0.7)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_flags_override_recipe(models, tmp_path, capsys):
    base, fts, b, ms = models
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: ties\nbase: base\nmodels: [ft0, ft1]\nparameters: {density: 0.3, lam: 2.0}\n")
    rc, _, err = _run(["merge", recipe, "--density", "0.6", "-o", tmp_path / "out"], capsys)
    assert rc == 0, err
    params = json.loads((tmp_path / "out" / "tiesmerge.json").read_text())["recipe"]["parameters"]
    assert params["density"] == 0.6 and params["lam"] == 2.0
    # another method drops the recipe's options, which belong to ties
    rc, _, err = _run(["merge", recipe, "--method", "average", "-o", tmp_path / "avg"], capsys)
    assert rc == 0, err
    got = load_file(str(tmp_path / "avg" / "model.safetensors"))
    want = tiesmerge.merge(base, fts, "average")
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_empty_parameters_in_recipe_with_flag(models, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: ties\nbase: base\nmodels: [ft0, ft1]\nparameters:\n")
    rc, _, _ = _run(["merge", recipe, "--density", "0.5", "--dry-run"], capsys)
    assert rc == 0


def test_dry_run_prints_plan_and_writes_nothing(models, tmp_path, capsys):
    _, _, b, ms = models
    out = tmp_path / "out"
    rc, stdout, err = _run(["merge", *_flags(b, ms), "-o", out, "--dry-run"], capsys)
    assert rc == 0, err
    for needle in ("tensors", "9 merged, 1 copied", "bytes to read", "peak memory", "budget", "not written"):
        assert needle in stdout, stdout
    assert_no_output(out)
    rc, stdout, _ = _run(["merge", *_flags(b, ms), "--dry-run", "--memory-budget", "3KB"], capsys)
    assert rc == 0 and "row chunks" in stdout


def test_dry_run_reports_input_errors(models, tmp_path, capsys):
    _, _, b, ms = models
    rc, _, err = _run(["merge", "--base", b, "--model", ms[0], "--model", tmp_path / "nope", "--dry-run"], capsys)
    assert rc == 1 and "error:" in err and "nope" in err


def test_methods_lists_every_method(capsys):
    rc, stdout, _ = _run(["methods"], capsys)
    assert rc == 0
    for name, cls in METHODS.items():
        assert name in stdout and cls.paper in stdout and cls.paper.startswith("https://")
    assert "--density" in stdout and "default 0.2" in stdout and "default 0.4" in stdout  # ties, task arithmetic
    rc, stdout, _ = _run(["methods", "ties"], capsys)
    assert rc == 0 and stdout.startswith("ties ") and "task_arithmetic" not in stdout
    rc, _, err = _run(["methods", "tie"], capsys)
    assert rc == 2 and "did you mean 'ties'" in err


def test_validate_ok(models, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: ties\nbase: base\nmodels: [ft0, missing-ft]\nparameters: {density: 0.4}\n")
    rc, stdout, err = _run(["validate", recipe], capsys)
    assert rc == 0, err
    assert "ok" in stdout and "density = 0.4" in stdout
    assert "warning" in stdout and "missing-ft" in stdout


def test_validate_reports_every_problem_and_exits_2(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("method: ties\nbase: b\nmodels: [x, y]\n"
                      "parameters: {density: 20, lam: .inf, zero_sign: negative}\ndtype: fp8\nvocab_polcy: error\n")
    rc, stdout, err = _run(["validate", recipe], capsys)
    assert rc == 2
    assert err.startswith("error: 5 problems")
    for needle in ("density", "percent", "lam", "zero_sign", "'fp8'", "vocab_polcy", "did you mean 'vocab_policy'"):
        assert needle in err, err
    assert str(recipe) in err


def test_validate_missing_file(tmp_path, capsys):
    rc, _, err = _run(["validate", tmp_path / "nope.yaml"], capsys)
    assert rc == 2 and "error:" in err and "nope.yaml" in err


def test_runtime_error_exit_1_with_hint_and_debug_traceback(tmp_path, capsys):
    base, fts = make_family(2)
    fts[0]["model.norm.weight"][1] = float("nan")
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    argv = ["merge", *_flags(b, ms), "-o", tmp_path / "out"]
    rc, _, err = _run(argv, capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and "NaN" in lines[0] and "'model.norm.weight'" in lines[0]
    assert str(tmp_path / "ft0") in lines[0]
    assert lines[-1].startswith("hint: ")
    assert "Traceback" not in err
    rc, _, err = _run(["--debug", *argv], capsys)
    assert rc == 1 and "Traceback (most recent call last)" in err and "InvalidTensorError" in err
    assert_no_output(tmp_path / "out")


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
    rc, _, err = _run(["merge", *_flags(b, ms), *argv, "-o", tmp_path / "out"], capsys)
    assert rc == 2, err
    assert err.startswith("error: ") and needle in err
    assert_no_output(tmp_path / "out")


def test_density_with_average_hint_lists_its_options(models, tmp_path, capsys):
    _, _, b, ms = models
    rc, _, err = _run(["merge", *_flags(b, ms), "--method", "average", "--density", "0.3", "--dry-run"], capsys)
    assert rc == 2 and "hint: average takes: --weights" in err


def test_missing_arguments(models, tmp_path, capsys):
    _, _, b, ms = models
    rc, _, err = _run(["merge", "--base", b, "-o", tmp_path / "out"], capsys)
    assert rc == 2 and "missing --model" in err and "hint:" in err
    rc, _, err = _run(["merge", *_flags(b, ms)], capsys)
    assert rc == 2 and "-o/--output" in err
    rc, stdout, _ = _run([], capsys)
    assert rc == 2 and "usage" in stdout.lower()
    with pytest.raises(SystemExit) as info:
        main(["merge", "--dtype", "int8"])
    assert info.value.code == 2


def test_existing_output_and_force(models, tmp_path, capsys):
    _, _, b, ms = models
    out = tmp_path / "out"
    out.mkdir()
    (out / "x").write_text("x")
    rc, _, err = _run(["merge", *_flags(b, ms), "-o", out], capsys)
    assert rc == 1 and "not empty" in err and "--force" in err
    rc, _, err = _run(["merge", *_flags(b, ms), "-o", out, "--force"], capsys)
    assert rc == 0, err
    assert not (out / "x").exists() and (out / "model.safetensors").is_file()


def test_keyboard_interrupt_exit_130_leaves_nothing(models, tmp_path, capsys, monkeypatch):
    _, _, b, ms = models

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiesmerge.methods.Ties, "merge", interrupted)
    monkeypatch.setattr(kernels, "ties_merge", lambda *a, **k: interrupted(None))  # the fused CPU path
    rc, _, err = _run(["merge", *_flags(b, ms), "-o", tmp_path / "out"], capsys)
    assert rc == 130 and "interrupted" in err
    assert_no_output(tmp_path / "out")


def test_allow_pickle_flag(tmp_path, capsys):
    base, fts = make_family(2)
    torch.save(base, tmp_path / "base.pt")
    for k, ft in enumerate(fts):
        torch.save(ft, tmp_path / f"ft{k}.pt")
    argv = ["merge", "--base", tmp_path / "base.pt", "--model", tmp_path / "ft0.pt", "--model", tmp_path / "ft1.pt",
            "-o", tmp_path / "out"]
    rc, _, err = _run(argv, capsys)
    assert rc == 1 and "pickle" in err and "--allow-pickle" in err
    rc, _, err = _run([*argv, "--allow-pickle"], capsys)
    assert rc == 0, err


def test_console_script_subprocess(models, tmp_path):
    if not TIESMERGE_BIN.exists():
        pytest.skip(f"{TIESMERGE_BIN} not installed")
    _, _, b, ms = models
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([str(TIESMERGE_BIN), "merge", *map(str, _flags(b, ms)), "--density", "0.5",
                          "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    run = subprocess.run([str(TIESMERGE_BIN), "merge", *map(str, _flags(b, ms)), "--method", "average",
                          "--density", "0.5", "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: ")
