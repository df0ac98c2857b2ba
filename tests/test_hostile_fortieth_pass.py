"""Hostile pass 40 (issue 13), and the notes of pass 39 left for it."""

from __future__ import annotations

import os

import pytest

import tiesmerge
from helpers_ckpt import write_hf_dir


def test_adapt_resumes_with_the_same_folders_spelled_otherwise_and_names_what_differs(tmp_path, monkeypatch):
    """hp39 C24: `adapt --resume` with the same folders spelled ./base/ or by their absolute paths was refused as
    "another run (other models, data, method or forward settings ...)", a refusal that said nothing of what differed.
    The inputs count by their resolved paths, and a refusal names the part that differs."""
    from test_adapt import _data, _family, _forward
    from tiesmerge.errors import ConfigError

    base, fts = _family(2)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *fts))]
    monkeypatch.chdir(tmp_path)
    kwargs = dict(forward=_forward(), checkpoint=tmp_path / "ck.pt")
    tiesmerge.adapt("base", ["a", "b"], _data(), "task_arithmetic", steps=2, **kwargs)
    # the same folders: ./base/ and absolute paths resume (3 steps: one more)
    result = tiesmerge.adapt("./base/", [str(dirs[1]), "./b/"], _data(), "task_arithmetic", steps=3, resume=True,
                             **kwargs)
    assert result.coefficients is not None
    data = _data()
    data[1][0]["x"] = [9.0, 9.0, 9.0, 9.0]
    with pytest.raises(ConfigError, match=r"another run \(the data of task\(s\) 'task1'\)"):
        tiesmerge.adapt("base", ["a", "b"], data, "task_arithmetic", steps=4, resume=True, **kwargs)
    with pytest.raises(ConfigError, match=r"another run \(the method 'task_arithmetic.*' there, 'ties.*' now\)"):
        tiesmerge.adapt("base", ["a", "b"], _data(), "ties", steps=4, resume=True, **kwargs)
    with pytest.raises(ConfigError, match=r"another run \(the models: another base or fine-tuned model"):
        tiesmerge.adapt("base", ["b", "a"], _data(), "task_arithmetic", steps=4, resume=True, **kwargs)
    os.utime(dirs[2] / "model.safetensors", ns=(1, 1))  # its files changed since
    with pytest.raises(ConfigError, match=r"another run \(the models: "):
        tiesmerge.adapt("base", ["a", "b"], _data(), "task_arithmetic", steps=4, resume=True, **kwargs)


def test_a_search_resumes_with_the_same_folders_spelled_otherwise(tmp_path, monkeypatch):
    """hp39 C24's twin in search: the log named the models as typed, so `--base ./base/` after `--base base` was
    "the log of another search (it differs in: base, models, weights)"."""
    from helpers_ckpt import make_family
    from tiesmerge.tuning import run_search

    base, fts = make_family(2)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *fts))]
    monkeypatch.chdir(tmp_path)
    grid, log = {"density": (0.5, 1.0), "lam": (1.0,)}, str(tmp_path / "log.jsonl")
    scored = []
    run_search("base", ["a", "b"], "ties", lambda state: 1.0, grid=grid, log=log)
    run_search("./base/", [str(dirs[1]), "b/"], "ties", lambda state: 1.0, grid=grid, log=log,
               on_trial=scored.append)
    assert scored == []  # every candidate came from the log
