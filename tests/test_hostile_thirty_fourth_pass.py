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


@pytest.mark.parametrize("where", ["added", "vocab"])
def test_a_token_id_written_as_a_string_is_refused_where_json_holds_numbers(tmp_path, where):
    """hp34 D24: an added token's id written as the string "65" was accepted (-5 and 65.0 were refused as damaged),
    though tokenizers itself cannot load such a file ("expected u32"). Only added_tokens_decoder's keys, which JSON
    makes strings, may be the text of an id."""
    import json

    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.vocab import read_vocab

    vocab = {"[UNK]": 0, "a": 1, "b": "2" if where == "vocab" else 2}
    added = [{"id": "3" if where == "added" else 3, "content": "<x>", "special": True}]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab},
                                                         "added_tokens": added}))
    with pytest.raises(CheckpointError, match=r"token id '[23]' is not an integer .* \(a string, where the file holds"):
        read_vocab(tmp_path, "the base")
    if where == "added":  # the same id as a key of tokenizer_config.json's added_tokens_decoder is the norm
        added[0]["id"] = 3
        (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": vocab},
                                                             "added_tokens": added}))
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(
            {"added_tokens_decoder": {"3": {"content": "<x>", "special": True}}}))
        assert read_vocab(tmp_path, "the base").tokens[3] == "<x>"


def test_weights_of_other_shapes_than_the_config_describes_are_said_so_without_a_helpers_name(classifiers, tmp_path):
    """hp34 D35: a config whose sizes differ from the weights' (within the size check's slack) failed with
    "llx: _lm_loader cannot load the base (RuntimeError: You set `ignore_mismatched_sizes` to `False` … look at the
    above report!)": a helper's name, and a report tiesmerge keeps quiet."""
    from transformers import AutoModelForSequenceClassification

    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation.loading import from_pretrained

    def _chooses_its_class(directory, **kwargs):
        return AutoModelForSequenceClassification.from_pretrained(directory, **kwargs)

    model = _copy_with_config(classifiers[1], tmp_path / "wider", intermediate_size=48)  # weights: 32
    with pytest.raises(CheckpointError) as caught:
        from_pretrained(_chooses_its_class, model, "the base")
    message = str(caught.value)
    assert "the weights' shapes are not those of the model its config.json describes" in message
    assert "transformers cannot load the base" in message and "intermediate_size" in message
    assert "_chooses_its_class" not in message and "report" not in message


def test_a_name_too_long_for_the_file_system_gets_the_same_advice_for_every_output(tmp_path):
    """hp34 D28: tune --json and search --dir with a 256-byte name said "cannot check …" with the generic hint
    "`tiesmerge tune --help` lists the options", where -o says "use a shorter name"."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file, check_search_dir

    name = tmp_path / ("j" * 256)
    for check in (lambda: check_output_file(name, False, [], "--json"), lambda: check_search_dir(name)):
        with pytest.raises(OutputError) as caught:
            check()
        assert caught.value.hint == "use a shorter name (a file system allows 255 bytes per name)"


def _causal():
    pytest.importorskip("tokenizers")
    from test_evaluation_forward import _tiny_causal

    return _tiny_causal()  # a Llama of 64 positions and its word-level tokenizer


def test_a_choice_longer_than_the_models_positions_is_refused_and_a_long_prompt_loses_its_start():
    """hp34 D45: a 20,000-token answer choice with --max-length 16 on a 64-position Llama was neither cut nor
    checked: the forward asked for 12.8 GB, and the error blamed config.json. A choice is never cut (it would be
    another answer): one that leaves no room for a prompt token is refused, naming it; a long prompt loses its first
    tokens, in adapt's forward and in tune's choice-accuracy alike."""
    import torch

    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.forward import ChoiceLogits
    from tiesmerge.evaluation.rank_classification import ChoiceExample, score_choices

    model, tok = _causal()
    long_choice = " ".join(["yes"] * 64)
    fwd = ChoiceLogits(model, tok, choices={"qa": ("no", long_choice)}, max_length=16)
    with pytest.raises(ConfigError, match=r"answer choice 'yes yes .* is 64 tokens; .* passes the 16 tokens"):
        fwd.encode([{"text": "the cat"}], "qa")
    with pytest.raises(ConfigError, match="is 64 tokens; .* passes the 64 tokens"):
        score_choices(model, tok, [ChoiceExample("the cat", ("no", long_choice), 0)])
    prompt = " ".join(["the cat sat"] * 100)  # 300 tokens, past the 64 positions
    batch = ChoiceLogits(model, tok, choices={"qa": ("no", "yes")}, max_length=16).encode([{"text": prompt}], "qa")
    assert batch["input_ids"].shape[1] <= 16
    kept = score_choices(model, tok, [ChoiceExample(prompt, ("no", "maybe not"), 0)])
    cut = tok(prompt)["input_ids"][-(64 - 2):]  # the last tokens that fit beside the longer choice
    same = score_choices(model, tok, [ChoiceExample(tok.decode(cut), ("no", "maybe not"), 0)])
    assert torch.allclose(torch.tensor(kept[0][1]), torch.tensor(same[0][1]), atol=1e-4)


def test_more_answer_choices_than_rank_classification_takes_are_refused_before_the_work(tmp_path):
    """hp34 D44: 20,000 answer choices for one task took 64 s and 5.4 GB at --steps 2 (200,000: killed at 120 s);
    there was no bound, unlike --budget or the grids. At most MAX_CHOICES, refused in the choices file, in a row's own
    choices, and in the choice-accuracy evaluator's data."""
    import json

    from tiesmerge.adamerging.run import check_labels
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import ChoiceAccuracy
    from tiesmerge.evaluation.forward import ChoiceLogits
    from tiesmerge.evaluation.rank_classification import MAX_CHOICES

    many = [f"answer {i}" for i in range(MAX_CHOICES + 1)]
    with pytest.raises(ConfigError, match=f"holds {MAX_CHOICES + 1:,} answer choices"):
        check_labels({"qa": many}, "choices", "answer choices", {"qa": [{"text": "x"}]}, every_task=False)
    check_labels({"qa": many[:MAX_CHOICES]}, "choices", "answer choices", {"qa": [{"text": "x"}]}, every_task=False)
    model, tok = _causal()
    with pytest.raises(ConfigError, match=f"{MAX_CHOICES + 1:,} answer choices"):
        ChoiceLogits(model, tok).encode([{"text": "the cat", "choices": many}], "qa")
    data = tmp_path / "val.jsonl"
    data.write_text(json.dumps({"prompt": "the cat", "choices": many, "label": 0}) + "\n")
    with pytest.raises(ConfigError, match=f"val.jsonl:1: {MAX_CHOICES + 1:,} answer choices"):
        ChoiceAccuracy(tmp_path, data)


def test_a_forward_that_runs_out_of_memory_says_so_not_that_config_json_is_wrong():
    """hp34 D45's message: "can't allocate memory: you tried to allocate 12801280032 bytes" in the forward was
    blamed on config.json ("likely does not describe these weights")."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation.loading import forward_checked

    with pytest.raises(CheckpointError) as caught, forward_checked("base"):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 12801280032 bytes. Error code 12 (Cannot allocate memory)")
    assert "ran out of memory" in str(caught.value) and "--batch-size" in caught.value.hint
    assert "config.json" not in str(caught.value)


def test_adapt_with_the_encoder_forward_runs_on_a_checkpoint_with_a_pooler(bert_tokenizer, tmp_path):
    """hp34 D47: `adapt --forward encoder --heads` on a BertModel saved with its pooler (as sentence encoders are)
    warned that pooler.dense.* is not read, then failed at the first step with "unexpected KeyError:
    'pooler.dense.bias' … a bug". The pooler is merged at its initial coefficients; the rest is learned."""
    import json
    import warnings

    import torch
    import transformers

    import tiesmerge
    from tiesmerge.errors import MergeWarning

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(bert_tokenizer), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    base = transformers.BertModel(cfg)  # with its pooler
    dirs = []
    for k in range(3):
        model = transformers.BertModel(cfg)
        model.load_state_dict(base.state_dict())
        if k:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"m{k}")
        bert_tokenizer.save_pretrained(tmp_path / f"m{k}")
        dirs.append(tmp_path / f"m{k}")
    files = []
    for t, words in enumerate([["the cat sat", "a dog ran far"], ["red sun", "cold night rain"]]):
        files.append(tmp_path / f"task{t}.jsonl")
        files[-1].write_text("".join(json.dumps({"text": w}) + "\n" for w in words))
    heads = {"task0": ["cat", "dog"], "task1": ["sun", "rain"]}
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        result = tiesmerge.adapt(dirs[0], dirs[1:], files, forward="encoder", heads=heads, steps=2, batch_size=2,
                                 granularity="layer")
    assert any(isinstance(w.message, MergeWarning) and "pooler.dense" in str(w.message) for w in said)
    assert result.coefficients.shape[0] == 2 and torch.isfinite(result.coefficients).all()
    pooler = [i for i, name in enumerate(result.layers) if name.startswith("pooler.")]
    assert pooler and torch.all(result.coefficients[:, pooler] == 0.3)  # merged at --init, nothing adapts them
    assert not torch.all(result.coefficients == 0.3)  # the rest was learned


@pytest.mark.parametrize("raised", ["GeneratorExit()", "Stop('stop here')"])
def test_an_evaluator_raising_a_base_exception_is_named_without_a_traceback(tmp_path, capsys, monkeypatch,
                                                                              raised):
    """hp34 D51: an evaluator raising GeneratorExit printed a full traceback (rc 1); D52: one raising a BaseException
    of its own (pytest.skip's Skipped, say) was blamed on "a library tiesmerge called" and an input's tokenizer."""
    from helpers_ckpt import cli_flags, write_family_dirs

    work = tmp_path / "work"
    work.mkdir()
    module = f"odd_eval_{raised.partition('(')[0].lower()}"  # a module per case: an imported one stays imported
    (work / f"{module}.py").write_text("class Stop(BaseException):\n    pass\n\n\n"
                                      f"def score(state):\n    raise {raised}\n")
    monkeypatch.syspath_prepend(str(work))
    b, ms = write_family_dirs(tmp_path / "in")
    rc, _, err = run_cli(["tune", *cli_flags(b, ms), "--evaluator", f"{module}:score", "--grid", "lam=1.0",
                          "--grid", "density=0.5"], capsys)
    assert rc == 1 and "Traceback" not in err, err
    assert f"{module}:score" in err and f"raised {raised.partition('(')[0]}" in err
    assert "a library tiesmerge called" not in err


def _gram(rows):
    import torch

    x = torch.tensor(rows, dtype=torch.float64)
    return (x.T @ x / x.shape[0]).float()  # float32, as statistics files hold them


def test_exact_regmean_on_singular_gram_matrices_solves_what_the_data_determines_and_says_so():
    """hp34 D53: regmean --alpha 1 with Gram statistics of one example each (rank-deficient, every diagonal entry
    nonzero) exited 0 with linear weights 10x the models' (torch.linalg.solve on a singular matrix returns rounding
    noise). Now: least squares where the data determines the weight, the models' mean elsewhere, and a warning."""
    import torch

    from tiesmerge.errors import MergeWarning
    from tiesmerge.methods import RegMean
    from tiesmerge.methods.base import ChunkContext

    g = torch.Generator().manual_seed(0)
    d, rows = 8, 5
    x1, x2 = torch.randn(1, d, generator=g), torch.randn(2, d, generator=g)  # rank 3 of 8 together
    grams = torch.stack([_gram(x1.tolist()), _gram(x2.tolist())])  # (2, d, d)
    tau = 0.05 * torch.randn(2, rows, d, generator=g)
    with pytest.warns(MergeWarning, match="determines only 3 of its 8 input directions"):
        out = RegMean(alpha=1.0).merge(tau, ChunkContext(name="layer.weight", statistics=grams))
    assert out.abs().max() < 3 * tau.abs().max()  # no blow-up (it was 10x)
    # the float64 reference: of the weights that fit the data as well as any, the one closest to the models' mean,
    # measured in the inputs' scale (x = mean + D^-1/2 S^+ D^-1/2 (rhs - lhs mean), S = D^-1/2 lhs D^-1/2): invariant,
    # as RegMean is, to rescaling an input feature
    lhs = grams.double().sum(0)
    rhs = torch.einsum("tij,trj->ir", grams.double(), tau.double())  # (d, rows)
    mean = tau.double().mean(0).T  # (d, rows)
    inv_sqrt = torch.diagonal(lhs).rsqrt()
    scaled = lhs * inv_sqrt[:, None] * inv_sqrt[None, :]
    want = (mean + inv_sqrt[:, None] * (torch.linalg.pinv(scaled, hermitian=True, rtol=1e-5)
                                        @ (inv_sqrt[:, None] * (rhs - lhs @ mean)))).T
    assert torch.linalg.matrix_rank(torch.cat([x1, x2]).double()) == 3
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-4)


def test_regmean_on_well_conditioned_grams_is_still_the_plain_solve(recwarn):
    import torch

    from tiesmerge.methods import RegMean
    from tiesmerge.methods.base import ChunkContext

    g = torch.Generator().manual_seed(1)
    grams = torch.stack([_gram(torch.randn(40, 6, generator=g).tolist()) for _ in range(2)])
    tau = torch.randn(2, 4, 6, generator=g)
    for alpha in (1.0, 0.95):
        out = RegMean(alpha=alpha).merge(tau, ChunkContext(name="w", statistics=grams))
        from tiesmerge.methods.regmean import shrink_off_diagonal

        s = shrink_off_diagonal(grams.double(), alpha)
        want = torch.linalg.solve(s.sum(0), torch.einsum("tij,trj->ir", s, tau.double())).T.float()
        assert torch.equal(out, want)
    assert not recwarn.list


@pytest.mark.parametrize("address, said", [
    ("not a host", "--ray not a host: not an address Ray reads"),
    ("auto", "--ray auto: no Ray cluster runs on this machine for auto to find"),
])
def test_a_ray_address_that_names_no_cluster_is_a_usage_error(tmp_path, address, said):
    """hp34 D66: `search --ray 'not a host'` was "unexpected ValueError … a bug in tiesmerge"; D67: `--ray auto` with
    no cluster said a connection was accepted, where none was made. Run in a process of its own: Ray, once
    initialised in a process, is kept."""
    import subprocess
    import sys

    pytest.importorskip("ray")
    code = ("from tiesmerge.errors import ConfigError\nfrom tiesmerge.tuning import RayExecutor\n"
            f"try:\n    RayExecutor({address!r})\nexcept ConfigError as exc:\n    print(exc)\n")
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path), "TMPDIR": str(tmp_path)}  # no cluster of this machine's found
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert said in done.stdout, done.stdout + done.stderr[-2000:]


def test_stats_refuses_a_config_that_adds_modules_the_weights_lack(classifiers, tmp_path, capsys):
    """hp34 D62: a classifier's config.json with is_decoder + add_cross_attention made transformers add 10 randomly
    initialised cross-attention modules; stats wrote statistics for them (and for the others under a causal mask,
    9.7x off), and the mistake surfaced only at the merge."""
    _root, base, _fts, data = classifiers
    model = _copy_with_config(base, tmp_path / "decoder", is_decoder=True, add_cross_attention=True)
    rc, _, err = run_cli(["stats", "fisher", "--model", model, "--data", data, "-o", tmp_path / "st"], capsys)
    assert rc == 1 and "parameter(s) the weights do not hold" in err and "crossattention" in err, err
    assert not (tmp_path / "st").exists()


def test_a_sigterm_while_ray_starts_is_the_commands_stop(tmp_path):
    """hp34 D70: a SIGTERM 3-7 s into `search --ray`, while ray.init ran, ended it with status 15 and no message
    (Ray's own handler, a bare sys.exit(15)), leaving Ray's agents orphaned. The signal is held while Ray starts and
    handled after, as at any other moment: 128 + 15 and "terminated by SIGTERM"."""
    import glob
    import signal
    import tempfile
    import time

    from helpers_ckpt import ray_search_process, write_family_dirs

    pytest.importorskip("ray")
    b, ms = write_family_dirs(tmp_path / "in")
    work = tmp_path / "work"
    work.mkdir()
    (work / "plain_eval.py").write_text("def score(state):\n    return float(len(state))\n")
    proc = ray_search_process(b, ms, work, "plain_eval:score", 4, tmp_path / "s")
    pattern = os.path.join(tempfile.gettempdir(), f"tiesray-*-{proc.pid}-*")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None and not glob.glob(pattern):
        time.sleep(0.01)  # the folder is made just before ray.init
    assert proc.poll() is None and glob.glob(pattern), proc.communicate()[1][-2000:]
    time.sleep(0.3)  # inside ray.init
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + signal.SIGTERM and "terminated by SIGTERM" in err, (proc.returncode, err[-2000:])
    assert not glob.glob(pattern)


def test_an_evaluators_exit_value_or_object_is_shown_cut():
    """hp34 D69: `--evaluator sys:exit` printed the state dict it was given, whole (84 KB for the demo's model); a
    module's __dict__ as an evaluator, 7.5 KB."""
    import torch

    from tiesmerge.errors import EvaluatorError
    from tiesmerge.tuning.evaluator import guard

    def exits(state):
        raise SystemExit(state)

    state = {f"layer{i}.weight": torch.zeros(50, 50) for i in range(40)}
    with pytest.raises(EvaluatorError) as caught:
        guard(exits)(state)
    assert len(str(caught.value)) < 600 and "called sys.exit({'layer0.weight'" in str(caught.value)
    assert "dict," in str(caught.value) and "characters)" in str(caught.value)
    with pytest.raises(EvaluatorError) as caught:
        guard(dict(state))
    assert len(str(caught.value)) < 600 and "is not callable" in str(caught.value)


def test_two_searches_cannot_write_one_log_at_once(tmp_path):
    """hp34 D77: two searches started on the same new --dir both scored every candidate, and log.jsonl held each
    twice. The log is locked by the search writing it; a second is refused, and resumes once the first is done."""
    from tiesmerge.errors import OutputError
    from tiesmerge.tuning.results_log import ResultsLog

    header = {"space": "lam", "seed": 0}
    first = ResultsLog(tmp_path / "log.jsonl", header)
    key = '{"lam": 1.0}'  # a key is its options' JSON
    first.append({"key": key, "options": {"lam": 1.0}, "score": 0.5, "seconds": 0.1})
    with pytest.raises(OutputError, match="another search is writing this log now"):
        ResultsLog(tmp_path / "log.jsonl", header)
    second = ResultsLog(tmp_path / "other.jsonl", header)  # a new log of its own: not created until it scores
    second.append({"key": key, "options": {"lam": 1.0}, "score": 0.4, "seconds": 0.1})
    first.close()
    resumed = ResultsLog(tmp_path / "log.jsonl", header)
    assert [r["key"] for r in resumed] == [key]
    assert (tmp_path / "log.jsonl").read_text().count('"score": 0.5') == 1
    resumed.close()
    second.close()


@pytest.mark.parametrize("weights", [(0.7, 0.4), (0.7, -0.4), (0.3, 0.3, 0.3)])
@pytest.mark.parametrize("lam", [1.0, 0.8])
def test_mergekit_task_arithmetic_with_normalize_equals_its_float32_operations_bit_for_bit(tmp_path, weights, lam):
    """hp34 D85: task_arithmetic with normalize: true and weights 0.7/0.4 differed from mergekit 0.1.5 by a rounding
    (7.5e-9): the weights were divided by their sum before the sum of the task vectors, where mergekit divides the
    sum. mergekit's generalized task arithmetic: deltas * weights (float32), sum over the models, / weights.sum(),
    * lambda where it is not 1, + base."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from helpers_ckpt import write_hf_dir
    from tiesmerge.cli.main import main

    g = torch.Generator().manual_seed(5)
    base = torch.randn(33, 17, generator=g)
    tuned = [base + 0.01 * torch.randn(33, 17, generator=g) for _ in weights]
    write_hf_dir(tmp_path / "base", {"layer.weight": base})
    for k, value in enumerate(tuned):
        write_hf_dir(tmp_path / f"m{k}", {"layer.weight": value})
    recipe = {"merge_method": "task_arithmetic", "base_model": str(tmp_path / "base"), "dtype": "float32",
              "parameters": {"normalize": True, "lambda": lam},
              "models": [{"model": str(tmp_path / f"m{k}"), "parameters": {"weight": w}}
                         for k, w in enumerate(weights)]}
    (tmp_path / "mk.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["merge", str(tmp_path / "mk.yaml"), "-o", str(tmp_path / "out")]) == 0
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))["layer.weight"]
    deltas = torch.stack([t - base for t in tuned])  # (n, 33, 17)
    w = torch.tensor(weights, dtype=torch.float32).view(-1, 1, 1)
    mixed = (deltas * w).sum(dim=0) / w.sum(dim=0)
    if lam != 1:
        mixed = mixed * lam
    assert torch.equal(merged.view(torch.int32), (base + mixed).view(torch.int32))


def test_a_few_tensors_the_forwards_model_lacks_are_merged_at_init_with_a_warning():
    """hp34 D93: `adapt --forward classifier` on BERT fine-tunes that kept their MLM head from pretraining
    (cls.predictions.*, as many do) was refused ("2 merged tensor(s) are not weights of the forward's model"), while
    `merge` takes the same models and a pooler the forward never reads is merged at --init with a warning (D47)."""
    import torch

    from tiesmerge.adamerging.learn import check_forward_names
    from tiesmerge.errors import MergeWarning

    class Forward(torch.nn.Module):
        prefix = "model."

        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.dense = torch.nn.Linear(2, 2)
            self.model.classifier = torch.nn.Linear(2, 2)

    names = ["dense.weight", "dense.bias", "classifier.weight", "classifier.bias", "cls.predictions.bias"]
    with pytest.warns(MergeWarning, match=r"1 merged tensor\(s\) are not weights of the forward's model "
                                          r"\(cls.predictions.bias\)"):
        assert check_forward_names(Forward(), names) == {"cls.predictions.bias"}


@pytest.mark.parametrize("architecture, fits", [("BertForSequenceClassification", "--forward classifier"),
                                                ("LlamaForCausalLM", "--forward choice")])
def test_the_encoder_forward_on_a_classifier_or_lm_names_the_forward_that_fits(tmp_path, architecture, fits):
    """hp34 D82: `adapt --forward encoder` on a BertForSequenceClassification said "25 merged tensor(s) are not weights
    of the forward's model" with Python-API advice; now, before any model is built, which forward fits."""
    import json

    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.forward import load_forward

    (tmp_path / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "bert"}))
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nthe\n")
    with pytest.raises(ConfigError, match=f"the encoder forward takes a bare encoder.*{architecture}") as caught:
        load_forward("encoder", tmp_path, heads={"t": ["a", "b"]})
    assert fits in caught.value.hint


def test_more_local_ray_workers_than_cpus_is_said(tmp_path, monkeypatch):
    """hp34 D92: --workers 1000 on 2 CPUs was accepted silently; Ray was told of 1000 CPUs and ran every candidate of
    a batch in a process of its own at once (3.5 GB for 12 candidates of a 144 KB model)."""
    import sys
    import warnings

    from test_hostile_fourth_pass_adapt import _FakeRay
    from tiesmerge import scratch
    from tiesmerge.errors import MergeWarning
    from tiesmerge.tuning import executors
    from tiesmerge.tuning.executors import RayExecutor

    monkeypatch.setitem(sys.modules, "ray", _FakeRay())
    monkeypatch.setattr(executors, "_SOCKET_PATH_MAX", 1 << 20)
    monkeypatch.setattr(scratch, "_FOLDERS", [])
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    cores = os.cpu_count() or 1
    with pytest.warns(MergeWarning, match=f"workers {cores + 1} is more than this machine's {cores} CPUs"):
        RayExecutor(workers=cores + 1).close()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        RayExecutor(workers=cores).close()


def test_a_negative_workers_flag_is_named_as_the_flag(tmp_path, capsys, monkeypatch):
    from helpers_ckpt import cli_flags, write_family_dirs

    b, ms = write_family_dirs(tmp_path)
    (tmp_path / "zero_eval.py").write_text("def score(state):\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, _, err = run_cli(["search", *cli_flags(b, ms), "--evaluator", "zero_eval:score", "--ray",
                          "--workers", "-1", "--dir", tmp_path / "s"], capsys)
    assert rc == 2 and "--workers -1: the local cluster's workers must be at least 1" in err, err


@pytest.mark.parametrize("method", ["tsv_m", "iso_cts"])
def test_svd_methods_say_when_the_tasks_singular_vectors_are_dependent(method):
    """hp34 D97: TSV-M of tau and -tau changed the base by more than tau (their task vectors sum to 0), with no
    warning, and its float32 and float64 SVDs disagreed by more than the output: the polar factor of a rank-deficient
    concatenation is not unique (so in the reference code too). Said now, naming the tensor; independent tasks are
    not."""
    import warnings

    import torch

    import tiesmerge
    from tiesmerge.errors import MergeWarning

    g = torch.Generator().manual_seed(0)
    w, tau = torch.randn(32, 32, generator=g), 0.1 * torch.randn(32, 32, generator=g)
    with pytest.warns(MergeWarning, match=r"'w': the tasks' singular vectors are linearly dependent \(rank \d+ of"):
        tiesmerge.merge({"w": w}, [{"w": w + tau}, {"w": w - tau}], method)
    other = 0.1 * torch.randn(32, 32, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        tiesmerge.merge({"w": w}, [{"w": w + tau}, {"w": w + other}], method)


def test_a_second_stop_signal_while_ray_starts_is_handled_at_once():
    """Review of D70's fix: a stop signal during ray.init is held until Ray has started; were the start never to end
    (a cluster that accepts and never answers), Ctrl-C would do nothing. A second one of the same kind is handled at
    once."""
    import signal
    import time

    from tiesmerge.tuning.executors import _stop_signals_held

    before = signal.getsignal(signal.SIGINT)
    held: list[int] = []
    with pytest.raises(KeyboardInterrupt), _stop_signals_held(held):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs at the next bytecode: recorded, not raised
        assert held == [signal.SIGINT]
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    assert signal.getsignal(signal.SIGINT) is before
