"""Pay only for what runs: commands that do no tensor math import neither torch nor numba, and
a CPU merge of safetensors files through the fused kernels never imports torch.

Each command runs in a fresh interpreter (``python -c``), which then reports the heavy modules
it loaded. (How fast they start is measured by ``benchmarks/speed/startup.py``, not here.)

Cross-cutting (not one source module): the lazy imports of every layer, the CLI to the kernels.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiesmerge
from helpers_ckpt import make_family, write_hf_dir

_PROBE = """
import json, sys
from tiesmerge.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:  # --help and --version leave through argparse
    code = exc.code or 0
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "numba", "transformers", "scipy"})
print(json.dumps({"exit": code, "heavy": heavy}), file=sys.stderr)
"""


def _run(cwd: Path, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300, env={"PATH": "", "TIESMERGE_DIGEST_CACHE": "0", "HOME": str(cwd)})
    report = json.loads(done.stderr.strip().splitlines()[-1])
    assert report["exit"] == 0, done.stderr
    return report


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("startup")
    base, models = make_family(2, dtype=torch.bfloat16)
    write_hf_dir(root / "base", base)
    for k, model in enumerate(models):
        write_hf_dir(root / f"m{k}", model, shards=2)
    (root / "recipe.yaml").write_text("method: ties\nbase: base\nmodels: [m0, m1]\nparameters: {density: 0.3}\n")
    return root


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["methods"], ["merge", "--help"],
                                  ["validate", "recipe.yaml"], ["merge", "recipe.yaml", "--dry-run"]],
                         ids=["version", "help", "methods", "merge-help", "validate", "dry-run"])
def test_commands_without_tensor_math_load_neither_torch_nor_numba(family, args):
    assert _run(family, *args)["heavy"] == []


@pytest.mark.parametrize("method", [["--method", "ties"], ["--method", "ties", "--scope", "per_tensor"],
                                    ["--method", "task_arithmetic"], ["--method", "average"]],
                         ids=["ties", "ties-per-tensor", "task-arithmetic", "average"])
def test_a_fused_cpu_merge_of_safetensors_never_imports_torch(family, tmp_path, method, monkeypatch):
    out = tmp_path / "out"
    report = _run(family, "merge", "--base", "base", "--model", "m0", "--model", "m1", *method, "-o", str(out))
    assert "torch" not in report["heavy"] and "numba" in report["heavy"]
    # and it merged what the torch path merges, bit for bit
    monkeypatch.setenv("TIESMERGE_KERNELS", "0")
    name, options = method[1], dict(zip(method[2::2], method[3::2], strict=True))
    expected = tiesmerge.merge(family / "base", [family / "m0", family / "m1"], name,
                               **{k.removeprefix("--").replace("-", "_"): v for k, v in options.items()})
    got = {k: v for f in out.glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert sorted(got) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    manifest = json.loads((out / "tiesmerge.json").read_text())
    assert manifest["engine"]["torch_chunks"] == 0 and manifest["engine"]["fused_chunks"] > 0
