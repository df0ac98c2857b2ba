"""CONTRIBUTING.md's worked example stays true: its method, dropped in as one file and declared
as a plugin (an entry point), merges through the CLI with no other file touched.

Cross-cutting (not one source module): the guide, the registry's plugins, the CLI and the engine.
(The registry's own plugin rules are tested in test_registry.py.)
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers_ckpt import make_base, write_hf_dir
from tiesmerge.cli.main import main
from tiesmerge.registry import METHODS

GUIDE = Path(__file__).resolve().parents[1] / "CONTRIBUTING.md"


def _example() -> str:
    """The worked example: the one python block of CONTRIBUTING.md."""
    blocks = re.findall(r"```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 1, "CONTRIBUTING.md should hold exactly one python block: the worked example"
    return blocks[0]


@pytest.fixture()
def plugin(tmp_path, monkeypatch):
    """The example as a module, and a distribution declaring it, on sys.path: what `pip install` of
    a package with the guide's entry point would leave."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "toy_slerp_method.py").write_text(_example())
    info = site / "toy_slerp_method-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-slerp-method\nVersion: 1.0\n")
    entry = re.search(r'\[project\.entry-points\."tiesmerge\.methods"\]\n(.*?)\n', GUIDE.read_text()).group(1)
    line = entry.replace('"', "")  # TOML's quoted value -> entry_points.txt's plain one
    (info / "entry_points.txt").write_text(f"[tiesmerge.methods]\n{line}\n")
    monkeypatch.syspath_prepend(str(site))
    yield site
    sys.modules.pop("toy_slerp_method", None)


def _slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP in float64, written from the formula (not from the example)."""
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    omega = torch.arccos(torch.clamp(torch.dot(a / a.norm(), b / b.norm()), -1.0, 1.0))
    if float(omega) < 1e-4:
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def _family(tmp_path: Path, n: int = 2) -> tuple[dict, list[dict], Path, list[Path]]:
    base = make_base(3)
    g = torch.Generator().manual_seed(9)
    models = [{k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
              for _ in range(n)]
    write_hf_dir(tmp_path / "base", base)
    dirs = [write_hf_dir(tmp_path / f"m{i}", m) for i, m in enumerate(models)]
    return base, models, tmp_path / "base", dirs


def test_the_example_merges_through_the_cli(plugin, tmp_path, capsys):
    assert "toy_slerp" in METHODS
    base, models, base_dir, dirs = _family(tmp_path)
    out = tmp_path / "out"
    code = main(["merge", "--method", "toy_slerp", "--t", "0.3", "--base", str(base_dir),
                 "--model", str(dirs[0]), "--model", str(dirs[1]), "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    merged = load_file(str(out / "model.safetensors"))
    for name, value in base.items():
        if not value.is_floating_point():
            assert torch.equal(merged[name], value)
            continue
        expected = _slerp(models[0][name], models[1][name], 0.3).reshape(value.shape)
        torch.testing.assert_close(merged[name].double(), expected, atol=1e-6, rtol=1e-6)
    capsys.readouterr()
    assert main(["methods", "toy_slerp"]) == 0
    listed = capsys.readouterr().out
    assert "--t" in listed and "fraction, [0, 1]" in listed and "0.25, 0.5, 0.75" in listed


def test_the_example_is_planned_whole_and_checked(plugin, tmp_path, capsys):
    _, _, base_dir, dirs = _family(tmp_path, n=3)
    two = ["--base", str(base_dir), "--model", str(dirs[0]), "--model", str(dirs[1])]
    # every tensor one chunk; a budget too small for the largest is refused before any read
    assert main(["merge", "--method", "toy_slerp", *two, "--dry-run", "--memory-budget", "4KiB"]) == 2
    err = capsys.readouterr().err
    assert "needs each tensor whole" in err and "raise --memory-budget to" in err
    assert main(["merge", "--method", "toy_slerp", *two, "--dry-run"]) == 0
    assert "1 over the merged tensors: merge" in capsys.readouterr().out
    # three models, a value out of range: usage errors
    assert main(["merge", "--method", "toy_slerp", *two, "--model", str(dirs[2]), "-o", str(tmp_path / "o")]) == 2
    assert "toy_slerp merges exactly 2 models, got 3" in capsys.readouterr().err
    assert main(["merge", "--method", "toy_slerp", "--t", "1.5", *two, "-o", str(tmp_path / "o")]) == 2
    assert "t must be a number in [0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_the_installed_command_sees_the_plugin(plugin, tmp_path):
    """The console script in a fresh process, with the plugin on PYTHONPATH."""
    command = [sys.executable, "-c", "import sys; from tiesmerge.cli.main import main; sys.exit(main())", "methods"]
    done = subprocess.run(command, capture_output=True, text=True, env={"PYTHONPATH": str(plugin), "PATH": ""},
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "toy_slerp  —  spherical interpolation between two models" in done.stdout
