"""benchmarks/speed/gpu.py, the GPU speed benchmark, run on the CPU rows of the tiny set: device time
is short, so the script must not first break on the GPU machine. Its CUDA rows run there
(benchmarks/gpu_check.sh)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "speed"


@pytest.fixture(scope="module")
def gpu_bench():
    sys.path.insert(0, str(SPEED))
    try:
        import gpu

        yield gpu
    finally:
        sys.path.remove(str(SPEED))


@pytest.fixture(scope="module")
def ran(gpu_bench, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("gpu_bench")
    rc = gpu_bench.main(["--root", str(tmp_path / "root"), "--size", "tiny", "--n", "2", "--devices", "cpu",
                         "--methods", "ties_global", "task_arithmetic", "--results", str(tmp_path / "res")])
    return rc, tmp_path


def test_cpu_rows_of_the_tiny_set(ran):
    rc, tmp_path = ran
    assert rc == 0
    results = json.loads((tmp_path / "res" / "speed_gpu.json").read_text())
    runs = results["runs"]
    assert set(runs) == {"read_floor", "merge_floor@cpu", "ties_global@cpu", "task_arithmetic@cpu"}
    assert all(r["ok"] for r in runs.values())
    # each process's own peak, not this test's (a child forked from pytest would count pytest's memory)
    assert runs["read_floor"]["peak_rss_bytes"] < 64 << 20
    assert 50 << 20 < runs["ties_global@cpu"]["peak_rss_bytes"] < 2 << 30
    md = (tmp_path / "res" / "speed_gpu.md").read_text()
    assert "| TIES, global (paper defaults) |" in md and "mergekit: not run (no --mergekit-python)" in md
    assert "--device cpu" in md


def test_compare_sees_equal_and_different_outputs(gpu_bench, ran, tmp_path):
    outs, base = ran[1] / "root" / "out-gpu", ran[1] / "root" / "tiny" / "base"
    same = gpu_bench.compare(outs / "ties_global@cpu", outs / "ties_global@cpu", base)
    assert same["identical_files"] and same["rel_diff"] == 0 and same["tensors_differing"] == 0
    other = gpu_bench.compare(outs / "ties_global@cpu", outs / "task_arithmetic@cpu", base)
    assert not other["identical_files"] and 0 < other["rel_diff"] < 10 and other["tensors_differing"] > 0
    shutil.copytree(outs / "ties_global@cpu", tmp_path / "renamed")
    assert gpu_bench.compare(tmp_path / "renamed", outs / "ties_global@cpu", base)["identical_files"]
