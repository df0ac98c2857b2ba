"""The thirty-first hostile pass (issue 13) and what was found beside it: numba's and matplotlib's settings files in
the working folder, and numba's own complaints about NUMBA_* values it cannot parse."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers_ckpt import load_dir, write_family_dirs


def _run_in(folder, argv, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(__import__("tiesmerge").__file__)),
                                                    env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "tiesmerge", *argv], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _merge_in(folder, flags, out, env_extra=None):
    return _run_in(folder, ["merge", *flags, "-o", str(out)], env_extra)


def test_a_numba_settings_file_in_the_working_folder_is_not_read(tmp_path):
    """numba reads .numba_config.yaml from the working folder (a downloaded model's, say): `disable_jit: 1` failed the
    merge as "unexpected NotImplementedError ... bug", `cache_dir:` made numba write its cache anywhere on disk, and a
    malformed file stopped it with a YAML traceback. Now the file is not read, and a warning says so."""
    b, ms = write_family_dirs(tmp_path)
    flags = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1])]
    elsewhere = tmp_path / "elsewhere"
    runs = {"plain": None,
            "settings": f"disable_jit: 1\nthreading_layer: tbb\ncache_dir: {elsewhere}\nopt: 9\n",
            "malformed": "[\n", "a list": "- a\n"}
    merged = {}
    for name, text in runs.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        if text is not None:
            (folder / ".numba_config.yaml").write_text(text)
        done = _merge_in(folder, flags, folder / "out")
        assert done.returncode == 0, done.stderr
        assert "bug" not in done.stderr and "Traceback" not in done.stderr, done.stderr
        if text is not None:
            assert f"{folder / '.numba_config.yaml'} is not read: tiesmerge takes numba's settings from NUMBA_*" \
                in done.stderr, done.stderr
        merged[name] = load_dir(folder / "out")
    assert not elsewhere.exists()
    for name in runs:
        for key, tensor in merged["plain"].items():
            assert merged[name][key].equal(tensor), (name, key)


def test_a_numba_variable_numba_cannot_parse_is_one_line(tmp_path):
    """hp30 N2: NUMBA_OPT=9 or an empty NUMBA_DISABLE_JIT printed numba's RuntimeWarning with a whole traceback."""
    b, ms = write_family_dirs(tmp_path)
    flags = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1])]
    done = _merge_in(tmp_path, flags, tmp_path / "out", {"NUMBA_OPT": "9", "NUMBA_DISABLE_JIT": ""})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "RuntimeWarning" not in done.stderr, done.stderr
    assert "warning: NUMBA_OPT='9' is not a value numba reads (ValueError: Environment variable `NUMBA_OPT` is set " \
        "to an unsupported value '9'" in done.stderr, done.stderr
    assert "warning: NUMBA_DISABLE_JIT='' is not a value numba reads" in done.stderr, done.stderr


def test_a_matplotlib_settings_file_in_the_working_folder_is_not_read(tmp_path):
    """matplotlib reads ./matplotlibrc first: `text.usetex: True` failed every report as "unexpected RuntimeError ...
    bug" (no latex), and a FIFO of that name blocked the report forever. Now the file is not read, with a warning."""
    b, ms = write_family_dirs(tmp_path)
    flags = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1])]
    for name in ("usetex", "fifo"):
        folder = tmp_path / name
        folder.mkdir()
        if name == "fifo":
            os.mkfifo(folder / "matplotlibrc")
        else:
            (folder / "matplotlibrc").write_text("text.usetex: True\ntext.latex.preamble: \\usepackage{nosuch}\n")
        done = _run_in(folder, ["analyze", *flags, "-o", str(folder / "report")], timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"{folder / 'matplotlibrc'} is not read: a settings file in the working folder" in done.stderr
        assert (folder / "report" / "report.html").is_file() and (folder / "report" / "sign_conflicts.png").is_file()
