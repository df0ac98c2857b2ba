"""The `tiesmerge` entry point (cli/main.py): the parser, exit codes, error and hint lines, --debug
tracebacks, interrupts, and the installed console script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tiesmerge
from helpers_ckpt import assert_no_output, cli_flags, make_family, run_cli, write_hf_dir
from tiesmerge.cli.main import main
from tiesmerge.engine import kernels

TIESMERGE_BIN = Path(sys.executable).parent / "tiesmerge"


def test_runtime_error_exit_1_with_hint_and_debug_traceback(tmp_path, capsys):
    base, fts = make_family(2)
    fts[0]["model.norm.weight"][1] = float("nan")
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    argv = ["merge", *cli_flags(b, ms), "-o", tmp_path / "out"]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert lines[0].startswith("error: ") and "NaN" in lines[0] and "'model.norm.weight'" in lines[0]
    assert str(tmp_path / "ft0") in lines[0]
    assert lines[-1].startswith("hint: ")
    assert "Traceback" not in err
    rc, _, err = run_cli(["--debug", *argv], capsys)
    assert rc == 1 and "Traceback (most recent call last)" in err and "InvalidTensorError" in err
    assert_no_output(tmp_path / "out")


def test_missing_arguments(models, tmp_path, capsys):
    _, _, b, ms = models
    rc, _, err = run_cli(["merge", "--base", b, "-o", tmp_path / "out"], capsys)
    assert rc == 2 and "missing --model" in err and "hint:" in err
    rc, _, err = run_cli(["merge", *cli_flags(b, ms)], capsys)
    assert rc == 2 and "-o/--output" in err
    rc, stdout, _ = run_cli([], capsys)
    assert rc == 2 and "usage" in stdout.lower()
    with pytest.raises(SystemExit) as info:
        main(["merge", "--dtype", "int8"])
    assert info.value.code == 2


def test_keyboard_interrupt_exit_130_leaves_nothing(models, tmp_path, capsys, monkeypatch):
    _, _, b, ms = models

    def interrupted(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tiesmerge.methods.Ties, "merge", interrupted)
    monkeypatch.setattr(kernels, "ties_merge", lambda *a, **k: interrupted(None))  # the fused CPU path
    rc, _, err = run_cli(["merge", *cli_flags(b, ms), "-o", tmp_path / "out"], capsys)
    assert rc == 130 and "interrupted" in err
    assert_no_output(tmp_path / "out")


def test_console_script_subprocess(models, tmp_path):
    if not TIESMERGE_BIN.exists():
        pytest.skip(f"{TIESMERGE_BIN} not installed")
    _, _, b, ms = models
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([str(TIESMERGE_BIN), "merge", *map(str, cli_flags(b, ms)), "--density", "0.5",
                          "-o", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    run = subprocess.run([str(TIESMERGE_BIN), "merge", *map(str, cli_flags(b, ms)), "--method", "average",
                          "--density", "0.5", "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: ")



@pytest.mark.parametrize("argv,method,expected", [
    (["--method", "fisher", "--normalize", "rms"], "fisher", {"normalize": "rms"}),
    (["--method", "breadcrumbs", "--normalize-weights"], "breadcrumbs", {"normalize_weights": True}),
    (["--method", "breadcrumbs", "--no-normalize-weights"], "breadcrumbs", {"normalize_weights": False}),
])
def test_method_flags_of_different_types(argv, method, expected):
    """fisher's normalize is a word and breadcrumbs' normalize_weights a switch: each its own flag."""
    from tiesmerge.cli.main import _parser
    from tiesmerge.registry import make_method

    args = _parser().parse_args(["merge", *argv])
    given = {k.removeprefix("opt_"): v for k, v in vars(args).items() if k.startswith("opt_")}
    assert given == expected
    config = make_method(method, given)
    assert all(getattr(config, k) == v for k, v in expected.items())
