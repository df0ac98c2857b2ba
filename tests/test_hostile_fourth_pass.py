"""Issue 13, after the third hostile pass: what the lead and the fourth independent pass found, one case each
(checked as the catalogue checks its cases: exit status, message, no traceback, nothing left, inputs unchanged).

- an overflow to float16 is reported once, by the typed error, without numpy's RuntimeWarning printed first.
"""

from __future__ import annotations

import warnings

import torch

from helpers_ckpt import write_hf_dir
from test_hostile_catalogue import _merge, _run, check, snapshot


def test_a_float16_overflow_prints_no_numpy_warning_before_the_error(tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "inputs"
    base = {"w": torch.full((4, 4), 60000.0, dtype=torch.float16)}
    fts = [{"w": torch.full((4, 4), 65000.0, dtype=torch.float16)} for _ in range(2)]
    b = write_hf_dir(inputs / "base", base)
    ms = [write_hf_dir(inputs / f"ft{k}", ft) for k, ft in enumerate(fts)]
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "ties", "--lam", "2"), capsys)
    check(rc, err, want_rc=1, needle=("tensor 'w'", "wider dtype"), output=tmp_path / "out", inputs=inputs,
          before=before)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
