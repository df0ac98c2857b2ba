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

from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import cli_flags, leftovers, make_base, make_family, write_hf_dir
from test_hostile_catalogue import _merge, _run, check, snapshot
from tiesmerge.errors import EvaluatorError
from tiesmerge.stats.files import Statistics, StatsManifest, save_stats


@pytest.fixture
def family(tmp_path, monkeypatch):
    """inputs/base, inputs/ft0, inputs/ft1 (HF dirs) and a working directory of the user's own (as the
    first catalogue's fixture)."""
    inputs = tmp_path / "inputs"
    base, fts = make_family(2)
    b = write_hf_dir(inputs / "base", base)
    ms = [write_hf_dir(inputs / f"ft{k}", ft) for k, ft in enumerate(fts)]
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("the user's own file")
    monkeypatch.chdir(work)
    return inputs, b, ms


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


def _fisher_stats(inputs: Path, base: Path, value: float) -> list[Path]:
    tensors = {n: torch.full(t.shape, value) for n, t in load_file(str(base / "model.safetensors")).items()
               if t.is_floating_point()}
    return [save_stats(inputs / f"stats{k}", Statistics(StatsManifest("fisher", 4), tensors)) for k in range(2)]


def test_a_huge_but_finite_fisher_statistic_is_no_crash(family, tmp_path, capsys):
    inputs, b, ms = family
    stats = _fisher_stats(inputs, b, 1e38)
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
    check(rc, err, want_rc=2, needle=("lora0", "the base is a PEFT lora adapter", "--base takes the full model"),
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


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1])
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
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    check(proc.returncode, err, want_rc=128 + signum, needle=f"terminated by {signal.Signals(signum).name}",
          output=out, inputs=inputs, before=before)


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
