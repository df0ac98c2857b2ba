"""Issue 13, after the third hostile pass: what the lead and the fourth independent pass found, one case each
(checked as the catalogue checks its cases: exit status, message, no traceback, nothing left, inputs unchanged).

- an overflow to float16 is reported once, by the typed error, without numpy's RuntimeWarning printed first;
- ``--force`` keeps an earlier output in which a user edited a file tiesmerge wrote (the model card with their
  results), naming the file: each output records its files' sizes and modification times;
- ``adapt --checkpoint`` inside the output directory is refused before the training, not after it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import test_hostile_catalogue
import tiesmerge
from helpers_ckpt import write_hf_dir
from test_adapt_hostile import _forward, _setup
from test_hostile_catalogue import _merge, _run, check, snapshot
from tiesmerge.errors import OutputError
from tiesmerge.paths import changed_files

family = test_hostile_catalogue.family


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


@pytest.mark.parametrize("edited", ["README.md", "model.safetensors"])
def test_force_keeps_an_output_whose_files_the_user_edited(family, capsys, edited):
    inputs, b, ms = family
    assert _run(_merge(b, ms, "out"), capsys)[0] == 0
    stamps = json.loads(Path("out/tiesmerge.json").read_text())["written_stamps"]
    assert "README.md" in stamps and "tiesmerge.json" not in stamps  # the marker is rewritten: never stamped
    assert changed_files(Path("out").absolute()) == []
    with open(Path("out") / edited, "ab") as f:
        f.write(b"\nmy own evaluation: 99%\n")
    kept = (Path("out") / edited).read_bytes()
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, "out", "--force"), capsys)
    assert rc == 1 and "Traceback" not in err
    assert f"changed since: {edited}" in err and "copy them out" in err, err
    assert (Path("out") / edited).read_bytes() == kept
    assert snapshot(inputs) == before
    assert not [p for p in os.listdir(".") if p.startswith(".tiesmerge")]


def test_force_replaces_an_untouched_output_and_one_whose_file_the_user_removed(family, capsys):
    inputs, b, ms = family
    assert _run(_merge(b, ms, "out"), capsys)[0] == 0
    assert _run(_merge(b, ms, "out", "--force"), capsys)[0] == 0
    (Path("out") / "README.md").unlink()  # nothing of the user's is lost with a file they removed
    assert _run(_merge(b, ms, "out", "--force"), capsys)[0] == 0
    assert (Path("out") / "README.md").is_file()


def test_an_adapt_checkpoint_inside_the_output_is_refused_before_the_training(tmp_path):
    base, fts, files = _setup(tmp_path)
    out = tmp_path / "out"
    for checkpoint in (out / "ck.safetensors", out, out / "sub" / "ck.safetensors"):
        with pytest.raises(OutputError, match="lies at or inside the output directory"):
            tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, output=out, checkpoint=checkpoint)
    assert not out.exists()
