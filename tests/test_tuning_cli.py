"""`tiesmerge search` (cli/commands.cmd_search): the search from the command line writes its log,
report and the winner (with its manifest), resumes from its log, and rejects bad flags early."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiesmerge
from tiesmerge.cli.main import main


def _write(path, state):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_search_writes_log_report_and_the_best_merge_and_resumes(tmp_path, monkeypatch, capsys):
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(8, 8, generator=g)}
    models = [{"w": base["w"] + torch.randn(8, 8, generator=g)} for _ in range(2)]
    b = _write(tmp_path / "base.safetensors", base)
    ms = [_write(tmp_path / f"m{i}.safetensors", m) for i, m in enumerate(models)]
    target = tiesmerge.merge(base, models, "ties", density=0.2, lam=1.5, scope="per_tensor")
    torch.save(target, tmp_path / "target.pt")
    (tmp_path / "my_eval.py").write_text(textwrap.dedent(f"""
        import torch
        TARGET = torch.load({str(tmp_path / 'target.pt')!r})
        CALLS = []
        def score(state):
            CALLS.append(1)
            return -float((state["w"].float() - TARGET["w"].float()).abs().sum())
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_eval", None)
    args = ["search", "--base", b, "--model", ms[0], "--model", ms[1], "--evaluator", "my_eval:score",
            "--grid", "density=0.1,0.2", "--grid", "lam=1.0:2.0:0.5", "--set", "scope=per_tensor",
            "--dir", str(tmp_path / "s")]
    rc = main([*args, "-o", str(tmp_path / "best")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "best: [4] scope=per_tensor density=0.2 lam=1.5 score" in out and "6 scored and 2 merges" in out
    lines = (tmp_path / "s" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 6 and json.loads(lines[0])["space"]["fixed"] == {"scope": "per_tensor"}
    assert (tmp_path / "s" / "report.html").is_file() and "**best**" in (tmp_path / "s" / "results.md").read_text()
    merged = load_file(str(tmp_path / "best" / "model.safetensors"))
    torch.testing.assert_close(merged["w"], target["w"])
    manifest = json.loads((tmp_path / "best" / "tiesmerge.json").read_text())
    assert json.dumps(manifest).count("per_tensor") >= 1
    calls = sys.modules["my_eval"].CALLS
    assert len(calls) == 6
    assert main(args) == 0  # run again: everything comes from the log; the first and the best scored again to check it
    assert len(calls) == 8 and "2 scored (2 of them to check the log it resumed) and 2 merges" in \
        capsys.readouterr().out


def test_search_rejects_bad_flags_before_reading_anything(tmp_path, capsys):
    common = ["search", "--base", "b", "--model", "m", "--evaluator", "json:dumps", "--dir", str(tmp_path / "s")]
    assert main([*common, "--axis", "elect"]) == 2
    assert "no numeric or per-model option 'elect'" in capsys.readouterr().err
    assert main([*common, "--set", "nope=1"]) == 2
    assert "no option 'nope'" in capsys.readouterr().err
    assert main([*common, "--range", "lam=3:1"]) == 2
    assert "LO < HI" in capsys.readouterr().err
    assert main([*common, "--workers", "2"]) == 2
    assert "--workers" in capsys.readouterr().err
    assert main([*common, "--strategy", "cmaes", "--axis", "densities"]) == 2  # no budget
    assert "budget" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_search_on_a_local_ray_cluster_scores_like_in_process(tmp_path, monkeypatch, capsys):
    pytest.importorskip("ray")
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(6, 6, generator=g)}
    models = [{"w": base["w"] + torch.randn(6, 6, generator=g)} for _ in range(2)]
    b = _write(tmp_path / "base.safetensors", base)
    ms = [_write(tmp_path / f"m{i}.safetensors", m) for i, m in enumerate(models)]
    (tmp_path / "ray_eval.py").write_text("def score(state):\n    return -float(state['w'].abs().sum())\n")
    monkeypatch.chdir(tmp_path)  # the workers import ray_eval from here, as the driver does
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["search", "--base", b, "--model", ms[0], "--model", ms[1], "--evaluator", "ray_eval:score",
            "--grid", "density=0.1,0.3", "--grid", "lam=0.5,1.0"]
    assert main([*args, "--dir", str(tmp_path / "local")]) == 0
    assert main([*args, "--dir", str(tmp_path / "ray"), "--ray", "--workers", "2"]) == 0
    capsys.readouterr()

    def scores(name):
        return [(r["options"], r["score"]) for r in map(json.loads, (tmp_path / name / "log.jsonl").read_text()
                                                         .splitlines()[1:])]

    assert sorted(scores("ray"), key=str) == sorted(scores("local"), key=str) and len(scores("ray")) == 4
