"""`tiesmerge tune`: the grid from flags, an evaluator loaded by name, the best merge written."""

from __future__ import annotations

import json
import sys
import textwrap

import torch
from safetensors.torch import load_file, save_file

import tiesmerge
from tiesmerge.cli.main import main


def _write(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_tune_finds_the_peak_and_writes_the_best_merge(tmp_path, monkeypatch, capsys):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=g)}
    models = [{"w": base["w"] + torch.randn(8, 8, generator=g)} for _ in range(2)]
    b = _write(tmp_path / "base.safetensors", base)
    ms = [_write(tmp_path / f"m{i}.safetensors", m) for i, m in enumerate(models)]
    target = tiesmerge.merge(base, models, "ties", density=0.2, lam=1.5)
    torch.save(target, tmp_path / "target.pt")
    (tmp_path / "my_eval.py").write_text(textwrap.dedent(f"""
        import torch
        TARGET = torch.load({str(tmp_path / 'target.pt')!r})
        def score(state):
            return -float((state["w"].float() - TARGET["w"].float()).abs().sum())
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_eval", None)
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


def test_tune_rejects_a_bad_evaluator_and_grid(tmp_path, capsys):
    assert main(["tune", "--base", "b", "--model", "m", "--evaluator", "nocolon"]) == 2
    assert "MODULE:FUNCTION" in capsys.readouterr().err
    assert main(["tune", "--base", "b", "--model", "m", "--evaluator", "json:dumps", "--grid", "lam=x"]) == 2
    assert "--grid" in capsys.readouterr().err
