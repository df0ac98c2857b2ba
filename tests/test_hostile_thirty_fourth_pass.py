"""Hostile pass 34 (issue 13), and the notes of earlier passes closed in the same session."""

from __future__ import annotations

import os

import pytest

from helpers_ckpt import run_cli


@pytest.mark.parametrize("written", ["-1e400", "1e400", "1.5E+309", "-2_000e306"])
def test_a_yaml_number_past_the_float_range_is_named_as_written(tmp_path, capsys, written):
    """hp33 C110: `lam: -1e400` was reported as "lam must be a finite number, got -inf", a value nobody wrote (YAML
    reads the literal as an infinity). Now the number is named as written, with its line."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: b\nmodels: [m0]\nparameters:\n  lam: {written}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 2
    assert f"{written} (line 5) is too large for a float: it reads as {'-' if written[0] == '-' else ''}inf" in err
    assert "got -inf" not in err and "got inf" not in err and "Traceback" not in err


def test_an_infinity_written_as_such_is_still_refused_by_the_option(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: ties\nbase: b\nmodels: [m0]\nparameters: {lam: -.inf}\n")
    rc, _, err = run_cli(["validate", recipe], capsys)
    assert rc == 2 and "lam must be a finite number, got -inf" in err


def test_a_flag_past_the_float_range_is_named_as_written(capsys):
    with pytest.raises(SystemExit) as stop:
        run_cli(["merge", "--base", "b", "--model", "m", "-o", "o", "--lam", "1e400"], capsys)
    assert stop.value.code == 2
    assert "argument --lam: 1e400 is too large for a float: it reads as inf" in capsys.readouterr().err


def test_a_grid_value_past_the_float_range_is_named_as_written(tmp_path, capsys):
    rc, _, err = run_cli(["tune", "--base", tmp_path, "--model", tmp_path, "--model", tmp_path, "--evaluator", "e:f",
                          "--grid", "lam=1,-1e999", "-o", tmp_path / "out"], capsys)
    assert rc == 2 and "--grid 'lam=1,-1e999': -1e999 is too large for a float: it reads as -inf" in err


def _copy_with_config(source, target, **changes):
    import json
    import shutil

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.mark.parametrize("changes", [{"intermediate_size": 200_000_000}, {"num_attention_heads": 1, "hidden_size": 16,
                                                                          "intermediate_size": 3_000_000}])
def test_a_config_describing_a_far_larger_model_is_refused_before_transformers_allocates_it(classifiers, tmp_path,
                                                                                              capsys, changes):
    """hp34 D21: stats on a classifier whose config.json claims intermediate_size=200,000,000 beside 32-wide
    weights: transformers allocated the model (24 GB, the OOM killer) before comparing shapes. The model the config
    describes is built on the meta device first and held to the weights' size: any sizing field, named or not."""
    import resource

    _root, base, _fts, data = classifiers
    model = _copy_with_config(base, tmp_path / "huge", **changes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rc, _, err = run_cli(["stats", "fisher", "--model", model, "--data", data, "-o", tmp_path / "st"], capsys)
    assert rc == 1, err
    assert "describes a model of" in err and "the weights hold" in err and "intermediate" in err
    assert not (tmp_path / "st").exists()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB: nothing was allocated


def test_a_config_that_describes_its_weights_still_loads_with_a_fresh_head(classifiers, tmp_path, capsys):
    """The check's slack: an encoder checkpoint loaded as a classifier builds its head afresh (more parameters than
    stored), and that is no reason to refuse it."""
    _root, base, _fts, data = classifiers
    rc, _, err = run_cli(["stats", "fisher", "--model", base, "--data", data, "-o", tmp_path / "st", "--limit", "2"],
                         capsys)
    assert rc == 0, err


def test_rays_private_folder_fits_a_seven_digit_pid_in_tmp_and_the_hint_gives_a_length_that_works(tmp_path,
                                                                                                    monkeypatch):
    """hp34 D5: with TMPDIR=/tmp/t34 (8 bytes) `search --ray` was refused as too long, the hint's "a short folder"
    did not work below 6 bytes, and the default /tmp failed for any pid of 6 digits or more (pid_max is 4194304 on
    systemd hosts). The folder's name is shorter, the check uses the real pid, and the hint says how short."""
    import re
    import shutil

    from tiesmerge import scratch
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import executors

    def new_folder(length: int) -> str:  # a folder of /tmp of exactly ``length`` bytes, made here, never one found
        import random
        import string

        for _ in range(100):
            path = "/tmp/" + "".join(random.choices(string.ascii_lowercase, k=length - len("/tmp/")))
            try:
                os.mkdir(path)
            except FileExistsError:
                continue
            made.append(path)
            return path
        raise AssertionError("no free name")

    monkeypatch.setattr(os, "getpid", lambda: 4_194_303)
    monkeypatch.setattr(scratch, "_FOLDERS", [])
    made: list[str] = []
    try:
        for tmpdir in ("/tmp", new_folder(len("/tmp/t34"))):
            monkeypatch.setattr("tempfile.tempdir", tmpdir)
            made.append(executors._ray_folder())
        long = tmp_path / ("t" * 60)
        long.mkdir()
        monkeypatch.setattr("tempfile.tempdir", str(long))
        with pytest.raises(ConfigError) as caught:
            executors._ray_folder()
        room = int(re.search(r"set TMPDIR to a folder of at most (\d+) bytes", str(caught.value)).group(1))
        assert len("/tmp/t34") <= room < len(str(long))
        monkeypatch.setattr("tempfile.tempdir", new_folder(room))
        made.append(executors._ray_folder())
    finally:
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)
