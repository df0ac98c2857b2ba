"""The fused kernels' front door (engine/fused.py): whether they would run, answered without
importing numba; the TIESMERGE_KERNELS switch; the fallback where numba fails to import."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import tiesmerge
from tiesmerge.dtypes import BY_CODE
from tiesmerge.engine import fused

_PROBE = """
import json, sys
from tiesmerge.engine import fused
answer = fused.available()
print(json.dumps({"available": answer, "loaded": sorted(m for m in ("numba", "tiesmerge.engine.kernels", "torch")
                                                        if m in sys.modules)}))
"""
HAS_NUMBA = importlib.util.find_spec("numba") is not None


@pytest.mark.parametrize(("switch", "expected"), [("1", HAS_NUMBA), ("0", False), (None, HAS_NUMBA)])
def test_available_answers_without_importing_numba(switch, expected):
    env = {"PATH": ""} if switch is None else {"PATH": "", "TIESMERGE_KERNELS": switch}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"available": expected, "loaded": []}


def test_the_switch_turns_the_kernels_off_in_process(monkeypatch):
    monkeypatch.setenv("TIESMERGE_KERNELS", "0")
    assert fused.available() is False and fused.load() is None
    monkeypatch.setenv("TIESMERGE_KERNELS", "1")
    assert fused.available() is HAS_NUMBA
    assert (fused.load() is not None) is HAS_NUMBA


def test_numba_installed_but_failing_to_import_means_no_kernels(monkeypatch):
    """Once the kernels module is loaded, its own import of numba decides (None: it failed)."""
    monkeypatch.setitem(sys.modules, "tiesmerge.engine.kernels", types.SimpleNamespace(numba=None))
    assert fused.available() is False
    monkeypatch.setitem(sys.modules, "tiesmerge.engine.kernels", types.SimpleNamespace(numba=object()))
    assert fused.available() is True


def test_the_views_keep_each_stored_width():
    for views in (fused.RAW_VIEWS, fused.OUT_VIEWS):
        for code, view in views.items():
            assert isinstance(view, np.dtype) and view.itemsize == BY_CODE[code].itemsize, code


def test_a_merge_leaves_the_callers_torch_thread_count_alone(models):
    """numba's OpenMP kernels share libgomp with torch and left torch at numba's thread count: an
    evaluation the caller had set to one thread then ran on two spinning ones (4x the CPU, measured)."""
    _, _, b, ms = models
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        tiesmerge.merge(b, ms, "ties", density=0.5)
        tiesmerge.merge(b, ms, "task_arithmetic", lam=0.4)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
