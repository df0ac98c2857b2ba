"""Issue 13, the fourth independent hostile pass (hp4): its findings on ``adapt``, ``tune``, ``search``,
``analyze`` and ``demo``, one case each, checked as the catalogue checks its cases (exit status, message, no
traceback, nothing left, inputs unchanged).

- dr9: ``adapt --dry-run -o`` checks the output as a real run does;
- rs2/rs3/rs5: ``adapt --resume --checkpoint X`` checks X is no input before reading it, and never advises
  removing a file that is no checkpoint of ours;
- p7: ``adapt -o NEW/sub/out`` creates the default checkpoint's folder (the output's parent) instead of refusing;
- a12: ``adapt --limit 0`` is an option error, not the data file's;
- a7: ``adapt --forward choice`` on a classifier says the forward does not fit the model, before loading it;
- ev3: an evaluator returning an integer too large for a float is the evaluator's error;
- x1: ``search --ray`` gives Ray a private temporary folder, removed at exit;
- x4/x12c/x13c: analyze, tune and search hint only at options they have (no ``--stats``);
- 4l: a grid's size is printed exactly;
- dm3: ``demo`` never hints at a ``--force`` it does not have.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import test_hostile_catalogue
import tiesmerge
from helpers_ckpt import cli_flags, run_cli
from test_adapt_hostile import _forward, _setup
from test_hostile_catalogue import _merge, _run, check, snapshot
from tiesmerge.errors import ConfigError, EvaluatorError

family = test_hostile_catalogue.family


def _adapt(classifiers, tmp_path, *extra):
    root, base, fts, data = classifiers
    files = []
    for k in range(2):
        path = tmp_path / f"task{k}.jsonl"
        if not path.exists():
            path.write_text(data.read_text())
        files.append(path)
    return ["adapt", *cli_flags(base, fts), *sum((["--data", str(f)] for f in files), []), "--steps", "1",
            "--batch-size", "2", "--no-progress", *extra], files


# ------------------------------------------------------------------ dr9: --dry-run -o checks the output


def test_adapt_dry_run_checks_the_output_as_a_run_does(classifiers, tmp_path, capsys):
    root, base, fts, data = classifiers
    argv, files = _adapt(classifiers, tmp_path, "--dry-run")
    before = snapshot(root)
    rc, out, err = run_cli([*argv, "-o", str(fts[0])], capsys)
    check(rc, err, want_rc=1, needle="model 0", output=None, inputs=root, before=before)
    assert "coefficients" not in out, out  # refused first, as a run would be: no plan printed before the error
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own")
    for force in ((), ("--force",)):
        rc, err = _run([*argv, "-o", str(mine), *force], capsys)
        check(rc, err, want_rc=1, needle="tiesmerge wrote" if force else "tiesmerge did not write it", output=None,
              inputs=root, before=before)
    assert (mine / "notes.txt").read_text() == "the user's own"
    rc, err = _run([*argv, "-o", str(tmp_path / "new" / "out")], capsys)  # a new output: fine, nothing created
    assert rc == 0, err
    assert not (tmp_path / "new").exists()
    rc, err = _run([*argv, "-o", str(tmp_path / "out"), "--checkpoint", str(files[1])], capsys)
    check(rc, err, want_rc=1, needle="is data file 1", output=tmp_path / "out", inputs=root, before=before)


# ------------------------------------------------------------------ rs2/rs3/rs5: --resume reads no input


@pytest.mark.parametrize("which", ["weights", "data"])
def test_resume_never_reads_an_input_as_the_checkpoint(classifiers, tmp_path, capsys, which):
    root, base, fts, data = classifiers
    argv, files = _adapt(classifiers, tmp_path)
    target = fts[0] / "model.safetensors" if which == "weights" else files[0]
    watched = root if which == "weights" else tmp_path
    before = snapshot(watched)
    rc, err = _run([*argv, "-o", str(tmp_path / "out"), "--checkpoint", str(target), "--resume"], capsys)
    check(rc, err, want_rc=1, needle="model 0" if which == "weights" else "is data file 0", output=tmp_path / "out",
          inputs=watched, before=before)
    assert "remove it" not in err and "not a checkpoint" not in err, err


def test_resume_never_advises_removing_a_file_that_is_no_checkpoint(tmp_path):
    base, fts, files = _setup(tmp_path)
    merged = tmp_path / "merged.safetensors"  # another tool's (or tiesmerge merge's) weights, no input here
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in base.items()}, str(merged))
    kept = merged.read_bytes()
    with pytest.raises(ConfigError, match="not a checkpoint tiesmerge adapt wrote") as caught:
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, checkpoint=merged, resume=True)
    assert "remove" not in (caught.value.hint or "") and merged.read_bytes() == kept


# ------------------------------------------------------------------ p7: -o NEW/sub/out


def test_adapt_creates_the_output_parent_for_the_default_checkpoint(tmp_path):
    base, fts, files = _setup(tmp_path)
    out = tmp_path / "new" / "sub" / "out"
    result = tiesmerge.adapt(base, fts, files, forward=_forward(), steps=2, batch_size=2, output=out)
    assert Path(result.output) == out and (out / "tiesmerge.json").is_file()
    assert (tmp_path / "new" / "sub" / "out.adapt-checkpoint.safetensors").is_file()


def test_a_failed_run_removes_the_folders_it_made_for_the_checkpoint(tmp_path):
    base, fts, files = _setup(tmp_path)
    files[1].write_text(json.dumps({"text": "  "}) + "\n")  # refused when the data is read, after the checks
    with pytest.raises(ConfigError, match="empty or missing 'text'"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=2, output=tmp_path / "new" / "sub" / "out")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------ a12: --limit 0


def test_adapt_limit_below_one_is_an_option_error(classifiers, tmp_path, capsys):
    root, base, fts, data = classifiers
    argv, files = _adapt(classifiers, tmp_path)
    before = snapshot(root)
    rc, err = _run([*argv, "--limit", "0", "-o", str(tmp_path / "out")], capsys)
    check(rc, err, want_rc=2, needle="--limit must be a positive number, got 0", output=tmp_path / "out",
          inputs=root, before=before)
    assert "holds no examples" not in err
    (tmp_path / "api").mkdir()
    base_sd, fts_sd, files_sd = _setup(tmp_path / "api")
    with pytest.raises(ConfigError, match="limit must be an integer >= 1, got 0"):
        tiesmerge.adapt(base_sd, fts_sd, files_sd, forward=_forward(), steps=1, limit=0)


# ------------------------------------------------------------------ a7: --forward choice on a classifier


def test_choice_forward_on_a_classifier_names_the_forward_that_fits(classifiers, tmp_path, capsys):
    root, base, fts, data = classifiers
    argv, files = _adapt(classifiers, tmp_path)
    before = snapshot(root)
    rc, err = _run([*argv, "--forward", "choice", "-o", str(tmp_path / "out")], capsys)
    check(rc, err, want_rc=2, needle=("needs a causal language model", "BertForSequenceClassification",
                                      "--forward classifier"), output=tmp_path / "out", inputs=root, before=before)
    assert "FunctionLogits" not in err and "tensor(s)" not in err, err


# ------------------------------------------------------------------ ev3: an evaluator's huge int


def test_an_evaluator_returning_a_huge_int_is_its_error(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    (tmp_path / "work" / "big_eval.py").write_text("def score(state):\n    return 10**400\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    before = snapshot(inputs)
    rc, err = _run(["tune", *cli_flags(b, ms), "--evaluator", "big_eval:score", "--grid", "density=0.5",
                    "--grid", "lam=1.0"], capsys)
    check(rc, err, want_rc=1, needle=("big_eval:score", "about 401 digits"), output=None, inputs=inputs,
          before=before)
    assert "bug in tiesmerge" not in err, err
    from tiesmerge.tuning.evaluator import guard
    with pytest.raises(EvaluatorError, match="cannot be read as a score"):
        guard(lambda state: 10 ** 5000, "ev")({})


# ------------------------------------------------------------------ x4/x12c/x13c: no hint at a --stats they lack


def _score_evaluator(tmp_path, monkeypatch) -> str:
    (tmp_path / "work" / "ok_eval.py").write_text("def score(state):\n    return 0.5\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    return "ok_eval:score"


@pytest.mark.parametrize("command", ["analyze", "tune", "search"])
def test_commands_without_stats_never_hint_at_it(family, tmp_path, capsys, monkeypatch, command):
    inputs, b, ms = family
    ev = _score_evaluator(tmp_path, monkeypatch)
    argv = {"analyze": ["analyze", *cli_flags(b, ms), "--method", "fisher", "-o", "r"],
            "tune": ["tune", *cli_flags(b, ms), "--method", "fisher", "--grid", "epsilon=1e-8", "--evaluator", ev],
            "search": ["search", *cli_flags(b, ms), "--method", "regmean", "--axis", "alpha", "--grid", "alpha=0.5",
                       "--evaluator", ev, "--dir", "s"]}[command]
    before = snapshot(inputs)
    rc, err = _run(argv, capsys)
    check(rc, err, want_rc=2, needle=("statistics", "takes no statistics", "tiesmerge merge"), output=None,
          inputs=inputs, before=before)
    assert f"{command} --stats" not in err and "pass one --stats" not in err, err


def test_merge_and_the_api_keep_their_own_stats_hint(family, capsys, monkeypatch):
    import tiesmerge.inputs

    inputs, b, ms = family
    rc, err = _run(_merge(b, ms, "out", "--method", "fisher"), capsys)
    assert rc == 2 and "pass one --stats DIR per --model" in err, err
    # a process that ran no command (the CLI sets the option per command, as sizes.shard_size_option)
    monkeypatch.setattr(tiesmerge.inputs, "stats_option", "stats=")
    with pytest.raises(ConfigError) as caught:
        tiesmerge.merge(str(b), [str(m) for m in ms], "fisher")
    assert "stats=[" in caught.value.hint and "--stats" not in caught.value.hint


# ------------------------------------------------------------------ 4l: a grid's size, exactly


def test_a_grid_one_point_too_long_says_how_many_exactly(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    ev = _score_evaluator(tmp_path, monkeypatch)
    before = snapshot(inputs)
    rc, err = _run(["tune", *cli_flags(b, ms), "--evaluator", ev, "--grid", "lam=0:10:0.0001"], capsys)
    check(rc, err, want_rc=2, needle="100,001 points, more than the 100,000", output=None, inputs=inputs,
          before=before)
    assert "1e+05" not in err, err
    from tiesmerge.methods.base import steps
    assert len(steps(0, 9.9999, 0.0001)) == 100_000  # the limit itself is a grid


# ------------------------------------------------------------------ dm3: demo has no --force


def test_demo_rerun_refusal_never_names_force(tmp_path, capsys):
    work = tmp_path / "demo"
    argv = ["demo", "--synthetic", "--params", "0.01", "--workdir", str(work)]
    rc, err = _run(argv, capsys)
    assert rc == 0, err
    added, card = work / "merged-ties" / "results.txt", work / "merged-ties" / "README.md"
    original = card.read_text()
    for edit, named in (("added", "results.txt"), ("changed", "README.md")):
        if edit == "added":
            added.write_text("keep")
        else:
            added.unlink()
            card.write_text(original + "\nmy notes\n")
        kept = snapshot(work / "merged-ties")
        rc, out, err = run_cli(argv, capsys)
        assert rc == 1 and "Traceback" not in err, err
        assert "--force" not in err and "the demo would" in err and named in err, err
        assert snapshot(work / "merged-ties") == kept
        assert "made the models" not in out, out  # refused before the models were made


# ------------------------------------------------------------------ x1: Ray's session folder is private


class _FakeRay:
    """What RayExecutor calls of ray before any task runs, recording ray.init's arguments."""

    def __init__(self):
        self.inits: list[dict] = []
        self.up = False

    def is_initialized(self):
        return self.up

    def init(self, **kwargs):
        self.inits.append(kwargs)
        self.up = True

    def cluster_resources(self):
        return {"CPU": 2}

    def remote(self, fn):
        return type("Remote", (), {"options": lambda self, **kw: fn})()

    def shutdown(self):
        self.up = False


@pytest.mark.parametrize("user_dir", [False, True])
def test_a_local_ray_cluster_gets_a_private_temp_dir(tmp_path, monkeypatch, user_dir):
    import sys

    from tiesmerge import scratch
    from tiesmerge.tuning import executors
    from tiesmerge.tuning.executors import RayExecutor

    fake = _FakeRay()
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setattr(executors, "_SOCKET_PATH_MAX", 1 << 20)  # a fake Ray opens no socket under pytest's long path
    monkeypatch.setattr(scratch, "_FOLDERS", [])  # this test's folders only (the process's others stay)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    if user_dir:
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "mine"))
    else:
        monkeypatch.delenv("RAY_TMPDIR", raising=False)
    executor = RayExecutor(workers=1)
    executor.close()
    (kwargs,) = fake.inits
    if user_dir:  # the user's choice of Ray's folder stands
        assert "_temp_dir" not in kwargs and scratch._FOLDERS == []
        return
    folder = Path(kwargs["_temp_dir"])
    assert folder.parent == tmp_path and folder.name.startswith("tiesray-") and folder.is_dir()
    assert scratch._FOLDERS == [str(folder)]  # removed at exit
    scratch.remove_private_folders()
    assert not folder.exists() and list(tmp_path.iterdir()) == []
    fake.up = False
    RayExecutor("auto")  # a cluster joined, not started: its folders are the cluster's
    assert "_temp_dir" not in fake.inits[-1]
