"""Issue 13, the fifth independent hostile pass: one case per finding, checked as the catalogue checks its cases
(exit status, message, no traceback, nothing left, inputs unchanged).

- a model folder whose tokenizer_config.json maps AutoTokenizer to a .py file beside the weights: transformers
  asked "run the custom code? [y/N]" on the terminal and ran the file on "y". tiesmerge never runs a model's code.
- `tiesmerge stats` on a model whose tokenizer has no pad token (Llama, GPT) failed as "a bug in tiesmerge".
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import warnings

import pytest
import torch

import test_hostile_catalogue
from helpers_ckpt import cli_flags, run_cli
from test_hostile_catalogue import _merge, check, snapshot

family = test_hostile_catalogue.family
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _tiny_llama(folder, *, pad: bool = False):
    """A 2-layer Llama with a word-level tokenizer of 64 words t0..t63 (no pad token unless ``pad``)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0", **({"pad_token": "t0"} if pad else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _data(path, rows):
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path


def test_a_tokenizer_that_maps_to_code_in_the_model_folder_is_refused_without_running_it(tmp_path, capsys,
                                                                                         monkeypatch):
    inputs = tmp_path / "inputs"
    m = _tiny_llama(inputs / "m")
    config = json.loads((m / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]},
                  pad_token="t0")
    (m / "tokenizer_config.json").write_text(json.dumps(config))
    ran = tmp_path / "PWNED"
    (m / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('a stranger code ran')\n")
    data = _data(inputs / "d.jsonl", ["t1 t2 t3"] * 4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # whoever asks gets a yes: nobody may ask
    before = snapshot(inputs)
    rc, out, err = run_cli(["stats", "gram", "--model", str(m), "--data", str(data), "-o", str(tmp_path / "st")],
                           capsys)
    assert rc == 1, err
    assert "never runs a model's own code" in err and "auto_map" in err and "Traceback" not in err, err
    assert "custom code" not in out + err, out + err  # no prompt was printed
    assert not ran.exists()
    assert not (tmp_path / "st").exists()
    assert snapshot(inputs) == before


def test_stats_on_a_tokenizer_without_a_pad_token_runs_one_example_per_batch(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    inputs = tmp_path / "inputs"
    m = _tiny_llama(inputs / "m")
    padded = _tiny_llama(inputs / "padded", pad=True)  # the same weights, a pad token: batches of 8
    data = _data(inputs / "d.jsonl", ["t1 t2 t3", "t4 t5", "t6 t7 t8 t9 t10", "t11"] * 3)
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    for model, out in ((m, "st"), (padded, "st_padded")):
        rc, _, err = run_cli(["stats", "gram", "--model", str(model), "--data", str(data), "-o", str(tmp_path / out)],
                             capsys)
        assert rc == 0, err
    manifest = (tmp_path / "st" / "tiesmerge_stats.json").read_text()
    one, eight = (load_file(next((tmp_path / o).glob("*.safetensors"))) for o in ("st", "st_padded"))
    assert one.keys() == eight.keys() and one
    for name in one:  # padding is masked out: the same Gram matrices, batched or not
        torch.testing.assert_close(one[name], eight[name], rtol=1e-4, atol=1e-5)
    assert "no pad token" in manifest
    assert "no pad token" not in (tmp_path / "st_padded" / "tiesmerge_stats.json").read_text()
    assert snapshot(inputs) == before
    shutil.rmtree(tmp_path / "st")


# ------------------------------------------------------------------ a model named by a method option is an input


def _earlier_merge(b, ms, ref, capsys):
    rc, _, err = run_cli(_merge(b, ms, ref), capsys)
    assert rc == 0, err
    return ref


@pytest.mark.parametrize("command", ["analyze", "search"])
def test_a_reference_model_named_by_an_option_is_never_replaced(family, tmp_path, capsys, command):
    """Pass 5's an34: `analyze --method ties:sign_from=X -o X --force` deleted the model X the merge had just read
    (merge refused it; analyze and search --set did not know that the option names an input)."""
    inputs, b, ms = family
    ref = _earlier_merge(b, ms, tmp_path / "ref", capsys)
    before = snapshot(ref)
    (tmp_path / "my_eval_ref.py").write_text("def score(state):\n    return 0.5\n")
    sys.path.insert(0, str(tmp_path))
    try:
        argv = {"analyze": ["analyze", *cli_flags(b, ms), "--method", f"ties:sign_from={ref}", "--no-progress"],
                "search": ["search", *cli_flags(b, ms), "--evaluator", "my_eval_ref:score", "--grid", "lam=1",
                           "--set", f"sign_from={ref}", "--dir", str(tmp_path / "s")]}[command]
        rc, _, err = run_cli([*argv, "-o", str(ref), "--force"], capsys)
    finally:
        sys.path.remove(str(tmp_path))
    assert rc != 0 and "reference model (sign_from)" in err and "Traceback" not in err, err
    assert snapshot(ref) == before
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------ values no path or float32 can hold


def test_nul_bytes_and_empty_paths_in_recipes_are_named(family, tmp_path, capsys):
    inputs, b, ms = family
    cases = {"nul.yaml": (f'method: ties\nbase: {b}\nmodels: [{ms[0]}, "{ms[1]}\\0x"]\n', "NUL byte"),
             "mk.yaml": (f'merge_method: ties\nbase_model: {b}\nmodels:\n  - model: "{ms[0]}\\0"\n'
                         f'    parameters: {{density: 0.5, weight: 1}}\n  - model: {ms[1]}\n'
                         f'    parameters: {{density: 0.5, weight: 1}}\n', "NUL byte"),
             "empty_model.yaml": (f'method: ties\nbase: {b}\nmodels: ["", {ms[1]}]\n', "models[0] is empty"),
             "empty_slice_model.yaml": (f"merge_method: slerp\nbase_model: {b}\nslices:\n  - sources:\n"
                                        f"      - model: {b}\n        layer_range: [0, 1]\n      - model: ''\n"
                                        f"        layer_range: [0, 1]\nparameters: {{t: 0.5}}\n",
                                        "slices[0].sources[1].model is empty"),
             "empty.yaml": ("", "an empty file")}
    for name, (text, needle) in cases.items():
        (tmp_path / name).write_text(text)
        before = snapshot(inputs)
        for command in (["merge", str(tmp_path / name), "-o", str(tmp_path / "out"), "--no-progress"],
                        ["validate", str(tmp_path / name)]):
            rc, _, err = run_cli(command, capsys)
            check(rc, err, want_rc=2, needle=(needle, "hint:"), output=tmp_path / "out", inputs=inputs,
                  before=before)


def test_the_api_names_a_source_that_is_no_model(tmp_path):
    from tiesmerge import merge
    from tiesmerge.errors import CheckpointError, ConfigError

    dense = [{"w": torch.zeros(2, 2)}, {"w": torch.ones(2, 2)}]
    with pytest.raises(ConfigError, match="base is a NoneType"):
        merge(None, dense, "ties")
    with pytest.raises(ConfigError, match="NUL byte"):
        merge("a\0b", dense, "ties")
    from tiesmerge.tuning import tune

    with pytest.raises(ConfigError, match="models must be a non-empty list"):  # not 6 "models", one per letter
        tune(dense[0], "a/path", "ties", lambda state: 0.5)
    with pytest.raises(CheckpointError, match="sparse_coo layout"):
        merge({"w": torch.zeros(2, 2).to_sparse()}, dense, "ties")


@pytest.mark.parametrize("extra", [["--weights", "1e39", "1e39"], ["--lam", "1e39"],
                                   ["--weights", "1e308", "1e308", "--dtype", "float64"]])
def test_option_values_past_float32_are_refused_before_the_merge(family, tmp_path, capsys, extra):
    """Pass 5's f3: weights past float32's range were cast with a numpy RuntimeWarning, then failed as an overflow
    of the merged values; every merge computes in float32, so such a value is refused as an option."""
    inputs, b, ms = family
    before = snapshot(inputs)
    method = "task_arithmetic" if "--weights" in extra else "ties"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, _, err = run_cli(_merge(b, ms, tmp_path / "out", "--method", method, *extra), capsys)
    check(rc, err, want_rc=2, needle=("at most 3.4e38",), output=tmp_path / "out", inputs=inputs, before=before)
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


# ------------------------------------------------------------------ what reaches the terminal


def test_success_lines_escape_control_characters_and_newlines_of_names(family, tmp_path, capsys):
    inputs, b, ms = family
    out = tmp_path / "o\x1b[2J\x1b[31mRED\nerror: forged"
    rc, stdout, err = run_cli(_merge(b, ms, out), capsys)
    assert rc == 0, err
    assert "\x1b" not in stdout and "\\x1b[2J" in stdout, stdout
    assert not any(line.startswith("error:") for line in stdout.splitlines()), stdout


def test_an_evaluator_folder_never_shadows_an_installed_module(family, tmp_path, capsys, monkeypatch):
    """Pass 5's sh1: --evaluator MODULE:F put the working folder first on the import path, so a matplotlib.py
    lying there (a downloaded model repo is a typical working folder) ran when the search's report imported the
    real one. The folder now comes last: the evaluator is found, the installed module wins."""
    inputs, b, ms = family
    work = tmp_path / "w"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(work))])
    for name in ("matplotlib", "scipy"):
        (work / f"{name}.py").write_text(f"open({str(tmp_path / ('RAN_' + name))!r}, 'w').write('x')\n"
                                         "raise ImportError('a shadow')\n")
    (work / "my_eval_shadow.py").write_text("def score(state):\n    return 0.5\n")
    rc, _, err = run_cli(["search", *cli_flags(b, ms), "--evaluator", "my_eval_shadow:score", "--grid", "lam=1,2",
                          "--dir", str(tmp_path / "s")], capsys)
    assert rc == 0, err
    assert sys.path[-1] == str(work) and str(work) not in sys.path[:-1]
    assert not list(tmp_path.glob("RAN_*"))


@pytest.mark.parametrize("entry,needle", [({"_attn_implementation": "kernels-community/evil-attn"}, "never downloads"),
                                          ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantized")])
def test_configs_that_need_code_or_packages_beyond_the_folder_are_refused(tmp_path, capsys, entry, needle):
    """Pass 5's ka1/qc: an attention implementation named as a Hub repo (transformers would fetch and run a
    kernel), or a quantization_config, failed as "unexpected ImportError ... a bug in tiesmerge"."""
    inputs = tmp_path / "inputs"
    m = _tiny_llama(inputs / "m", pad=True)
    config = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**config, **entry}))
    data = _data(inputs / "d.jsonl", ["t1 t2 t3"] * 4)
    before = snapshot(inputs)
    rc, _, err = run_cli(["stats", "gram", "--model", str(m), "--data", str(data), "-o", str(tmp_path / "st")],
                         capsys)
    check(rc, err, want_rc=1, needle=(needle, "config.json", "hint:"), output=tmp_path / "st", inputs=inputs,
          before=before)


def test_a_recipes_origin_text_is_escaped(family, tmp_path, capsys):
    """Pass 5's orig1: a recipe's origin strings (semantics, warnings) were printed raw by validate and merge."""
    inputs, b, ms = family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[1]}]\n"
                      'origin: {format: x, semantics: "a\\x1b[2Jb\\nerror: forged",\n'
                      '         warnings: ["w\\x1b[31m\\nerror: w"]}\n')
    rc, out, err = run_cli(["validate", str(recipe)], capsys)
    text = out + err
    assert "\x1b" not in text and not any(line.startswith("error:") for line in text.splitlines()), text


def adapt_checkpoint_of_two_steps(tmp_path):
    """An adapt run of two steps with its checkpoint: (base, models, the run's arguments, the checkpoint's path, its
    tensors, its metadata), for a test to edit and resume."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    import tiesmerge
    from test_adapt import _data, _family, _forward

    base, fts = _family()
    kwargs = dict(forward=_forward(), granularity="layer", lr=0.05, batch_size=5, checkpoint_every=1)
    ck = tmp_path / "c.pt"
    tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=2, checkpoint=ck, **kwargs)
    with safe_open(str(ck), "pt") as f:
        meta = dict(f.metadata())
    return base, fts, kwargs, ck, load_file(ck), meta


@pytest.mark.parametrize("tamper,needle", [("lr", "adam_param_groups"), ("exp_avg_sq", "negative"),
                                           ("dtype", "int64, not float32")])
def test_a_tampered_adapt_checkpoint_is_refused_as_damaged(tmp_path, tamper, needle):
    """Pass 5's ck-lr / ck-adamneg / ck-dtype: an lr of 1e300 in the optimizer's settings failed as "a bug",
    negative second moments as a NaN entropy with the advice to lower --lr, and integer coefficients resumed
    silently from zeros (0.3 truncated)."""
    from safetensors.torch import save_file

    import tiesmerge
    from test_adapt import _data
    from tiesmerge.errors import ConfigError

    base, fts, kwargs, ck, tensors, meta = adapt_checkpoint_of_two_steps(tmp_path)
    if tamper == "lr":
        groups = json.loads(meta["adam_param_groups"])
        groups[0]["lr"] = 1e300
        meta["adam_param_groups"] = json.dumps(groups)
    elif tamper == "exp_avg_sq":
        tensors["adam.exp_avg_sq"] = -torch.ones_like(tensors["adam.exp_avg_sq"])
    else:
        tensors["coefficients"] = tensors["coefficients"].to(torch.int64)
    save_file(tensors, str(ck), metadata=meta)
    with pytest.raises(ConfigError, match=needle):
        tiesmerge.adapt(base, fts, _data(), "task_arithmetic", steps=4, checkpoint=ck, resume=True, **kwargs)


@pytest.mark.parametrize("extra,needle", [(["--strategy", "random", "--budget", "3", "--seed", "-1"], "seed -1"),
                                          (["--strategy", "cmaes", "--budget", "3", "--popsize", "1000000000"],
                                           "--popsize 1000000000")])
def test_search_seeds_and_generation_sizes_out_of_range_are_refused(family, tmp_path, capsys, extra, needle):
    """Pass 5's se10 / se2d: --seed -1 failed as "a bug"; --popsize 10**9 ran out of memory making proposals."""
    inputs, b, ms = family
    (tmp_path / "my_eval_se.py").write_text("def score(state):\n    return 0.5\n")
    sys.path.insert(0, str(tmp_path))
    try:
        rc, _, err = run_cli(["search", *cli_flags(b, ms), "--evaluator", "my_eval_se:score", "--axis", "lam",
                              "--axis", "density", *extra, "--dir", str(tmp_path / "s")], capsys)
    finally:
        sys.path.remove(str(tmp_path))
    assert rc == 2 and needle in err and "Traceback" not in err and "bug" not in err, err
    assert not (tmp_path / "s").exists()


def test_a_cmaes_search_writes_no_matplotlib_cache_under_home(family, tmp_path, capsys, monkeypatch):
    """Pass 5's se12: importing cma imported matplotlib, which wrote ~/.cache/matplotlib and ~/.config/matplotlib."""
    pytest.importorskip("cma")
    inputs, b, ms = family
    import subprocess  # a fresh process: matplotlib reads its folder when first imported

    home = tmp_path / "home"
    home.mkdir()
    (tmp_path / "my_eval_cma.py").write_text("def score(state):\n    return 0.5\n")
    env = {k: v for k, v in os.environ.items() if k not in ("MPLCONFIGDIR", "XDG_CACHE_HOME", "XDG_CONFIG_HOME")}
    env.update(HOME=str(home), PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    done = subprocess.run([sys.executable, "-m", "tiesmerge", "search", *map(str, cli_flags(b, ms)), "--evaluator",
                           "my_eval_cma:score", "--strategy", "cmaes", "--budget", "2", "--axis", "lam", "--axis",
                           "density", "--dir", str(tmp_path / "s")], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [p for p in home.rglob("*") if "matplotlib" in str(p)] == []


def test_a_statistics_manifest_linked_outside_its_folder_is_refused(family, tmp_path):
    """Pass 5's sl2: a --stats folder's tiesmerge_stats.json was read through a link that left the folder, and its
    contents went into the output's manifest."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.stats.files import Statistics, StatsManifest, load_stats, save_stats

    stats = Statistics(StatsManifest(kind="gram", model_digest="0" * 64, examples=1), {"w": torch.eye(2)})
    folder = save_stats(tmp_path / "st", stats)
    outside = tmp_path / "outside.json"
    outside.write_text((folder / "tiesmerge_stats.json").read_text())
    (folder / "tiesmerge_stats.json").unlink()
    (folder / "tiesmerge_stats.json").symlink_to(outside)
    with pytest.raises(CheckpointError, match="outside"):
        load_stats(folder)


@pytest.mark.parametrize("first,second", [("SIGINT", "SIGTERM"), ("SIGTERM", "SIGINT"), ("SIGHUP", "SIGTERM")])
def test_a_second_stop_signal_during_the_cleanup_is_let_through_quietly(first, second):
    """Pass 5's dbl3: Ctrl-C and then a scheduler's SIGTERM 50 ms later raised a second exception inside the
    first one's cleanup (a traceback printed, the second signal's exit status). The first signal stops the
    command; any later one while its cleanup runs does nothing."""
    import importlib
    import signal

    cli = importlib.import_module("tiesmerge.cli.main")

    # as a command started from a terminal has them: a suite launched in the background inherits INT and QUIT
    # ignored (nohup: HUP too), and tiesmerge leaves an ignored signal ignored
    normal = {signal.SIGINT: signal.default_int_handler, signal.SIGHUP: signal.SIG_DFL, signal.SIGTERM: signal.SIG_DFL}
    saved = {signum: signal.signal(signum, handler) for signum, handler in normal.items()}
    previous = cli._terminate_like_interrupt()
    try:
        with pytest.raises(KeyboardInterrupt) as stopped:
            os.kill(os.getpid(), getattr(signal, first))
            for _ in range(1000):  # the handler runs between bytecodes
                pass
        assert isinstance(stopped.value, cli.Terminated) == (first != "SIGINT")
        os.kill(os.getpid(), getattr(signal, second))  # during the cleanup: nothing raised
        for _ in range(1000):
            pass
    finally:
        for signum, handler in {**previous, **saved}.items():
            signal.signal(signum, handler)
        cli._watchdog.finish()  # as main() does at the command's end: its stop would end pytest 60 s later


@pytest.mark.parametrize("line,needle", [("[" * 100000 + "]" * 100000, "(not a scored candidate: JSON nested too deep"),
                                         ('{"index": 1, "key": "k", "options": {}, "score": "high"}', "finite score")])
def test_a_damaged_search_log_line_is_named_as_corrupt(tmp_path, line, needle):
    """Pass 5's lg3 / lg8: a log line nested 100,000 deep, or a score that is text, failed as "a bug"."""
    from tiesmerge.tuning.results_log import ResultsLog

    path = tmp_path / "log.jsonl"
    log = ResultsLog(path, {"method": "ties"})
    log.append({"index": 0, "key": "{}", "options": {}, "score": 0.5, "seconds": 0.1})  # a key: its options' JSON
    log.close()
    with open(path, "a") as f:
        f.write(line + "\n")
    with pytest.raises(Exception, match="corrupt") as raised:
        ResultsLog(path, {"method": "ties"}).get("{}")
    assert needle in str(raised.value) and type(raised.value).__name__ == "ConfigError"


def test_a_score_too_large_to_plot_is_refused_and_large_ones_print_short():
    """Pass 5's bg1: a finite score of 1e308 was printed with 309 digits, then the search report failed to plot it
    after all the scoring (and the best merge was never written). A score the report can plot (a perplexity of
    3e12, even 1e300) is kept: a bad candidate ranks low, it does not end the search."""
    from tiesmerge.errors import EvaluatorError
    from tiesmerge.tuning.evaluator import format_score, guard

    assert guard(lambda state: 0.75, "e", finite=True)({}) == 0.75
    assert guard(lambda state: -3e12, "e", finite=True)({}) == -3e12
    with pytest.raises(EvaluatorError, match="past the"):
        guard(lambda state: 1e308, "e", finite=True)({})
    assert format_score(0.64125) == "0.6412" and format_score(-3e12) == "-3e+12" and format_score(1e300) == "1e+300"


def test_a_search_keeps_and_reports_scores_up_to_the_plotting_limit(family, tmp_path, capsys):
    inputs, b, ms = family
    (tmp_path / "my_eval_big.py").write_text("import itertools\nC = itertools.count()\n"
                                             "def score(state):\n    return [0.5, 1e300, -1e300][next(C) % 3]\n")
    sys.path.insert(0, str(tmp_path))
    try:
        rc, out, err = run_cli(["search", *cli_flags(b, ms), "--evaluator", "my_eval_big:score", "--grid",
                                "lam=1,2,3", "--dir", str(tmp_path / "s")], capsys)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_eval_big", None)
    assert rc == 0 and "score 1e+300" in out and max(map(len, out.splitlines())) < 300, out + err
    assert (tmp_path / "s" / "report.html").is_file()


def test_search_takes_whole_number_options_and_tune_refuses_a_bad_count_up_front(family, tmp_path, capsys):
    """Pass 5's tg13/tg14: search turned consensus' k into 1.0 and refused it, so no consensus search could run;
    tg3: tune --grid k=1,99 scored the whole k=1 part before refusing k=99; tm-fisher: tune --method fisher
    advised --grid, which cannot help (tune takes no statistics)."""
    inputs, b, ms = family
    (tmp_path / "my_eval_k.py").write_text("CALLS = []\ndef score(state):\n    CALLS.append(1)\n    return 0.5\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import my_eval_k

        rc, out, err = run_cli(["search", *cli_flags(b, ms), "--method", "consensus", "--evaluator", "my_eval_k:score",
                                "--grid", "k=1,2", "--grid", "tall_lambda=0.4", "--grid", "lam=1",
                                "--dir", str(tmp_path / "s")], capsys)
        assert rc == 0 and "k=2" in out, err
        my_eval_k.CALLS.clear()
        rc, _, err = run_cli(["tune", *cli_flags(b, ms), "--method", "consensus", "--evaluator", "my_eval_k:score",
                              "--grid", "k=1,99"], capsys)
        assert rc == 2 and "k=99" in err and not my_eval_k.CALLS, err
        rc, _, err = run_cli(["search", *cli_flags(b, ms), "--method", "consensus", "--evaluator", "my_eval_k:score",
                              "--grid", "k=1,99", "--dir", str(tmp_path / "s2")], capsys)
        # refused before the first candidate, as tune does (it scored them all first: hp29 N11)
        assert rc == 2 and "k=99 counts tasks, but only 2 models are merged: drop it from --grid k" in err, err
        assert not my_eval_k.CALLS
        rc, _, err = run_cli(["tune", *cli_flags(b, ms), "--method", "fisher", "--evaluator", "my_eval_k:score"],
                             capsys)
        assert rc == 2 and "needs per-model statistics" in err and "--grid" not in err, err
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("my_eval_k", None)


def test_a_model_given_as_its_folder_and_as_its_weights_file_is_one_model(family, tmp_path, capsys):
    """Pass 5's dup4 / dup5: `--model a/model.safetensors --model a` merged a twice, and the base's own weights
    file as a model was merged as a zero task vector, silently."""
    inputs, b, ms = family
    before = snapshot(inputs)
    weights = next(ms[0].glob("*.safetensors"))
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(weights), "--model", str(ms[0]), "-o",
                          str(tmp_path / "o"), "--no-progress"], capsys)
    check(rc, err, want_rc=2, needle="listed twice", output=tmp_path / "o", inputs=inputs, before=before)
    rc, _, err = run_cli(["merge", "--base", str(b), "--model", str(next(b.glob("*.safetensors"))), "--model",
                          str(ms[0]), "-o", str(tmp_path / "o"), "--no-progress"], capsys)
    check(rc, err, want_rc=2, needle="is the base itself", output=tmp_path / "o", inputs=inputs, before=before)


def test_an_empty_text_is_named_by_its_line(tmp_path, capsys):
    """Pass 5's sv5 / sv9: a line {"text": ""} failed inside the model ("cannot reshape a tensor of 0 elements")."""
    inputs = tmp_path / "inputs"
    m = _tiny_llama(inputs / "m", pad=True)
    data = _data(inputs / "d.jsonl", ["t1 t2", "", "t3"])
    rc, _, err = run_cli(["stats", "gram", "--model", str(m), "--data", str(data), "-o", str(tmp_path / "st")],
                         capsys)
    assert rc == 2 and "d.jsonl:2: empty or missing 'text'" in err and "bug" not in err, err


def test_the_default_search_folder_inside_a_model_names_dir(family, tmp_path, capsys, monkeypatch):
    """Pass 5's k5: run from inside a model, the default ./tiesmerge-search was called "the output"."""
    inputs, b, ms = family
    monkeypatch.chdir(ms[0])
    rc, _, err = run_cli(["search", "--base", str(b), "--model", ".", "--model", str(ms[1]), "--evaluator",
                          "nowhere:score", "--grid", "lam=1"], capsys)
    assert rc == 1 and "--dir tiesmerge-search" in err and "pass --dir" in err, err


def test_a_path_with_backticks_stays_code_in_the_model_card(family, tmp_path, capsys):
    """Pass 5's x4: a model path holding backticks closed the card's code span: the rest was raw HTML."""
    import shutil

    inputs, b, ms = family
    odd = inputs / "x`<img src=x onerror=alert(3)>`y"
    shutil.copytree(ms[1], odd)
    rc, _, err = run_cli(_merge(b, [ms[0], odd], tmp_path / "o"), capsys)
    assert rc == 0, err
    card = (tmp_path / "o" / "README.md").read_text()
    line = next(x for x in card.splitlines() if "onerror" in x)
    assert line.startswith("- ``") and line.endswith("``"), line


def test_gram_statistics_of_a_causal_lm_are_named_as_its_tensors(tmp_path, capsys):
    """Pass 5's rg1: `stats gram` loaded a causal LM as its backbone (AutoModel), so the statistics were named
    `layers.0...` where the checkpoint says `model.layers.0...`, and merge --method regmean refused them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    m = _tiny_llama(tmp_path / "m", pad=True)
    data = _data(tmp_path / "d.jsonl", ["t1 t2 t3", "t4 t5"])
    rc, _, err = run_cli(["stats", "gram", "--model", str(m), "--data", str(data), "-o", str(tmp_path / "st")],
                         capsys)
    assert rc == 0, err
    names = set(load_file(next((tmp_path / "st").glob("*.safetensors"))))
    with safe_open(str(next(m.glob("*.safetensors"))), "pt") as f:
        weights = set(f.keys())
    assert names and names <= weights, sorted(names - weights)[:3]


def test_an_analysis_of_a_huge_but_finite_entry_stays_finite(tmp_path, capsys):
    """Pass 5's an25: a fine-tune holding one 1e38 entry (merge accepts it) made the squared mass Inf in float32:
    "nan% of its L2 mass", a numpy RuntimeWarning, and NaN literals in analysis.json (not JSON)."""
    from helpers_ckpt import write_hf_dir

    base = {"w": torch.zeros(8, 8)}
    huge = torch.randn(8, 8)
    huge[0, 0] = 1e38
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / "h", {"w": huge}), write_hf_dir(tmp_path / "a", {"w": torch.randn(8, 8)})]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc, out, err = run_cli(["analyze", *cli_flags(b, ms), "-o", str(tmp_path / "r"), "--no-progress"], capsys)
    assert rc == 0, err
    assert "nan" not in (out + err).lower(), out + err
    text = (tmp_path / "r" / "analysis.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in analysis.json"))
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_an_analysis_of_copies_of_the_base_says_so(family, tmp_path, capsys):
    """Pass 5's z1: analyzing copies of the base wrote sentences about task-vector mass and mask overlap that does
    not exist ("keeps 0.0% of each task vector's L1 mass", "Jaccard 0.000 against 0.000")."""
    import shutil

    inputs, b, ms = family
    copies = [inputs / "copy0", inputs / "copy1"]
    for c in copies:
        shutil.copytree(b, c)
    rc, out, err = run_cli(["analyze", "--base", str(b), "--model", str(copies[0]), "--model", str(copies[1]), "-o",
                            str(tmp_path / "r"), "--no-progress"], capsys)
    assert rc == 0, err
    assert "identical to the base" in out and "L1 mass" not in out and "Jaccard" not in out, out
    rc, out, err = run_cli(["analyze", "--base", str(b), "--model", str(copies[0]), "--model", str(ms[0]), "-o",
                            str(tmp_path / "r2"), "--no-progress"], capsys)
    assert rc == 0 and "Model(s) 0 are identical to the base" in out, out + err
