"""The second hostile pass of issue 13: what an independent review found still open after the first
round, one case per finding, checked as the first catalogue (``test_hostile_catalogue``) checks its
cases: the exit status, the message, no traceback, nothing left at or beside the output path, and
every input's bytes unchanged.

Cross-cutting (CLI, recipes, statistics, tuning, signals, the digest cache): it is the catalogue the
next hostile review reads. Cases that need a signal or could block run in a subprocess with a timeout.

Why over 400 lines: one function per hostile case, each a few lines, kept in one catalogue.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import test_hostile_catalogue
from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import cli_flags, leftovers, make_base, make_family, run_cli, write_hf_dir
from test_hostile_catalogue import _merge, _run, check, snapshot
from tiesmerge.errors import EvaluatorError
from tiesmerge.stats.files import Statistics, StatsManifest, save_stats

# the catalogue's fixture: inputs/base, inputs/ft0, inputs/ft1 and a working folder of the user's own
family = test_hostile_catalogue.family


def _classifier(inputs: Path, num_labels: int = 2) -> tuple[Path, Path]:
    """A sequence classifier's directory (tiny safetensors, config naming its classes) and a data file."""
    config = {"architectures": ["BertForSequenceClassification"],
              "id2label": {str(k): f"c{k}" for k in range(num_labels)}}
    model = write_hf_dir(inputs / "clf", make_base(1), config=config)
    data = inputs / "data.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    return model, data


def _evaluator_module(folder: Path, name: str, body: str) -> None:
    sys.modules.pop(name, None)
    (folder / f"{name}.py").write_text(body)


# ------------------------------------------------------------------ 5. typed errors, before the heavy work


@pytest.mark.parametrize("label", [-1, 2, 99])
def test_stats_labels_must_be_classes_of_the_model(family, tmp_path, capsys, label):
    inputs, _, _ = family
    model, data = _classifier(inputs)
    data.write_text(f'{{"text": "a", "label": 0}}\n{{"text": "b", "label": {label}}}\n')
    before = snapshot(inputs)
    rc, err = _run(["stats", "fisher", "--fisher", "empirical", "--model", str(model), "--data", str(data),
                    "-o", str(tmp_path / "out")], capsys)
    check(rc, err, want_rc=2, needle=("data.jsonl:2", f"label {label} is not a class", "2 (labels 0 to 1)"),
          output=tmp_path / "out", inputs=inputs, before=before)


def test_fisher_information_refuses_labels_outside_the_classes():
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats import fisher_information

    module = torch.nn.Linear(3, 2)
    batches = [{"x": torch.randn(2, 3), "y": torch.tensor([0, -1])}]
    for per_example in ("vmap", "loop"):
        with pytest.raises(ConfigError, match="label -1 is not a class of the model, which has 2"):
            fisher_information(module, batches, lambda m, b: m(b["x"]), kind="empirical", targets=lambda b: b["y"],
                               per_example=per_example)


@pytest.mark.parametrize("device,needle", [("xyz", "not cpu or cuda"), ("cuda", "no CUDA device")])
def test_stats_device_is_checked_before_the_model_is_loaded(family, tmp_path, capsys, monkeypatch, device, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    inputs, _, _ = family
    model, data = _classifier(inputs)
    import transformers

    loaded = []
    monkeypatch.setattr(transformers.AutoModelForSequenceClassification, "from_pretrained",
                        lambda *a, **k: loaded.append(1))
    before = snapshot(inputs)
    rc, err = _run(["stats", "fisher", "--model", str(model), "--data", str(data), "--device", device,
                    "-o", str(tmp_path / "out")], capsys)
    check(rc, err, want_rc=2, needle=("device", needle), output=tmp_path / "out", inputs=inputs, before=before)
    assert not loaded


def _fisher_stats(inputs: Path, base: Path, value: float, models: list[Path] | None = None) -> list[Path]:
    """Fisher statistics of ``value`` everywhere, recording ``models``' digests (None: no digest)."""
    from tiesmerge.stats import files_digest

    tensors = {n: torch.full(t.shape, value) for n, t in load_file(str(base / "model.safetensors")).items()
               if t.is_floating_point()}
    return [save_stats(inputs / f"stats{k}", Statistics(StatsManifest(
        "fisher", 4, model_digest=files_digest(models[k]) if models else None), tensors)) for k in range(2)]


def test_a_huge_but_finite_fisher_statistic_is_no_crash(family, tmp_path, capsys):
    inputs, b, ms = family
    stats = _fisher_stats(inputs, b, 1e38, ms)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "fisher", "--stats", str(stats[0]),
                          "--stats", str(stats[1])), capsys)
    assert "Traceback" not in err and "StopIteration" not in err and snapshot(inputs) == before
    if rc == 0:  # equal Fisher weights: the plain average, finite
        merged = load_file(str(tmp_path / "out" / "model.safetensors"))
        assert all(bool(torch.isfinite(t).all()) for t in merged.values() if t.is_floating_point())
    else:
        check(rc, err, want_rc=1, needle="tensor", output=tmp_path / "out", inputs=inputs, before=before)


def test_an_adapter_given_as_the_base_is_refused(tmp_path, capsys, monkeypatch):
    inputs = tmp_path / "inputs"
    module = "model.layers.0.self_attn.q_proj"
    base = make_base(0)
    base[module + ".weight"] = torch.randn(8, 8)
    write_hf_dir(inputs / "base", base)
    loras = [write_lora_dir(inputs / f"lora{k}", random_lora(base, 2, k, modules=(module,)), alpha=4.0)
             for k in range(3)]
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    rc, err = _run(_merge(loras[0], loras[1:], tmp_path / "out", "--method", "task_arithmetic"), capsys)
    check(rc, err, want_rc=2, needle=("lora0", "the base is a PEFT lora adapter",
                                     "the base is the full model the adapters were trained on"),
          output=tmp_path / "out", inputs=inputs, before=before)
    assert "bind(" not in err


@pytest.mark.parametrize("command", ["tune", "search"])
def test_an_evaluator_that_calls_sys_exit_is_named(family, tmp_path, capsys, monkeypatch, command):
    inputs, b, ms = family
    name = f"exit_eval_{command}"
    _evaluator_module(tmp_path / "work", name, "import sys\n\ndef score(state):\n    sys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    extra = ["--dir", str(tmp_path / "s")] if command == "search" else ["--grid", "lam=1.0"]
    before = snapshot(inputs)
    rc, err = _run([command, *cli_flags(b, ms), "--evaluator", f"{name}:score", "--grid", "density=0.5", *extra],
                   capsys)
    check(rc, err, want_rc=1, needle=(f"--evaluator {name}:score", "sys.exit(3)"), output=None, inputs=inputs,
          before=before)


def test_an_evaluator_interrupted_by_ctrl_c_stops_as_an_interrupt(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    _evaluator_module(tmp_path / "work", "ctrl_c_eval", "def score(state):\n    raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    rc, err = _run(["tune", *cli_flags(b, ms), "--evaluator", "ctrl_c_eval:score", "--grid", "density=0.5",
                    "--grid", "lam=1.0", "-o", str(tmp_path / "out")], capsys)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err and not leftovers(tmp_path / "out")


@pytest.mark.parametrize("api", ["tune", "run_search"])
def test_the_python_api_wraps_an_evaluators_error_with_its_cause(tmp_path, api):
    from tiesmerge.tuning import run_search, tune

    base, fts = make_family(2)

    def broken_score(state):
        raise ZeroDivisionError("oops")

    with pytest.raises(EvaluatorError) as info:
        if api == "tune":
            tune(base, fts, "ties", broken_score, grid={"density": (0.5,), "lam": (1.0,)})
        else:
            run_search(base, fts, "ties", broken_score, axes=("density",), grid={"density": (0.5,)})
    assert "broken_score" in info.value.message and "ZeroDivisionError: oops" in info.value.message
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    with pytest.raises(EvaluatorError, match="not a number"):
        tune(base, fts, "ties", lambda state: "high", grid={"density": (0.5,), "lam": (1.0,)})


@pytest.mark.parametrize("what", ["results.md", "report.html"])
def test_search_files_that_cannot_be_replaced_fail_before_the_search(family, tmp_path, capsys, monkeypatch, what):
    inputs, b, ms = family
    name = f"count_eval_{what.replace('.', '_')}"
    _evaluator_module(tmp_path / "work", name, "CALLS = []\n\ndef score(state):\n    CALLS.append(1)\n"
                                                "    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    d = tmp_path / "s"
    d.mkdir()
    (d / what).mkdir()  # a folder where the search writes a file at its end
    before, d_before = snapshot(inputs), snapshot(d)
    rc, err = _run(["search", *cli_flags(b, ms), "--evaluator", f"{name}:score", "--grid", "density=0.5",
                    "--dir", str(d)], capsys)
    check(rc, err, want_rc=1, needle=(what, "a directory"), output=None, inputs=inputs, before=before)
    assert snapshot(d) == d_before and not getattr(sys.modules.get(name), "CALLS", [])


# ------------------------------------------------------------------ 6. nothing left behind, whichever signal stops it


def _default_signals() -> None:
    """In the child, every stop signal as a command started from a terminal has it: a suite launched in the
    background (or under nohup) passes INT, QUIT (and HUP) on ignored, and tiesmerge leaves an ignored signal so."""
    for signum in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)


# SIGXCPU (`ulimit -t`, SGE's s_cpu), SIGALRM and SIGVTALRM: the seventh pass found them leaving the partial output;
# SIGPROF, SIGPWR and the real-time signals: the eighth
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGXCPU, signal.SIGALRM,
                                    signal.SIGVTALRM, signal.SIGPROF, signal.SIGPWR, signal.SIGRTMIN,
                                    signal.SIGRTMIN + 1])
def test_a_stop_signal_removes_the_temporary_output(family, tmp_path, signum):
    inputs, b, ms = family
    out = tmp_path / "out"
    code = ("import sys, time\n"
            "from tiesmerge.io import writer\n"
            "real = writer.SafetensorsStreamWriter.write\n"
            "def slow(self, name, chunk):\n"  # every chunk takes 0.5 s: the signal lands mid-write
            "    print('writing', flush=True); time.sleep(0.5); return real(self, name, chunk)\n"
            "writer.SafetensorsStreamWriter.write = slow\n"
            "from tiesmerge.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    before = snapshot(inputs)
    proc = subprocess.Popen([sys.executable, "-c", code, *_merge(b, ms, out)], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_signals)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else \
        f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    check(proc.returncode, err, want_rc=128 + signum, needle=f"terminated by {name}",
          output=out, inputs=inputs, before=before)


def test_every_signal_that_would_end_the_process_is_a_stop_signal():
    """Whatever ends the process by default but a crash's own fault signals: the realtime range included."""
    from tiesmerge.cli.main import STOP_SIGNALS

    faults = {signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGABRT, signal.SIGSYS,
              signal.SIGTRAP, signal.SIGKILL, signal.SIGSTOP}
    ignored_or_stopping = {signal.SIGCHLD, signal.SIGCONT, signal.SIGURG, signal.SIGWINCH, signal.SIGTSTP,
                           signal.SIGTTIN, signal.SIGTTOU, signal.SIGINT, signal.SIGPIPE, signal.SIGXFSZ}
    everything = set(range(1, signal.NSIG)) & {int(s) for s in signal.valid_signals()}
    assert {int(s) for s in STOP_SIGNALS} == everything - {int(s) for s in faults | ignored_or_stopping}


def test_a_profilers_own_handler_is_left_in_place(family, tmp_path):
    """SIGPROF with a handler of its own (a sampling profiler's) is not taken over: the merge finishes."""
    inputs, b, ms = family
    out = tmp_path / "out"
    code = ("import os, signal, sys\n"
            "HITS = []\n"
            "signal.signal(signal.SIGPROF, lambda *a: HITS.append(1))\n"
            "from tiesmerge.io import writer\n"
            "real = writer.SafetensorsStreamWriter.write\n"
            "def prof(self, name, chunk):\n"
            "    os.kill(os.getpid(), signal.SIGPROF); return real(self, name, chunk)\n"
            "writer.SafetensorsStreamWriter.write = prof\n"
            "from tiesmerge.cli.main import main\n"
            "code = main(sys.argv[1:]); assert HITS, 'the profiler saw no signal'; sys.exit(code)\n")
    proc = subprocess.run([sys.executable, "-c", code, *_merge(b, ms, out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file()


def test_a_hangup_ignored_by_nohup_stays_ignored(family, tmp_path):
    inputs, b, ms = family
    out = tmp_path / "out"
    code = ("import os, signal, sys\n"
            "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"  # what nohup does
            "from tiesmerge.io import writer\n"
            "real = writer.SafetensorsStreamWriter.write\n"
            "def hup(self, name, chunk):\n"
            "    os.kill(os.getpid(), signal.SIGHUP); return real(self, name, chunk)\n"
            "writer.SafetensorsStreamWriter.write = hup\n"
            "from tiesmerge.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    proc = subprocess.run([sys.executable, "-c", code, *_merge(b, ms, out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file() and json.loads((out / "tiesmerge.json").read_text())
    assert os.listdir(tmp_path).count("out") == 1 and len(leftovers(out)) == 1


# ------------------------------------------------------------------ 7. true messages; nothing accepted silently


def _recipe(inputs: Path, b: Path, ms: list[Path], body: str, name: str = "r.yaml") -> Path:
    recipe = inputs / name
    recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\n" + body)
    return recipe


@pytest.mark.parametrize("where", ["parameters", "top"])
def test_a_key_given_twice_in_a_recipe_is_an_error_naming_it(family, tmp_path, capsys, where):
    inputs, b, ms = family
    body = ("parameters:\n  density: 0.2\n  lam: 1.0\n  density: 0.9\n" if where == "parameters" else
            "dtype: float32\ndtype: float16\n")
    recipe = _recipe(inputs, b, ms, body)
    key, lines = ("density", "lines 5 and 7") if where == "parameters" else ("dtype", "lines 4 and 5")
    before = snapshot(inputs)
    for argv in (["validate", str(recipe)], ["merge", str(recipe), "-o", str(tmp_path / "out")]):
        rc, err = _run(argv, capsys)
        check(rc, err, want_rc=2, needle=(f"key {key!r} is given twice", lines), output=tmp_path / "out",
              inputs=inputs, before=before)


@pytest.mark.parametrize("case,want_rc,needle", [("missing_base", 1, "no such file"), ("etc", 1, "/etc"),
                                                 ("twice", 2, "listed twice"), ("adapter_base", 2, "PEFT")])
def test_validate_runs_the_checks_of_the_merge_plan(family, tmp_path, capsys, case, want_rc, needle):
    inputs, b, ms = family
    models = [ms[0], ms[1]]
    base = {"missing_base": inputs / "nope", "etc": Path("/etc")}.get(case, b)
    if case == "twice":
        models = [ms[0], ms[0]]
    if case == "adapter_base":
        base = write_lora_dir(inputs / "lora", random_lora(make_base(0), 2, 0,
                                                           modules=("model.layers.0.self_attn.q_proj",)), alpha=4.0)
    recipe = inputs / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {base}\nmodels: [{models[0]}, {models[1]}]\n")
    before = snapshot(inputs)
    rc, out, err = run_cli(["validate", str(recipe)], capsys)
    check(rc, err, want_rc=want_rc, needle=needle, output=None, inputs=inputs, before=before)
    assert "ok" not in out


def test_validate_says_ok_only_after_the_plan_checks(family, capsys):
    inputs, b, ms = family
    rc, out, err = run_cli(["validate", str(_recipe(inputs, b, ms, ""))], capsys)
    assert rc == 0, err
    assert "ok" in out and "inputs checked: 9 tensors to merge" in out


def _cli_flags() -> set[str]:
    import argparse

    from tiesmerge.cli.main import _parser

    flags: set[str] = set()
    todo = [_parser()]
    while todo:
        parser = todo.pop()
        for action in parser._actions:
            flags.update(o for o in action.option_strings if o.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())
    return flags


# options of other programs that messages may name, and the program each belongs to
FOREIGN_OPTIONS = {"--head": "ray start", "--address": "ray start", "--revision": "hf download",
                   "--export": "python -m tiesmerge_bench", "--hf-path": "mlx_lm.convert",
                   "--mlx-path": "mlx_lm.convert", "--dequantize": "mlx_lm.convert"}


def test_every_option_a_message_or_hint_names_exists():
    """Every ``--option`` written in the library's strings (errors, hints, help, examples) is a flag
    of a tiesmerge command (a hint once sent users to a ``--log`` that never existed)."""
    import ast
    import re

    import tiesmerge

    flags, missing = _cli_flags(), []
    for path in sorted(Path(tiesmerge.__file__).parent.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        # an f-string is read whole (its fields as "{}"), so "hf download {id} --revision {rev}" is one line
        texts: list[tuple[int, str]] = []
        inside = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                texts.append((node.lineno, "".join(v.value if isinstance(v, ast.Constant) else "{}"
                                                   for v in node.values)))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inside:
                texts.append((node.lineno, node.value))
        for lineno, text in texts:
            for line in text.splitlines():
                for match in re.finditer(r"(?<![\w-])--[a-z][a-z0-9-]*", line):
                    option = match.group()
                    program = FOREIGN_OPTIONS.get(option)
                    if option in flags or (program is not None and program in line[:match.start()]):
                        continue
                    missing.append(f"{path.name}:{lineno}: {option}")
    assert not missing, f"options named in messages that no tiesmerge command has: {missing}"
    assert len(flags) > 60  # the scan saw the real parser


def test_every_force_flag_says_what_it_replaces():
    from tiesmerge.cli.main import _parser

    helps = {name: next(a.help for a in sub._actions if "--force" in a.option_strings)
             for name, sub in next(a for a in _parser()._actions if a.dest == "command").choices.items()
             if any("--force" in a.option_strings for a in sub._actions)}
    assert set(helps) >= {"merge", "analyze", "tune", "search", "stats"}
    assert all("tiesmerge wrote" in h and "never an input" in h for h in helps.values()), helps


@pytest.mark.parametrize("case", ["header", "record", "binary"])
def test_a_corrupt_search_log_is_called_corrupt(family, tmp_path, capsys, monkeypatch, case):
    inputs, b, ms = family
    _evaluator_module(tmp_path / "work", f"log_eval_{case}", "def score(state):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    argv = ["search", *cli_flags(b, ms), "--evaluator", f"log_eval_{case}:score", "--grid", "density=0.5",
            "--dir", str(tmp_path / "s")]
    assert _run(argv, capsys)[0] == 0  # a first search writes its log
    log = tmp_path / "s" / "log.jsonl"
    lines = log.read_bytes().splitlines(keepends=True)
    if case == "header":
        lines[0] = b'{"format": "tiesmerge-search/1", "space": {tru\n'
    elif case == "record":
        lines.append(b"{not json}\n")
    else:
        lines[0] = b"\xff\xfe" + lines[0]
    log.write_bytes(b"".join(lines))
    before, log_before = snapshot(inputs), log.read_bytes()
    rc, err = _run(argv, capsys)
    where = f"log.jsonl:{len(lines)}" if case == "record" else "log.jsonl:1"
    check(rc, err, want_rc=2, needle=(where, "corrupt", "delete"), output=None, inputs=inputs, before=before)
    assert "another search" not in err and "--log" not in err and log.read_bytes() == log_before


@pytest.mark.parametrize("what", ["link", "fifo"])
def test_the_search_log_is_opened_without_following_a_link_or_blocking(tmp_path, what):
    from tiesmerge.errors import OutputError
    from tiesmerge.tuning.results_log import ResultsLog

    target = tmp_path / "elsewhere.jsonl"
    target.write_text("someone else's file\n")
    log = tmp_path / "log.jsonl"
    if what == "link":
        log.symlink_to(target)
    else:
        os.mkfifo(log)
    with pytest.raises(OutputError, match="symbolic link" if what == "link" else "not a regular file"):
        ResultsLog(log, {"space": {}})
    assert target.read_text() == "someone else's file\n"


@pytest.mark.parametrize("dtype,code,wider", [("float16", "F16", True), ("bfloat16", "BF16", False),
                                              ("float32", "F32", False)])
def test_the_overflow_hint_fits_the_output_dtype(tmp_path, capsys, dtype, code, wider):
    from test_hostile_catalogue import big_step_family

    inputs, b, ms = big_step_family(tmp_path)
    lam = "1e7" if dtype == "float16" else "1e38"
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "task_arithmetic", "--lam", lam, "--dtype", dtype),
                   capsys)
    check(rc, err, want_rc=1, needle=("not finite", f"output dtype {code}", "smaller lam"), output=tmp_path / "out",
          inputs=inputs, before=before)
    assert ("wider dtype" in err) == wider


def test_a_method_given_as_a_list_says_so(family, tmp_path, capsys):
    inputs, b, ms = family
    recipe = inputs / "r.yaml"
    recipe.write_text(f"method: [ties]\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\n")
    before = snapshot(inputs)
    rc, err = _run(["validate", str(recipe)], capsys)
    check(rc, err, want_rc=2, needle=("'method' must be one method name, got list", "write method: ties"), output=None,
          inputs=inputs, before=before)
    assert "unknown method" not in err


@pytest.mark.parametrize("value", ["5", "[a, b]", "{path: x}"])
def test_a_base_that_is_not_text_is_a_type_error(family, tmp_path, capsys, value):
    inputs, b, ms = family
    recipe = inputs / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {value}\nmodels: [{ms[0]}, {ms[1]}]\n")
    before = snapshot(inputs)
    rc, err = _run(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    check(rc, err, want_rc=2, needle="'base' must be the path of a model (text), got", output=tmp_path / "out",
          inputs=inputs, before=before)
    assert "no such file" not in err


def test_a_file_too_large_names_the_file_and_the_free_space(family, tmp_path):
    inputs, b, ms = family
    out = tmp_path / "out"
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))\n"  # Python ignores SIGXFSZ: writes get EFBIG
            "from tiesmerge.cli.main import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    before = snapshot(inputs)
    proc = subprocess.run([sys.executable, "-c", code, *_merge(b, ms, out)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    check(proc.returncode, proc.stderr, want_rc=1, needle=("model.safetensors: cannot write it", "File too large",
                                                          "is free there", "--shard-size"),
          output=out, inputs=inputs, before=before)


def test_a_full_disk_while_writing_a_shard_names_the_file(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    import builtins
    import errno as errno_mod

    from tiesmerge.io import writer

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno_mod.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(writer, "open", lambda path, mode="r", *a, **k: Full(builtins.open(path, mode, *a, **k))
                        if str(path).endswith(".safetensors") and "w" in mode else builtins.open(path, mode, *a, **k),
                        raising=False)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=("model.safetensors: cannot write it: the disk is full", "is free there"),
          output=tmp_path / "out", inputs=inputs, before=before)


def test_a_memory_budget_below_what_the_plan_needs_is_refused(family, tmp_path, capsys):
    inputs, b, ms = family
    before = snapshot(inputs)
    for extra in ([], ["--dry-run"]):
        rc, err = _run(_merge(b, ms, tmp_path / "out", "--memory-budget", "1B", *extra), capsys)
        check(rc, err, want_rc=2, needle=("memory budget 1 B is below the", "raise --memory-budget to"),
              output=tmp_path / "out", inputs=inputs, before=before)
    rc, err = _run(_merge(b, ms, tmp_path / "out", "--memory-budget", "4KiB"), capsys)  # tiny, but enough: rows
    assert rc == 0, err


@pytest.mark.parametrize("target", ["model", "base", "recipe", "user_folder"])
def test_a_dry_run_checks_the_output_as_a_real_run_does(family, tmp_path, capsys, target):
    inputs, b, ms = family
    recipe = _recipe(inputs, b, ms, "")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.jpg").write_bytes(b"\xff\xd8")
    out = {"model": ms[0], "base": b, "recipe": recipe, "user_folder": tmp_path / "photos"}[target]
    needle = {"model": "is model 0", "base": "is the base", "recipe": "the recipe",
              "user_folder": "only a directory that tiesmerge wrote"}[target]
    before = snapshot(inputs)
    rc, err = _run(["merge", str(recipe), "--dry-run", "-o", str(out), "--force"], capsys)
    check(rc, err, want_rc=1, needle=needle, output=None, inputs=inputs, before=before)


def test_statistics_without_a_model_digest_are_refused(family, tmp_path, capsys):
    inputs, b, ms = family
    stats = _fisher_stats(inputs, b, 1.0)  # written without a digest: model_digest null in the manifest
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "fisher", "--stats", str(stats[0]), "--stats",
                          str(stats[1])), capsys)
    check(rc, err, want_rc=1, needle=("model_digest: null", "cannot check", "model 0"), output=tmp_path / "out",
          inputs=inputs, before=before)


def test_a_gram_statistic_that_is_not_positive_semidefinite_is_refused(family, tmp_path, capsys):
    from tiesmerge.stats import files_digest

    inputs, b, ms = family
    names = [n for n, t in load_file(str(b / "model.safetensors")).items() if t.dim() == 2 and t.is_floating_point()]
    dirs = []
    for k, m in enumerate(ms):
        grams = {n: torch.eye(load_file(str(b / "model.safetensors"))[n].shape[1]) for n in names}
        if k == 1:
            grams["model.layers.0.mlp.up_proj.weight"] = -grams["model.layers.0.mlp.up_proj.weight"]
        dirs.append(save_stats(inputs / f"gram{k}", Statistics(StatsManifest("gram", 4, model_digest=files_digest(m)),
                                                               grams)))
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "regmean", "--stats", str(dirs[0]), "--stats",
                          str(dirs[1])), capsys)
    check(rc, err, want_rc=1, needle=("gram1", "'model.layers.0.mlp.up_proj.weight'", "not positive semi-definite"),
          output=tmp_path / "out", inputs=inputs, before=before)


@pytest.mark.parametrize("flag,value", [("use_rslora", '"yes"'), ("fan_in_fan_out", '"false"'), ("use_dora", "0")])
def test_adapter_config_flags_must_be_booleans(tmp_path, capsys, monkeypatch, flag, value):
    inputs = tmp_path / "inputs"
    module = "model.layers.0.self_attn.q_proj"
    base = make_base(0)
    base[module + ".weight"] = torch.randn(8, 8)
    b = write_hf_dir(inputs / "base", base)
    loras = [write_lora_dir(inputs / f"lora{k}", random_lora(base, 2, k, modules=(module,)), alpha=4.0)
             for k in range(2)]
    config = loras[1] / "adapter_config.json"
    # the key set once (a key given twice is refused for itself since hp88a c76)
    config.write_text(json.dumps({**json.loads(config.read_text()), flag: json.loads(value)}))
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, loras, tmp_path / "out", "--method", "task_arithmetic"), capsys)
    check(rc, err, want_rc=1, needle=("adapter_config.json", flag, "not true or false"), output=tmp_path / "out",
          inputs=inputs, before=before)


def test_consensus_k_is_checked_against_the_number_of_models(family, tmp_path, capsys):
    inputs, b, ms = family
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "consensus", "--k", "99"), capsys)
    check(rc, err, want_rc=2, needle=("k=99 counts tasks", "at most 2"), output=tmp_path / "out", inputs=inputs,
          before=before)


@pytest.mark.parametrize("where", ["cli", "recipe", "tune_grid", "search_range", "search_set", "api"])
def test_an_option_outside_its_declared_range_is_refused_everywhere(family, tmp_path, capsys, monkeypatch, where):
    inputs, b, ms = family
    _evaluator_module(tmp_path / "work", f"range_eval_{where}", "def score(state):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    recipe = inputs / "r.yaml"
    recipe.write_text(f"method: slerp\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\nparameters: {{t: 1.0e+30}}\n")
    ev = ["--evaluator", f"range_eval_{where}:score"]
    argv = {"cli": _merge(b, ms, tmp_path / "out", "--method", "slerp", "--t", "1e30"),
            "recipe": ["merge", str(recipe), "-o", str(tmp_path / "out")],
            "tune_grid": ["tune", *cli_flags(b, ms), "--method", "slerp", *ev, "--grid", "t=0.5,1e30"],
            "search_range": ["search", *cli_flags(b, ms), "--method", "slerp", *ev, "--strategy", "random",
                             "--budget", "2", "--axis", "t", "--range", "t=0:1e30", "--dir", str(tmp_path / "s")],
            "search_set": ["search", *cli_flags(b, ms), "--method", "nuslerp", *ev, "--axis", "weights",
                           "--set", "t=7", "--dir", str(tmp_path / "s")]}.get(where)
    before = snapshot(inputs)
    if argv is None:
        from tiesmerge.errors import ConfigError
        from tiesmerge.tuning import tune

        with pytest.raises(ConfigError, match=r"t must be in \[0, 1\]"):
            tune(b, ms, "slerp", lambda state: 1.0, grid={"t": (0.5, 1e30)})
        return
    rc, err = _run(argv, capsys)
    check(rc, err, want_rc=2, needle=("t must be in [0, 1] (fraction)",), output=tmp_path / "out", inputs=inputs,
          before=before)
    assert not (tmp_path / "s").exists()


def test_a_shard_rewritten_with_its_mtime_restored_is_detected(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    from tiesmerge.engine import executor

    real = executor.Executor.run
    shard = ms[1] / "model.safetensors"

    def rewrite(self, sink):
        result = real(self, sink)
        st = os.stat(shard)
        raw = bytearray(shard.read_bytes())
        raw[-1] ^= 0xFF  # same size, other values
        shard.write_bytes(bytes(raw))
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))  # the writer hides its trace
        return result

    monkeypatch.setattr(executor.Executor, "run", rewrite)
    # the check without read leases (a file system that grants none): with one, this process's own rewrite waited
    # out the kernel's lease-break time, 45 s (leases have tests of their own: hostile pass 14)
    monkeypatch.setenv("TIESMERGE_LEASES", "0")
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    assert rc == 1 and "model.safetensors: an input file was rewritten" in err and "Traceback" not in err, err
    assert not leftovers(tmp_path / "out")


def test_a_backreference_in_an_exclude_pattern_is_named_as_such(family, tmp_path, capsys):
    inputs, b, ms = family
    before = snapshot(inputs)
    for pattern in (r"(a\1)", r"(?P<x>q(?P=x))"):
        rc, err = _run(_merge(b, ms, tmp_path / "out", "--method", "tsv_m", "--exclude", pattern), capsys)
        check(rc, err, want_rc=2, needle=("exclude uses a backreference", "backreferences are not supported"),
              output=tmp_path / "out", inputs=inputs, before=before)
        assert rc != 0 and "open group" not in err and "alpha_pattern" not in err


# ------------------------------------------------------------------ the digest cache: outside inputs and output, safe


def _cached_merge(family, tmp_path, capsys, monkeypatch, cache: Path) -> tuple[int, str]:
    inputs, b, ms = family
    monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(cache))
    return _run(_merge(b, ms, tmp_path / "out"), capsys)


def test_a_link_at_the_digest_cache_is_replaced_never_followed(family, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (tmp_path / "precious.txt").write_text("not a cache")
    (cache / "digests.json").symlink_to(tmp_path / "precious.txt")
    rc, err = _cached_merge(family, tmp_path, capsys, monkeypatch, cache)
    assert rc == 0, err
    assert (tmp_path / "precious.txt").read_text() == "not a cache"
    assert not (cache / "digests.json").is_symlink() and json.loads((cache / "digests.json").read_text())
    assert [p.name for p in cache.iterdir()] == ["digests.json"]  # no temporary file left beside it


def test_a_fifo_at_the_digest_cache_does_not_block(family, tmp_path):
    inputs, b, ms = family
    cache = tmp_path / "cache"
    cache.mkdir()
    os.mkfifo(cache / "digests.json")
    env = {**os.environ, "TIESMERGE_CACHE_DIR": str(cache)}
    proc = subprocess.run([sys.executable, "-m", "tiesmerge.cli.main", *map(str, _merge(b, ms, tmp_path / "out"))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (cache / "digests.json").is_file()  # replaced by the cache file, never opened for blocking reads


def test_the_digest_cache_follows_xdg_and_can_be_switched_off(family, tmp_path, capsys, monkeypatch):
    inputs, b, ms = family
    monkeypatch.delenv("TIESMERGE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("TIESMERGE_DIGEST_CACHE", "0")
    assert _run(_merge(b, ms, tmp_path / "off"), capsys)[0] == 0
    assert not (tmp_path / "xdg").exists()
    monkeypatch.setenv("TIESMERGE_DIGEST_CACHE", "1")
    assert _run(_merge(b, ms, tmp_path / "on"), capsys)[0] == 0
    remembered = json.loads((tmp_path / "xdg" / "tiesmerge" / "digests.json").read_text())
    assert str((b / "model.safetensors").resolve()) in remembered


@pytest.mark.parametrize("command", ["merge", "search"])
def test_a_hint_never_suggests_a_force_that_would_refuse(family, tmp_path, capsys, monkeypatch, command):
    inputs, b, ms = family
    _evaluator_module(tmp_path / "work", f"force_eval_{command}", "def score(state):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    out = tmp_path / "photos"
    out.mkdir()
    (out / "me.jpg").write_bytes(b"\xff\xd8")
    argv = (_merge(b, ms, out) if command == "merge" else
            ["search", *cli_flags(b, ms), "--evaluator", f"force_eval_{command}:score", "--grid", "density=0.5",
             "--dir", str(tmp_path / "s"), "-o", str(out)])
    before = snapshot(inputs)
    rc, err = _run(argv, capsys)
    check(rc, err, want_rc=1, needle=("tiesmerge did not write it", "me.jpg", "--force replaces only"), output=out,
          inputs=inputs, before=before, output_existed=True)
    assert "pass --force" not in err and not (tmp_path / "s").exists()
    rc, err = _run([*argv, "--force"], capsys)  # and --force says the same, not something else
    assert rc == 1 and "--force replaces only a directory that tiesmerge wrote" in err


# ------------------------------------------------------------------ third pass: --force needs tiesmerge's own manifest


@pytest.mark.parametrize("marker", ["tiesmerge.json", "tiesmerge_stats.json", "analysis.json"])
@pytest.mark.parametrize("text", ["{}", "[1]", "not json", '{"tiesmerge_version": "1", "output": {}}'])
def test_force_needs_a_manifest_tiesmerge_wrote_not_a_file_of_that_name(family, tmp_path, capsys, marker, text):
    inputs, b, ms = family
    docs = tmp_path / "work" / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("the user's notes")
    (docs / marker).write_text(text)
    before = snapshot(docs)
    rc, err = _run(_merge(b, ms, docs, "--force"), capsys)
    check(rc, err, want_rc=1, needle=("--force replaces only a directory that tiesmerge wrote", "a.txt"),
          output=docs, inputs=docs, before=before, output_existed=True)


# ------------------------------------------------------------------ third pass: a grid is counted before it is built


def _sweep(command: str, b: Path, ms: list[Path], grid: list[str], tmp_path: Path) -> list[str]:
    flags = [x for g in grid for x in ("--grid", g)]
    tail = ["-o", str(tmp_path / "out")] if command == "tune" else ["--dir", str(tmp_path / "s")]
    return [command, *cli_flags(b, ms), *flags, "--evaluator", "sweep_eval:score", *tail]


@pytest.mark.parametrize("command", ["tune", "search"])
@pytest.mark.parametrize("grid,needle", [
    (["lam=0:1:0"], "the step must be a non-zero number"),
    (["lam=1:0:0.1"], "the step leads away from stop"),
    (["lam=0:1e308:1e-308"], "inf points, more than the 100,000"),
    (["lam=0:1000:0.1", "density=0.01:0.99:0.01"], "the grid has 990,099 points")])
def test_a_grid_range_that_is_empty_unbounded_or_huge_is_a_config_error(family, tmp_path, capsys, monkeypatch,
                                                                        command, grid, needle):
    inputs, b, ms = family
    _evaluator_module(tmp_path / "work", "sweep_eval", "def score(state):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    before = snapshot(inputs)
    rc, err = _run(_sweep(command, b, ms, grid, tmp_path), capsys)
    check(rc, err, want_rc=2, needle=needle, output=tmp_path / "out", inputs=inputs, before=before)
    assert not (tmp_path / "s").exists()


def test_a_grid_of_1e18_points_is_refused_at_once(family, tmp_path):
    """h30: 0:1e9:1e-9 was built point by point (in a subprocess with a memory cap: it must not run away)."""
    import resource

    inputs, b, ms = family
    (tmp_path / "work" / "sweep_eval.py").write_text("def score(state):\n    return 1.0\n")
    cap = lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))  # noqa: E731
    proc = subprocess.run([sys.executable, "-m", "tiesmerge.cli.main",
                           *map(str, _sweep("tune", b, ms, ["lam=0:1e9:1e-9"], tmp_path))],
                          cwd=tmp_path / "work", capture_output=True, text=True, timeout=60, preexec_fn=cap,
                          env={**os.environ, "PYTHONPATH": str(tmp_path / "work")})
    assert proc.returncode == 2, proc.stderr
    assert "1e+18 points, more than the 100,000" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------ third pass: no Inf handed back or scored


def test_the_state_dict_api_refuses_an_overflowed_merge_naming_the_tensor():
    """n21: merge(state dicts) returned Inf tensors; now the same check as a written output."""
    from tiesmerge import merge
    from tiesmerge.errors import InvalidTensorError

    base = {"w": torch.zeros(4, 4)}  # task vectors of 10: lam 1e38 (within float32's range) overflows
    fts = [{"w": torch.full((4, 4), 10.0)}, {"w": torch.full((4, 4), 10.0)}]
    kept = {k: v.clone() for k, v in base.items()}
    with pytest.raises(InvalidTensorError, match=r"tensor '.+': the merged value at element \d+ is not finite"):
        merge(base, fts, "task_arithmetic", lam=1e38)
    assert all(torch.equal(kept[k], base[k]) for k in base)
    assert all(torch.isfinite(v).all() for v in merge(base, fts, "task_arithmetic", lam=1.0).values())


def test_tune_never_scores_a_candidate_that_lam_made_infinite(family, tmp_path, capsys, monkeypatch):
    """n17: --grid lam=1e300 fed Inf weights to the evaluator and printed best lam=1e+300 (now: 1e38, within
    float32's range, on task vectors of 10)."""
    from test_hostile_catalogue import big_step_family

    inputs, b, ms = big_step_family(tmp_path)
    _evaluator_module(tmp_path / "work", "inf_eval", "SEEN = []\ndef score(state):\n"
                      "    import torch\n    SEEN.append(all(bool(torch.isfinite(v).all()) for v in state.values()"
                      " if v.is_floating_point()))\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    before = snapshot(inputs)
    rc, err = _run(["tune", *cli_flags(b, ms), "--grid", "density=0.5", "--grid", "lam=1.0,1e38", "--evaluator",
                    "inf_eval:score", "-o", str(tmp_path / "out")], capsys)
    check(rc, err, want_rc=1, needle=("candidate density=0.5 lam=1e+38", "is not finite", "cannot be scored"),
          output=tmp_path / "out", inputs=inputs, before=before)
    assert "best:" not in err and sys.modules["inf_eval"].SEEN == [True]


# ------------------------------------------------------------------ third pass: a failed search leaves no log


@pytest.mark.parametrize("why", ["raises", "overflow"])
def test_a_search_that_fails_before_scoring_leaves_no_default_dir(family, tmp_path, capsys, monkeypatch, why):
    """t36, D04, n18: ./tiesmerge-search/log.jsonl stayed behind with no scored candidate in it."""
    from test_hostile_catalogue import big_step_family

    inputs, b, ms = big_step_family(tmp_path)
    _evaluator_module(tmp_path / "work", f"fail_eval_{why}", "def score(state):\n    raise RuntimeError('boom')\n"
                      if why == "raises" else "def score(state):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path / "work"))
    before = snapshot(inputs)
    rc, err = _run(["search", *cli_flags(b, ms), "--evaluator", f"fail_eval_{why}:score", "--grid", "density=0.5",
                    "--grid", f"lam={'1.0' if why == 'raises' else '1e38'}"], capsys)
    check(rc, err, want_rc=1, needle="boom" if why == "raises" else "is not finite", output=None, inputs=inputs,
          before=before)
    assert not (tmp_path / "work" / "tiesmerge-search").exists()


@pytest.mark.parametrize("flag", ["allow_distant", "allow_pickle", "force", "progress"])
def test_the_api_takes_only_true_or_false_for_its_switches(tmp_path, flag):
    """D09: allow_distant='no' counted as true (the recipe already refuses a non-boolean)."""
    from tiesmerge import merge
    from tiesmerge.errors import ConfigError

    base, fts = make_family(2)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=f"{flag}='no' must be True or False"):
        merge(base, fts, "task_arithmetic", output=out, **{flag: "no"})
    assert not out.exists()


# ------------------------------------------------------------------ third pass: another tokenizer of the same size


def _tokenizer(folder: Path, words: list[str]) -> None:
    (folder / "tokenizer.json").write_text(json.dumps(
        {"version": "1.0", "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}}}))


@pytest.mark.parametrize("policy", [[], ["--vocab-policy", "truncate"]])
def test_a_model_whose_tokenizer_swaps_two_ids_is_refused(family, tmp_path, capsys, policy):
    """t29h/t29i: same vocabulary size, w0 and w1 swapped: merged silently unless the policy was union."""
    inputs, b, ms = family
    words = [f"w{i}" for i in range(32)]
    _tokenizer(b, words)
    _tokenizer(ms[0], words)
    _tokenizer(ms[1], [words[1], words[0], *words[2:]])
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out", *policy), capsys)
    check(rc, err, want_rc=1, needle=("model 1 (", "another tokenizer", "id 0: 'w0' in the base, 'w1' in model 1",
                                      "--vocab-policy union"), output=tmp_path / "out", inputs=inputs, before=before)
    _tokenizer(ms[1], [*words, "added"])  # a token added after the base's: no disagreement on shared ids
    assert _run(_merge(b, ms, tmp_path / "out", "--vocab-policy", "truncate"), capsys)[0] == 0


# ------------------------------------------------------------------ third pass: an adapter's files stay inside it


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_an_adapter_file_linked_outside_its_directory_is_refused(tmp_path, capsys, monkeypatch, name):
    """p28: the same link on model.safetensors was refused; on adapter_model.safetensors it was read."""
    inputs = tmp_path / "inputs"
    module = "model.layers.0.self_attn.q_proj"
    base = make_base(0)
    b = write_hf_dir(inputs / "base", base)
    loras = [write_lora_dir(inputs / f"lora{k}", random_lora(base, 2, k, modules=(module,)), alpha=4.0)
             for k in range(2)]
    outside = inputs / f"elsewhere-{name}"
    os.replace(loras[0] / name, outside)
    (loras[0] / name).symlink_to(outside)
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, loras, tmp_path / "out", "--method", "task_arithmetic"), capsys)
    check(rc, err, want_rc=1, needle=(str(loras[0] / name), f"resolves to {outside}, outside {loras[0]}"),
          output=tmp_path / "out", inputs=inputs, before=before)


def test_a_cache_snapshot_that_is_a_link_out_of_the_cache_is_refused(family, tmp_path, capsys, monkeypatch):
    """p22: models--org--n/snapshots/<commit> a link to ~/o2 was merged as org/n."""
    inputs, b, ms = family
    repo = tmp_path / "hf" / "hub" / "models--org--n"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots").mkdir()
    commit = "a" * 40
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).symlink_to(ms[1])
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    before = snapshot(inputs)
    rc, err = _run(["merge", "--base", str(b), "--model", str(ms[0]), "--model", "org/n", "-o", str(tmp_path / "out"),
                    "--no-progress"], capsys)
    check(rc, err, want_rc=1, needle=("the snapshot aaaaaaaaaaaa of org/n", f"resolves to {ms[1]}, outside {repo}"),
          output=tmp_path / "out", inputs=inputs, before=before)


# ------------------------------------------------------------------ third pass: typed errors


def test_a_model_that_is_a_symlink_loop_is_named(family, tmp_path, capsys):
    """p12: 'unexpected RuntimeError: Symlink loop ... this is a bug'."""
    inputs, b, ms = family
    (inputs / "loopd").symlink_to(inputs / "loopd")
    before = snapshot(inputs)
    rc, err = _run(_merge(b, [ms[0], inputs / "loopd"], tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=("loopd: the model is a symbolic link loop", "fix or remove the link"),
          output=tmp_path / "out", inputs=inputs, before=before)
    assert "unexpected" not in err


def test_paths_of_undecodable_bytes_are_recorded_escaped(family, tmp_path, capsys):
    """t108: a model and an output named with byte \\xff: 'unexpected UnicodeEncodeError' after the merge."""
    inputs, b, ms = family
    odd = Path(os.fsdecode(bytes(inputs / "bad") + b"\xff"))
    os.rename(ms[1], odd)
    out = Path(os.fsdecode(bytes(tmp_path / "o") + b"\xff"))
    before = snapshot(inputs)
    rc, err = _run(_merge(b, [ms[0], odd], out), capsys)
    assert rc == 0 and "Traceback" not in err and "unexpected" not in err, err
    assert snapshot(inputs) == before
    assert "bad\\xff" in (out / "README.md").read_text(encoding="utf-8")  # the card's text: \xNN (hp37b E06)
    assert json.loads((out / "tiesmerge.json").read_text())["inputs"]["models"][1]["label"].endswith("bad\udcff")


# ------------------------------------------------------------------ third pass: the adapter config's numbers


@pytest.mark.parametrize("config,needle", [
    ({"r": 0}, "r is 0, not a positive integer"),
    ({"r": -4}, "r is -4, not a positive integer"),
    ({"r": "2"}, "r is '2', not a positive integer"),
    ({"r": 4}, "r is 4 but the LoRA factors of"),
    ({"lora_alpha": 1e300}, "scale for 'model.layers.0.self_attn.q_proj' (lora_alpha 1e+300 / r 2) is 5e+299, out of "
                            "range"),
    # hp70a c21: "(lora_alpha 1e+300 / sqrt(r) 4)" of r = 4 read as sqrt(r) = 4
    ({"lora_alpha": 1e300, "use_rslora": True}, "(lora_alpha 1e+300 / sqrt(r 2)) is 7.07e+299")])
def test_an_adapter_config_whose_rank_or_scale_is_wrong_is_refused(tmp_path, capsys, monkeypatch, config, needle):
    """r=0 and r=-4 merged silently (the rank came from the tensors); lora_alpha 1e300 blamed a damaged
    checkpoint (n19)."""
    inputs = tmp_path / "inputs"
    module = "model.layers.0.self_attn.q_proj"
    base = make_base(0)
    b = write_hf_dir(inputs / "base", base)
    loras = [write_lora_dir(inputs / f"lora{k}", random_lora(base, 2, k, modules=(module,)), alpha=4.0)
             for k in range(2)]
    cfg = json.loads((loras[1] / "adapter_config.json").read_text())
    (loras[1] / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    rc, err = _run(_merge(b, loras, tmp_path / "out", "--method", "task_arithmetic"), capsys)
    check(rc, err, want_rc=1, needle=("lora1", needle), output=tmp_path / "out", inputs=inputs, before=before)


@pytest.mark.parametrize("layout", ["tokenizer.json", "added_tokens.json"])
def test_an_added_token_with_empty_content_is_refused(tmp_path, layout):
    """u07: --vocab-policy union accepted an added token whose content is ''."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.vocab import read_vocab

    folder = tmp_path / "m"
    folder.mkdir()
    if layout == "tokenizer.json":
        _tokenizer(folder, ["a", "b"])
        data = json.loads((folder / "tokenizer.json").read_text())
        (folder / "tokenizer.json").write_text(json.dumps({**data, "added_tokens": [{"id": 2, "content": ""}]}))
    else:
        (folder / "vocab.txt").write_text("a\nb\n")
        (folder / "added_tokens.json").write_text(json.dumps({"": 2}))
    with pytest.raises(CheckpointError, match=r"an added token \(id 2\) has empty content"):
        read_vocab(folder, "model 1")


# ------------------------------------------------------------------ third pass: a FIFO is named as one


def test_an_index_that_is_a_fifo_is_named_as_one(family, tmp_path, capsys):
    """h04: a FIFO model.safetensors.index.json gave 'no model weights found' (while listing the index)."""
    inputs, b, ms = family
    os.mkfifo(ms[1] / "model.safetensors.index.json")
    before = snapshot(inputs)
    rc, err = _run(_merge(b, ms, tmp_path / "out"), capsys)
    check(rc, err, want_rc=1, needle=("model.safetensors.index.json", "a FIFO (named pipe)", "not a regular file"),
          output=tmp_path / "out", inputs=inputs, before=before)


def test_a_cache_ref_that_is_a_fifo_is_named_as_one(family, tmp_path, capsys, monkeypatch):
    """t88g: refs/main a FIFO gave 'holds models--org--n but not this revision'."""
    inputs, b, ms = family
    repo = tmp_path / "hf" / "hub" / "models--org--n"
    (repo / "refs").mkdir(parents=True)
    (repo / "snapshots").mkdir()
    os.mkfifo(repo / "refs" / "main")
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    before = snapshot(inputs)
    rc, err = _run(["merge", "--base", str(b), "--model", str(ms[0]), "--model", "org/n", "-o", str(tmp_path / "out"),
                    "--no-progress"], capsys)
    check(rc, err, want_rc=1, needle=("refs/main", "a FIFO (named pipe)"), output=tmp_path / "out", inputs=inputs,
          before=before)
