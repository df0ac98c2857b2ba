"""Issue 13, the twenty-third independent hostile pass (hp23): its two defects."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tiesmerge.errors import ConfigError, MergeWarning
from tiesmerge.methods.base import warn_unused
from tiesmerge.registry import make_method
from tiesmerge.tuning.space import build_space


def test_a_stop_signal_dropped_inside_a_finalizer_is_delivered_again(tmp_path):
    """F2: a SIGTERM handled while Python ran a weakref callback (importlib's module locks use one) had its exception
    printed as "Exception ignored" and dropped: the merge went on to exit 0, and every later stop signal was taken as
    the first one's cleanup, so only SIGKILL could stop it."""
    script = tmp_path / "stop.py"
    script.write_text(textwrap.dedent('''
        import os, signal, time, weakref
        import importlib
        cli = importlib.import_module("tiesmerge.cli.main")  # the module (the package exports its main function)
        cli._terminate_like_interrupt()
        class A: pass
        a = A()
        r = weakref.ref(a, lambda _: (os.kill(os.getpid(), signal.SIGTERM), sum(range(10**5))))
        try:
            del a  # the signal arrives inside the callback: its exception cannot propagate from there
            for _ in range(500):
                time.sleep(0.01)
            print("NOT STOPPED", flush=True)
        except cli.Terminated as exc:
            print("STOPPED by", exc.name, flush=True)
    '''))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "STOPPED by SIGTERM" in done.stdout and "Exception ignored" not in done.stderr, (done.stdout, done.stderr)


@pytest.mark.parametrize("method, fixed, unused", [("consensus", {"k": 0}, "tall_lambda"),
                                                   ("dare_linear", {"drop_rate": 0.0}, "seed"),
                                                   ("dare_ties", {"drop_rate": 0.0}, "seed")])
def test_options_a_degenerate_setting_makes_unused_are_said(method, fixed, unused):
    """F1: consensus k = 0 (every entry kept: no mask) ignores tall_lambda(s); DARE drop_rate 0 ignores seed: the
    merge said nothing, and search/tune spent their budget on byte-identical candidates."""
    value = 0.3 if unused == "tall_lambda" else 7
    with pytest.warns(MergeWarning, match=f"{method}: {unused} = {value} is not used"):
        warn_unused(make_method(method, {**fixed, unused: value}))
    with pytest.raises(ConfigError, match=f"searching {unused} changes nothing"):
        build_space(method, 2, axes=[unused], grid={unused: (1, 2, 3)}, fixed=fixed)


def test_notes_of_the_twenty_third_pass(tmp_path, capsys, monkeypatch):
    """N1: NUMBA_NUM_THREADS=0 was "unexpected ValueError ... a bug in tiesmerge" (abc: numba's own traceback); N4: a
    Decimal or Fraction option value was "must be a finite number"."""
    from decimal import Decimal
    from fractions import Fraction

    from helpers_ckpt import run_cli, write_family_dirs
    from tiesmerge.methods import Slerp

    b, ms = write_family_dirs(tmp_path)
    for value in ("0", "abc", "-2", "\u00b2", "100000", "99999999999999999999"):  # hp24 F1-F3: '²', a crash, a bug
        monkeypatch.setenv("NUMBA_NUM_THREADS", value)
        rc, out, err = run_cli(["merge", "--base", b, "--model", ms[0], "--model", ms[1], "-o", tmp_path / "o"],
                               capsys)
        assert rc == 2 and f"NUMBA_NUM_THREADS={value!r} is not a number of threads from 1 to 1024" in err, err
        assert not (tmp_path / "o").exists()
    for value in (Decimal("0.3"), Fraction(1, 3)):  # the numbers they are since hp64a c53 (density was refused in
        assert Slerp(t=value).t == float(value)     # contradictory words, t with "give float(value)")


def test_a_standard_mergekit_ties_recipe_warns_of_no_unused_option(tmp_path, capsys):
    """hp24 F4: every mergekit ties recipe with per-model densities warned "density = 1.0 is not used ... drop it",
    a value the recipe never held (its translation set it beside the densities)."""
    from helpers_ckpt import run_cli, write_family_dirs

    b, ms = write_family_dirs(tmp_path)
    recipe = tmp_path / "ties.yml"
    recipe.write_text(f"merge_method: ties\nbase_model: {b}\nmodels:\n"
                      + "".join(f"  - model: {m}\n    parameters: {{weight: 1, density: 0.5}}\n" for m in ms))
    rc, out, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert rc == 0 and "is not used" not in err, err


def test_ctrl_c_while_the_command_imports_is_no_traceback(tmp_path):
    """hp24 F5: a SIGINT in the first ~0.4 s (the command still importing, its handlers not yet set) printed Python's
    KeyboardInterrupt traceback."""
    script = tmp_path / "early.py"
    script.write_text(textwrap.dedent('''
        import sys
        class Interrupting:  # the Ctrl-C arriving while the command line's modules import
            def find_spec(self, name, path=None, target=None):
                if name == "tiesmerge.cli.main":
                    raise KeyboardInterrupt
        sys.meta_path.insert(0, Interrupting())
        from tiesmerge._launch import entry
        entry()
    '''))
    done = subprocess.run([sys.executable, str(script), "methods"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr
    assert "error: interrupted" in done.stderr
