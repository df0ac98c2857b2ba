"""Hostile passes 71 (its notes) and 72: what a careless user's inputs still got wrong."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("kind", ["exact", "empirical", "batched"])
@pytest.mark.parametrize("per_example", ["loop", "vmap"])
def test_a_float16_models_fisher_is_squared_in_float32(kind, per_example):
    """hp71b c36: the per-example gradients of a float16 model were squared in float16 before the float32 sum, so a
    gradient of 300 (a square of 9e4, past float16's 65504) made the statistic Inf, refused as "not finite in
    float32" with a hint that the weights were damaged. The float16 model's Fisher is now the float32 model's, up
    to float16's rounding of the forward pass."""
    from tiesmerge.stats.fisher import fisher_information

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.mul_(0.002)
    x = torch.full((2, 4), 600.0)  # gradients of about 600 * (1 - p): squares past float16's range

    def fisher(module, batch):
        return fisher_information(module, [batch], lambda m, b: m(b), kind=kind, per_example=per_example,
                                  targets=lambda b: torch.tensor([0, 1]))

    reference = fisher(model, x).tensors
    half = fisher(model.half(), x.half()).tensors
    assert reference["weight"].max() > 65504  # the case: squares float16 cannot hold
    for name in reference:
        assert half[name].dtype == torch.float32
        torch.testing.assert_close(half[name], reference[name], rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("argv", [
    ["tune", "--method", "ties", "--grid", "lam=1_0", "--base", "b", "--model", "m", "--evaluator", "e:f"],
    ["tune", "--method", "ties", "--grid", "lam=\u0663", "--base", "b", "--model", "m", "--evaluator", "e:f"],
    ["merge", "--base", "b", "--model", "m", "-o", "out", "--lam", "1_0"],
    ["analyze", "--base", "b", "--model", "m", "-o", "out", "--seed", "1_0"],
    ["search", "--method", "ties", "--range", "lam=0:1_0", "--base", "b", "--model", "m", "--evaluator", "e:f"],
])
def test_numbers_pythons_grammar_reads_but_no_one_means_are_refused(argv, capsys, tmp_path, monkeypatch):
    """hp71b c38: `--grid lam=1_0` (a typo of 1.0) swept lam = 10, and Arabic-Indic digits read as 3: Python's
    float() and int() grammar leaked into the command line. Such numbers are refused, naming the text."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    try:
        rc, _, err = run_cli(argv, capsys)
    except SystemExit as stop:  # argparse's own refusal of a flag's value
        rc, err = stop.code, capsys.readouterr().err
    assert rc != 0 and "is not a number as tiesmerge reads one" in err, err
    assert not (tmp_path / "out").exists()


def test_statistics_given_as_a_generator_are_counted_once(tmp_path):
    """hp71a c50: `stats=(s for s in [...])` was used up by the check of the output's inputs, then read as "0
    statistics given for 2 models"; a set of statistics (no order) is refused as a set of models is."""
    import tiesmerge
    from helpers_merge import fisher_stats
    from tiesmerge.errors import ConfigError

    base = {"w": torch.zeros(4)}
    models = [{"w": torch.tensor([1.0, 0.0, 2.0, 0.0])}, {"w": torch.tensor([0.0, 3.0, 2.0, 1.0])}]
    stats = [fisher_stats({"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}),
             fisher_stats({"w": torch.tensor([1.0, 3.0, 1.0, 1.0])})]
    expected = tiesmerge.merge(base, models, "fisher", stats=stats)
    out = tiesmerge.merge(base, models, "fisher", stats=(s for s in stats), output=tmp_path / "out")
    from safetensors.torch import load_file

    torch.testing.assert_close(load_file(out / "model.safetensors")["w"], expected["w"], rtol=0, atol=0)
    plan = tiesmerge.plan_merge(base, models, "fisher", stats=iter(stats))
    assert plan is not None
    with pytest.raises(ConfigError, match="stats must be a list or tuple, not a set"):
        tiesmerge.merge(base, models, "fisher", stats={"fs0", "fs1"})


def test_a_statistics_folder_given_as_the_model_of_stats_is_named(tmp_path, capsys):
    """hp71b c18: `stats fisher --model <a statistics folder>` was "the model holds no tokenizer ... copy the
    tokenizer files of the model's base into it", and following that "config.json: no such file"."""
    from helpers_ckpt import run_cli
    from tiesmerge.stats.files import Statistics, StatsManifest, save_stats

    folder = tmp_path / "fs"
    save_stats(folder, Statistics(StatsManifest("fisher", 1), {"w": torch.ones(2)}))
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": 0}\n')
    for kind in ("fisher", "gram"):
        rc, _, err = run_cli(["stats", kind, "--model", folder, "--data", data, "-o", tmp_path / f"o{kind}"], capsys)
        assert rc != 0 and "is a statistics folder" in err and "tokenizer" not in err, err


def test_adapt_says_when_no_coefficient_moved():
    """hp71b c40: classifiers whose softmax is saturated on every example gave gradients that were not exactly 0 (so
    the first step's warning stayed silent) but too small for Adam to move any coefficient: "mean entropy 0.0 ->
    0.0", every coefficient at --init, nothing said. A run that moved none says so; one that moved them does not."""
    import warnings

    import tiesmerge
    from test_adapt import _data, _family, _forward
    from tiesmerge.errors import MergeWarning

    base, fts = _family(2)
    saturated = [{k: v * 1e3 for k, v in ft.items()} for ft in fts]
    with pytest.warns(MergeWarning, match=r"no coefficient moved over the 3 steps.*saturated"):
        result = tiesmerge.adapt(base, saturated, _data(), forward=_forward(), steps=3, granularity="task")
    assert torch.all(result.coefficients == torch.tensor(0.3))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        moved = tiesmerge.adapt(base, fts, _data(), forward=_forward(), steps=3, granularity="task")
    assert not torch.all(moved.coefficients == torch.tensor(0.3))
    assert not [w for w in seen if "no coefficient moved" in str(w.message)]


def test_a_subnormal_lora_alpha_warns_as_zero_does(tmp_path):
    """hp71a c19: lora_alpha 1e-320 (scale 2.5e-321: 0 in float32) merged an adapter that changed nothing without the
    warning lora_alpha 0 gets."""
    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_family, write_hf_dir
    from tiesmerge.errors import MergeWarning

    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, 1), alpha=1e-320)
    with pytest.warns(MergeWarning, match=r"lora_alpha is 9.99989e-321, below float32's smallest normal number"):
        tiesmerge.merge(str(b), [str(lora)], "task_arithmetic", output=str(tmp_path / "out"))


def test_a_normalization_twin_beside_both_forms_is_said():
    """hp72a c10, c35: an input holding both the composed and the decomposed 'café.w' got the generic hint, its
    table calling a name that prints like one present "missing"; the twin is now found beside names both hold."""
    import unicodedata

    import tiesmerge
    from tiesmerge.errors import IncompatibleCheckpointsError

    nfc, nfd = unicodedata.normalize("NFC", "café.w"), unicodedata.normalize("NFD", "café.w")
    cases = [({nfc: torch.zeros(3), "x.w": torch.zeros(2)}, {nfc: torch.ones(3), nfd: torch.ones(3),
                                                              "x.w": torch.ones(2)}, "model 0 holds both"),
             ({nfc: torch.zeros(3), nfd: torch.zeros(3)}, {nfc: torch.ones(3), "o.w": torch.ones(2)},
              "the base holds both")]
    for base, model, who in cases:
        with pytest.raises(IncompatibleCheckpointsError) as caught:
            tiesmerge.merge(base, [model], "ties")
        hint = caught.value.hint
        assert "differ only in Unicode normalization" in hint and "(U+0301)" in hint and who in hint, hint


def test_the_card_of_an_in_memory_merge_offers_no_rerun_of_labels(tmp_path):
    """hp72a c37: state dicts merged from Python into a folder got a card saying "Re-run with `tiesmerge merge
    recipe.yaml`" over `base: base state dict` (and front matter base_model: base state dict); followed, it failed
    as "no such file" (or read a folder of that name). The card now says which inputs were in memory."""
    import tiesmerge
    from helpers_ckpt import make_family, write_hf_dir

    base, models = make_family(2)
    on_disk = write_hf_dir(tmp_path / "ft1", models[1])
    out = tiesmerge.merge(base, [models[0], str(on_disk)], "ties", output=tmp_path / "out")
    card = (out / "README.md").read_text()
    assert "inputs held in memory (base state dict, models[0] state dict)" in card, card
    assert "Re-run with" not in card and "base_model:" not in card.split("---")[1]
    paths = tiesmerge.merge(str(write_hf_dir(tmp_path / "base", base)),
                            [str(write_hf_dir(tmp_path / "ft0", models[0])), str(on_disk)], "ties",
                            output=tmp_path / "out2")
    card = (paths / "README.md").read_text()
    assert "Re-run with" in card and "base_model:" in card and "in memory" not in card


def test_fine_tunes_that_are_no_softmax_classifiers_are_refused(classifiers, tmp_path, capsys):
    """hp72b c03, c04, c52: fine-tunes trained multi-label (problem_type multi_label_classification) beside a base
    whose config says nothing were scored by tune's and search's classifier-accuracy and weighed by adapt as
    softmax classifiers; c37: a base saying problem_type regression (2 outputs) was read as a 2-class softmax by
    classifier-accuracy and stats fisher. Every model's config is read now, and regression is refused too."""
    import json
    import shutil

    import tiesmerge
    from helpers_ckpt import run_cli
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import builtin_evaluator
    from tiesmerge.stats.hf import hf_statistics

    _, base, fts, data = classifiers
    multi = tmp_path / "multi"
    shutil.copytree(fts[0], multi)
    config = json.loads((multi / "config.json").read_text())
    (multi / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    (tmp_path / "ev.py").write_text("def score(state):\n    return 1.0\n")
    for command in (["tune", "--grid", "lam=1"], ["search", "--grid", "lam=1", "--dir", str(tmp_path / "s")]):
        rc, _, err = run_cli([*command, "--method", "task_arithmetic", "--base", base, "--model", multi,
                              "--model", fts[1], "--evaluator", f"classifier-accuracy:{data}"], capsys)
        assert rc != 0 and "model 0 problem_type multi_label_classification" in err, err
    with pytest.raises(ConfigError, match="model 0 problem_type multi_label_classification: adapt's classifier"):
        tiesmerge.adapt(base, [multi, fts[1]], [data, data], tasks=["a", "b"], steps=1)
    regression = tmp_path / "regression"
    shutil.copytree(base, regression)
    (regression / "config.json").write_text(json.dumps({**config, "num_labels": 2, "problem_type": "regression"}))
    for call in (lambda: builtin_evaluator(f"classifier-accuracy:{data}", regression),
                 lambda: hf_statistics("fisher", regression, data)):
        with pytest.raises(ConfigError, match="problem_type regression: .* gives each output as a value"):
            call()


def test_tunes_json_with_a_trailing_slash_is_refused(tmp_path, capsys, monkeypatch):
    """hp72b c22: `tune --json tjd/` (a folder's spelling) wrote the file tjd: argparse's Path dropped the slash before
    the output-file check that refuses it (as adapt --checkpoint's does)."""
    from helpers_ckpt import make_family, run_cli, write_hf_dir

    base, models = make_family(2)
    for name, state in zip(("base", "a", "b"), (base, *models)):
        write_hf_dir(tmp_path / name, state)
    (tmp_path / "evt.py").write_text("def score(state):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, _, err = run_cli(["tune", "--base", "base", "--model", "a", "--model", "b", "--method", "task_arithmetic",
                          "--grid", "lam=1", "--evaluator", "evt:score", "--json", "tjd/"], capsys)
    assert rc != 0 and "ends with '/', which names a folder" in err, err
    assert not (tmp_path / "tjd").exists()


def test_stats_options_refused_together_and_a_data_folder_named(tmp_path, capsys, monkeypatch):
    """hp72b c39: stats gram with --fisher and --per-example hinted "leave --fisher out", then refused the next run
    for --per-example; c14: `--data .` was "the output lies inside the data file (.)", a folder called a file, with
    advice to move the output."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "m").mkdir()
    (tmp_path / "d.jsonl").write_text('{"text": "a", "label": 0}\n')
    rc, _, err = run_cli(["stats", "gram", "--model", "m", "--data", "d.jsonl", "-o", "s", "--fisher", "batched",
                          "--per-example", "vmap"], capsys)
    assert rc != 0 and "leave --fisher and --per-example out" in err, err
    rc, _, err = run_cli(["stats", "fisher", "--model", "m", "--data", ".", "-o", "s1"], capsys)
    assert rc != 0 and "--data .: is a directory" in err and "lies inside" not in err, err


def test_another_runs_method_is_named_as_flags():
    """hp72b c41: adapt's "another run" named the method as 'ties:density=0.5' (no command takes that) beside 'ties'
    (which hid that its density is the default); both are the flags that give them now."""
    from tiesmerge.adamerging.learn import _method_flags

    assert _method_flags("ties:density=0.5") == "`--method ties --density 0.5`"
    assert _method_flags("ties") == "`--method ties` (its defaults)"
    assert _method_flags("ties:densities=[0.1, 0.2],lam=2.0") == "`--method ties --densities 0.1 0.2 --lam 2.0`"
    assert _method_flags("dare_ties:rescale=false") == "`--method dare_ties --no-rescale`"


def test_base_weight_is_checked_on_the_running_float32_sum():
    """hp72a c07: average with base_weight 2e38 and weights -1e38, -1e38 was refused as "must sum to at most 3.4e38
    in magnitude": their sum is 0 (never past float32 on the way), which is what is wrong with them; 2e38, -1e38,
    -0.5e38 (a sum of 5e37) merges."""
    import tiesmerge
    from tiesmerge.errors import ConfigError

    base = {"w": torch.zeros(2)}
    models = [{"w": torch.ones(2)}, {"w": torch.full((2,), 2.0)}]
    with pytest.raises(ConfigError, match="sum to 0"):
        tiesmerge.merge(base, models, "average", base_weight=2e38, weights=[-1e38, -1e38])
    merged = tiesmerge.merge(base, models, "average", base_weight=2e38, weights=[-1e38, -0.5e38])
    assert torch.isfinite(merged["w"]).all()
    with pytest.raises(ConfigError, match=r"add up, in this order, to 6e\+38 after 2 of them"):
        tiesmerge.merge(base, models, "average", base_weight=3e38, weights=[3e38, 1.0])


@pytest.mark.parametrize("make", ["fifo", "folder", "loop", "crowded"])
def test_a_kernel_cache_entry_that_is_no_file_is_refused(tmp_path, make):
    """hp72b c08: a FIFO at a kernel's place in numba's cache (NUMBA_CACHE_DIR) hung the run (numba opened it and
    waited); c07: a folder there failed numba's write naming its temporary file, gone by then; hp74b c12: a link
    loop failed as a bare "Too many levels of symbolic links"; c13: 20,100 files beside numba's engine_<hash>
    folder hid a FIFO there from a scan capped at 20,000 entries. Each is refused before numba reads its cache."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "nc" / "engine_0123abcd"  # numba's folder for the engine's sources: their folder's name
    cache.mkdir(parents=True)
    entry = cache / "kernels._ties_kernel-312.py311.1.nbc"
    if make == "loop":
        entry.symlink_to(entry.name)
    elif make == "folder":
        entry.mkdir()
    else:
        os.mkfifo(entry)
    if make == "crowded":
        for k in range(20_100):
            (tmp_path / "nc" / f"a{k:05d}").touch()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "nc")}
    done = subprocess.run([sys.executable, "-c", "import tiesmerge.engine.kernels"], env=env, capture_output=True,
                          text=True, timeout=120)
    what = {"fifo": "a FIFO", "crowded": "a FIFO", "folder": "a folder", "loop": "a link loop"}[make]
    assert done.returncode != 0 and f"{entry}: is {what}" in done.stderr, done.stderr


@pytest.mark.parametrize("convert", ["tolist", "numpy"])
def test_a_logits_fn_leaving_torch_under_vmap_is_told_to_loop(convert):
    """hp72b c45: under the default per_example="vmap", a logits_fn returning .tolist() or .numpy() of its logits
    raised torch's own RuntimeError ("Cannot access data pointer of Tensor that doesn't have storage"), where
    .item() is said as a model that cannot run under vmap, with the loop as the way out."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats.fisher import fisher_information

    def logits_fn(module, batch):
        out = module(batch)
        return torch.tensor(getattr(out, convert)())

    with pytest.raises(ConfigError, match="cannot run under torch.func.vmap") as caught:
        fisher_information(torch.nn.Linear(4, 3), [torch.randn(2, 4)], logits_fn)
    assert "per_example='loop'" in caught.value.hint


def test_a_config_of_other_classes_than_the_head_is_named(tmp_path):
    """hp72b c26: config.json's id2label of 3 classes over a 2-row classifier was "the weights' shapes are not those
    of the model its config.json describes", hinting hidden_size and the like: neither the tensor nor num_labels."""
    import json

    import transformers

    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation.loading import from_pretrained

    cfg = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config.update(id2label={"0": "a", "1": "b", "2": "c"}, label2id={"a": 0, "b": 1, "c": 2})
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"classifier.weight is \[2, 16\] in the weights, \[3, 16\]") as caught:
        from_pretrained(transformers.AutoModelForSequenceClassification, tmp_path / "m")
    assert "num_labels" in caught.value.hint and "2 rows" in caught.value.hint


def test_encoder_accuracy_on_a_classifier_says_its_head_is_unused(classifiers, tmp_path):
    """hp72b c28: encoder-accuracy over classifiers scored their encoders with heads made from class descriptions,
    the merged classification head ignored without a word (0.5 where classifier-accuracy would score the head)."""
    import json

    from tiesmerge.errors import MergeWarning
    from tiesmerge.evaluation.builtin import builtin_evaluator

    _, base, _, _ = classifiers
    data = tmp_path / "enc.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in [
        {"task": "t", "classes": ["good", "bad"]}, {"task": "t", "text": "good", "label": 0},
        {"task": "t", "text": "bad", "label": 1}]) + "\n")
    with pytest.warns(MergeWarning, match="the base is a classifier .* the merged classification head is not used"):
        builtin_evaluator(f"encoder-accuracy:{data}", base)


def test_an_exact_number_a_float_reads_as_zero_is_refused():
    """hp73a c57, c04: weights=[Fraction(1, 10**400), 1] dropped the first model without a word (the float of it is
    0), where the command line and recipes refuse 1e-400 as too small for a float; a density so was refused as "got
    0.0", a value never given, after a warning printing 400 digits."""
    from decimal import Decimal
    from fractions import Fraction

    import tiesmerge
    from tiesmerge.errors import ConfigError

    base = {"w": torch.zeros(3)}
    models = [{"w": torch.ones(3)}, {"w": torch.full((3,), 2.0)}]
    for options, shown in (({"weights": [Fraction(1, 10 ** 400), 1]}, r"weights\[0\] = a Fraction of about 1e-400"),
                           ({"lam": Fraction(1, 10 ** 400)}, "lam = a Fraction of about 1e-400"),
                           ({"density": Fraction(1, 10 ** 400)}, "density = a Fraction of about 1e-400"),
                           ({"weights": [Decimal("1e-400"), 1]}, r"weights\[0\] = Decimal\('1E-400'\)")):
        with pytest.raises(ConfigError, match=shown + " is too small for a float: it reads as 0"):
            tiesmerge.merge(base, models, "ties", **options)
    merged = tiesmerge.merge(base, models, "ties", weights=[Fraction(0), 1])  # an exact 0 is 0
    assert torch.isfinite(merged["w"]).all()


@pytest.mark.parametrize("options, cause", [
    ({"lr": 1e-12}, r"--lr 1e-12 is below float32's spacing at the coefficients"),
    ({"clamp": (0.3, 0.300000001)}, r"--clamp 0.3 0.3 is one value in float32"),
])
def test_coefficients_that_never_moved_are_said_with_their_cause(options, cause):
    """hp73b c12, c23: an --lr below float32's spacing at 0.3, or --clamp bounds that are one float32 value, left
    every coefficient at --init and were said as "the gradients too small", with hints (the logits, --init) that
    cannot help."""
    import tiesmerge
    from test_adapt import _data, _family, _forward
    from tiesmerge.errors import MergeWarning

    base, fts = _family(2)
    with pytest.warns(MergeWarning, match=r"no coefficient moved over the 2 steps.*" + cause):
        tiesmerge.adapt(base, fts, _data(), forward=_forward(), steps=2, granularity="task", **options)


def test_multi_label_fine_tunes_are_refused_through_the_api_and_as_files(classifiers, tmp_path, capsys):
    """hp73b c05, c06: builtin_evaluator("classifier-accuracy:...") handed to tiesmerge.tune or run_search scored
    multi-label fine-tunes silently (only the command line read their configs); c18, c29: a fine-tune given as its
    weights file (m/model.safetensors) was not looked at."""
    import json
    import shutil

    import tiesmerge
    from helpers_ckpt import run_cli
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import builtin_evaluator
    from tiesmerge.tuning.driver import run_search

    _, base, fts, data = classifiers
    multi = tmp_path / "multi"
    shutil.copytree(fts[0], multi)
    config = json.loads((multi / "config.json").read_text())
    (multi / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    score = builtin_evaluator(f"classifier-accuracy:{data}", base)
    with pytest.raises(ConfigError, match="model 0 problem_type multi_label_classification"):
        tiesmerge.tune(base, [multi, fts[1]], "task_arithmetic", score, grid={"lam": [1.0]})
    with pytest.raises(ConfigError, match="model 0 problem_type multi_label_classification"):
        run_search(base, [multi, fts[1]], "task_arithmetic", score, grid={"lam": [1.0]}, log=str(tmp_path / "s.jsonl"))
    rc, _, err = run_cli(["tune", "--method", "task_arithmetic", "--grid", "lam=1", "--base", base, "--model",
                          multi / "model.safetensors", "--model", fts[1], "--evaluator",
                          f"classifier-accuracy:{data}"], capsys)
    assert rc != 0 and "model 0 problem_type multi_label_classification" in err, err
    with pytest.raises(ConfigError, match="model 0 problem_type multi_label_classification: adapt's classifier"):
        tiesmerge.adapt(base, [multi / "model.safetensors", fts[1]], [data, data], tasks=["a", "b"], steps=1)


def test_an_integer_grid_range_is_counted_in_integers():
    """hp73b c41: `--grid seed=1000000000000:1000000000003:1` was parsed as floats and refused as "a step this fine
    repeats points at 12 significant digits", where the same seeds listed with commas were taken."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.search import parse_grid

    assert parse_grid("dare_ties", ["seed=1000000000000:1000000000003:1"])["seed"] == tuple(
        range(10 ** 12, 10 ** 12 + 4))
    assert parse_grid("dare_ties", ["seed=7:1:-2"])["seed"] == (7, 5, 3, 1)
    assert parse_grid("dare_ties", ["seed=9007199254740993:9007199254740994:1"])["seed"] == (2 ** 53 + 1, 2 ** 53 + 2)
    with pytest.raises(ConfigError, match="more than the 100,000 a grid axis may hold"):
        parse_grid("dare_ties", ["seed=0:10000000:1"])
    with pytest.raises(ConfigError, match="the step leads away from stop"):
        parse_grid("dare_ties", ["seed=5:1:1"])


def test_names_apart_only_in_unicode_normalization_are_said_in_paths_and_indexes(tmp_path):
    """hp73a c76: a folder stored with a decomposed é (as macOS writes names), typed with the composed one, was "no
    such file or directory ... check the path"; c02: an index naming 'café.w' in one form over a shard holding it in
    the other was "the download is incomplete ... fetch the shards again"."""
    import json
    import unicodedata

    from helpers_ckpt import write_hf_dir
    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.checkpoint import open_checkpoint
    from tiesmerge.paths import resolve

    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    (tmp_path / nfd).mkdir()
    with pytest.raises(CheckpointError) as caught:
        resolve(tmp_path / nfc / "model.safetensors", "the model")
    assert "differs from the" in caught.value.hint and "U+0301 there, U+00E9 typed" in caught.value.hint
    model = write_hf_dir(tmp_path / "sharded", {f"{nfc}.w": torch.ones(4), "x.w": torch.ones(4)}, shards=2)
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"] = {(f"{nfd}.w" if k == f"{nfc}.w" else k): v for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(model)
    assert "differ only in Unicode normalization" in caught.value.hint and "(U+0301)" in caught.value.hint


def test_a_float16_adapter_whose_factors_underflow_is_refused(tmp_path):
    """hp73a c15: a merged LoRA written in float16 whose factors underflow (lora_alpha 1e-30) was written with every
    factor 0 (an adapter that changes nothing), exit 0, with a warning to pass a larger --rank, which gave the same
    zeros. It is refused, naming the module and the dtype."""
    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_family, write_hf_dir
    from tiesmerge.errors import InvalidTensorError

    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, 1), alpha=1e-30)
    with pytest.raises(InvalidTensorError, match="underflows float16: its LoRA factors round to 0") as caught:
        tiesmerge.merge(str(b), [str(lora)], "task_arithmetic", output=str(tmp_path / "out"), output_format="adapter",
                        dtype="float16")
    assert "float32" in caught.value.hint
    assert not (tmp_path / "out").exists()


def test_an_ia3_adapter_rounding_to_ones_is_refused(tmp_path):
    """hp73a c61: an (IA)³ merge written in float16 or bfloat16 whose vectors differ from 1 by 1e-4 was written as
    vectors of exactly 1 (an adapter that changes nothing), exit 0, no word."""
    import tiesmerge
    from helpers_adapters import random_ia3, write_ia3_dir
    from helpers_ckpt import make_family, write_hf_dir
    from tiesmerge.errors import InvalidTensorError

    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    close = {m: 1 + (v - 1) * 5e-4 for m, v in random_ia3(base, 1).items()}  # within 1e-3 of 1
    adapter = write_ia3_dir(tmp_path / "ia3", close)
    for dtype in ("float16", "bfloat16"):
        with pytest.raises(InvalidTensorError, match=f"below {dtype}'s spacing at 1: every one rounds to exactly 1"):
            tiesmerge.merge(str(b), [str(adapter)], "task_arithmetic", lam=1.0, output=str(tmp_path / dtype),
                            output_format="adapter", dtype=dtype)
    written = tiesmerge.merge(str(b), [str(adapter)], "task_arithmetic", lam=1.0, output=str(tmp_path / "f32"),
                              output_format="adapter", dtype="float32")
    assert (written / "adapter_model.safetensors").is_file()


def test_an_adapter_merged_on_an_in_memory_base_names_no_base(tmp_path):
    """hp73a c69: a merged adapter of a base given as a state dict named it "base state dict" in its
    base_model_name_or_path, which AutoPeftModel would try to load as a hub id; a base folder is named as typed."""
    import json

    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_family, write_hf_dir

    base, _ = make_family(1, with_int=False)
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, 1), alpha=8,
                          config={"base_model_name_or_path": "org/another-base"})
    out = tiesmerge.merge(base, [str(lora)], "task_arithmetic", output=str(tmp_path / "out"), output_format="adapter")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    folder = str(write_hf_dir(tmp_path / "base", base))
    out = tiesmerge.merge(folder, [str(lora)], "task_arithmetic", output=str(tmp_path / "out2"),
                          output_format="adapter")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == folder


def test_a_size_with_an_underscore_is_refused():
    """hp73b c03: --memory-budget 1_0MiB was read as 10 MiB (Python's digit grouping), where every other number flag
    refuses '_' as a typo; non-ASCII digits too."""
    from tiesmerge.sizes import parse_size

    for text in ("1_0MiB", "1_000", "\u0663MiB", "1e1_0KB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(text)
    assert parse_size("10MiB") == 10 << 20 and parse_size(".5KiB") == 512 and parse_size("1e3KB") == 10 ** 6


def test_float16_factors_below_its_normal_range_are_said_as_rounding(tmp_path):
    """hp74a c11, c12, c59: factors in float16's subnormals lost a third of a module, said as "pass a larger --rank
    (at most 8)", which gave the same at rank 8; the dtype's rounding is said as the cause now."""
    import warnings

    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_family, write_hf_dir

    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    loras = [write_lora_dir(tmp_path / f"l{k}", {m: (a * 1e-7 / a.abs().max(), f * 1e-7 / f.abs().max())
                                                 for m, (a, f) in random_lora(base, 2, k).items()}, alpha=2)
             for k in range(2)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tiesmerge.merge(str(b), [str(p) for p in loras], "task_arithmetic", output=str(tmp_path / "out"),
                        output_format="adapter", dtype="float16", rank=8)
    said = [str(w.message) for w in seen]
    assert any("of float16's rounding" in m and "--dtype float32" in m for m in said), said
    assert not any("pass a larger --rank" in m for m in said), said


@pytest.mark.parametrize("method", ["linear", "nuslerp"])
def test_a_baseless_recipe_listing_one_weights_file_twice_says_so(tmp_path, capsys, method):
    """hp74a c18, c41: a base-less mergekit recipe listing a folder and its own model.safetensors, or a folder and a
    hard-linked copy of it, was refused as "model 0 is the base itself" / "list only the fine-tuned models after the
    base", in a recipe that has no base."""
    import os

    from helpers_ckpt import make_family, run_cli, write_hf_dir

    base, models = make_family(1)
    a = write_hf_dir(tmp_path / "a", models[0])
    copy = tmp_path / "hl"
    copy.mkdir()
    for f in a.iterdir():
        os.link(f, copy / f.name)
    for second in (a / "model.safetensors", copy):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"merge_method: {method}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.5}}\n"
                          f"  - model: {second}\n    parameters: {{weight: 0.5}}\n")
        rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o"], capsys)
        assert rc == 2 and "are one model (one weights file under two names" in err, err
        assert "is the base itself" not in err, err


def test_other_lookups_say_names_apart_only_in_normalization(tmp_path):
    """hp74a c05, c30, c56, c62, c63: an index's shard file, an adapter's module, a statistics folder, a statistic's
    key and a --sign-from reference's tensor named in the other Unicode normalization were each blamed on another
    cause (an incomplete download, another base, another model), in names printed alike."""
    import json
    import unicodedata

    import tiesmerge
    from helpers_adapters import write_lora_dir
    from helpers_ckpt import write_hf_dir
    from helpers_merge import fisher_stats
    from tiesmerge.errors import CheckpointError, IncompatibleCheckpointsError

    nfc, nfd = unicodedata.normalize("NFC", "é"), unicodedata.normalize("NFD", "é")
    base = {f"w{nfc}.weight": torch.zeros(4, 4), "x.weight": torch.zeros(4, 4)}
    models = [{k: v + k2 for k, v in base.items()} for k2 in (1.0, 2.0)]
    # a statistic keyed in the other form
    with pytest.raises(IncompatibleCheckpointsError) as caught:
        tiesmerge.merge(base, models, "fisher", stats=[fisher_stats({f"w{nfd}.weight": torch.ones(4, 4)}),
                                                       fisher_stats({f"w{nfc}.weight": torch.ones(4, 4)})])
    assert "differ only in Unicode normalization" in caught.value.hint
    # a --sign-from reference whose tensors are named in the other form
    folders = [write_hf_dir(tmp_path / f"m{k}", state) for k, state in enumerate([base, *models])]
    ref = write_hf_dir(tmp_path / "ref", {k.replace(nfc, nfd): v for k, v in models[0].items()})
    with pytest.raises(IncompatibleCheckpointsError) as caught:
        tiesmerge.merge(str(folders[0]), [str(f) for f in folders[1:]], "ties", sign_from=str(ref))
    assert "differ only in Unicode normalization" in caught.value.hint
    # an adapter's module in the other form
    lora = write_lora_dir(tmp_path / "lora", {f"w{nfd}": (torch.ones(2, 4), torch.ones(4, 2))}, alpha=2)
    with pytest.raises(IncompatibleCheckpointsError, match="differ only in Unicode normalization"):
        tiesmerge.merge(str(folders[0]), [str(lora), str(folders[1])], "ties")
    # a statistics folder stored in the other form, typed in this one
    (tmp_path / f"st{nfd}").mkdir()
    with pytest.raises(CheckpointError) as caught:
        tiesmerge.load_stats(tmp_path / f"st{nfc}")
    assert "differs from the" in caught.value.hint
    # an index naming a shard in the other form
    sharded = write_hf_dir(tmp_path / "sh", base, shards=2)
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    first = sorted(set(data["weight_map"].values()))[0]
    (sharded / first).rename(sharded / first.replace("model", f"mod{nfc}l"))
    data["weight_map"] = {k: v.replace("model", f"mod{nfd}l") if v == first else v
                          for k, v in data["weight_map"].items()}
    index.write_text(json.dumps(data))
    with pytest.raises(CheckpointError) as caught:
        tiesmerge.merge(str(sharded), [str(f) for f in folders[1:]], "ties")
    assert "differ only in Unicode normalization" in caught.value.hint


def test_a_lora_update_below_float32_is_said(tmp_path):
    """hp74a c42, c43: LoRA factors of 1e-23 (normal floats) whose product, 1e-46, is below float32's range merged
    to the base silently (a full model equal to it byte for byte, or an all-zero adapter of error 0.0)."""
    import warnings

    import tiesmerge
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_family, write_hf_dir
    from tiesmerge.errors import MergeWarning

    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    tiny = write_lora_dir(tmp_path / "tiny", {m: (a * 1e-23, f * 1e-23) for m, (a, f) in
                                              random_lora(base, 2, 1).items()}, alpha=2)
    with pytest.warns(MergeWarning, match=r"is below float32's range, so it is 0 there"):
        tiesmerge.merge(str(b), [str(tiny)], "task_arithmetic", output=str(tmp_path / "out"))
    untrained = write_lora_dir(tmp_path / "untrained", {m: (a, torch.zeros_like(f)) for m, (a, f) in
                                                        random_lora(base, 2, 1).items()}, alpha=2)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        tiesmerge.merge(str(b), [str(untrained), str(tiny)], "task_arithmetic", output=str(tmp_path / "out2"))
    assert sum("below float32's range" in str(w.message) for w in seen) == 1  # the tiny one, once


def test_pass_74_tune_side_refusals(tmp_path, capsys, monkeypatch):
    """hp74b c14: --json out.json/. wrote the file out.json; c16: an empty or zero-step integer grid range was a
    generic "expected ... with integers"; c20: adapt --data . was "the output lies inside data file 0 (.)"; c23:
    --lr 1e-50 with --init 0 (no coefficient moved) blamed the gradients; c09, c10, c31: a length leaving no token
    beside the special ones read every example as [CLS] [SEP] (or said texts it never cut were cut)."""
    import tiesmerge
    from helpers_ckpt import run_cli
    from test_adapt import _data, _family, _forward
    from tiesmerge.errors import ConfigError, MergeWarning, OutputError
    from tiesmerge.evaluation.loading import count_cut
    from tiesmerge.paths import check_output_file
    from tiesmerge.tuning.search import parse_grid

    with pytest.raises(OutputError, match="ends with '/.', which names a folder"):
        check_output_file(str(tmp_path / "tj.json") + "/.", False, [], "--json")
    for values, why in (("3:0:1", "the step leads away from stop"), ("0:3:0", "the step must be a non-zero")):
        with pytest.raises(ConfigError, match=why):
            parse_grid("dare_ties", [f"seed={values}"])
    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["adapt", "--base", "b", "--model", "m", "--model", "n", "--data", ".", "--data", ".",
                          "-o", "ad1"], capsys)
    assert rc != 0 and "is a directory, and each --data is a JSONL file" in err, err
    base, fts = _family(2)
    with pytest.warns(MergeWarning, match=r"--lr 1e-50 is 0 in float32"):
        tiesmerge.adapt(base, fts, _data(), forward=_forward(), steps=2, granularity="task", init=0.0, lr=1e-50)

    class Tokenizer:  # two special tokens, as BERT's [CLS] [SEP]
        def num_special_tokens_to_add(self, pair=False):
            return 3 if pair else 2

    with pytest.raises(ConfigError, match="a length of 2 tokens leaves no token of the text"):
        count_cut(Tokenizer(), ["a text"], max_length=2)


def test_target_modules_apart_only_in_normalization_are_said(tmp_path):
    """hp74a c31: target_modules naming 'prój' composed while the adapter's weights hold it decomposed was "weights for
    1 module(s) its config does not adapt, e.g. '...prój' (target_modules ['prój'] does not select it)": alike."""
    import unicodedata

    import tiesmerge
    from helpers_adapters import write_lora_dir
    from helpers_ckpt import write_hf_dir
    from tiesmerge.errors import IncompatibleCheckpointsError

    nfc, nfd = unicodedata.normalize("NFC", "prój"), unicodedata.normalize("NFD", "prój")
    base = {f"layer.{nfd}.weight": torch.zeros(4, 4)}
    b = write_hf_dir(tmp_path / "base", base)
    lora = write_lora_dir(tmp_path / "lora", {f"layer.{nfd}": (torch.ones(2, 4), torch.ones(4, 2))}, alpha=2,
                          config={"target_modules": [nfc]})
    with pytest.raises(IncompatibleCheckpointsError) as caught:
        tiesmerge.merge(str(b), [str(lora)], "task_arithmetic")
    assert "differ only in Unicode normalization" in caught.value.hint


def test_an_output_file_named_dash_is_refused(tmp_path, monkeypatch):
    """hp74b c15: `--json -` (standard output, to most tools) wrote a file named '-' in the working folder."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file

    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputError, match="would be a file named '-'"):
        check_output_file("-", False, [], "--json")
    assert not (tmp_path / "-").exists()


def test_a_builtin_evaluator_spelled_with_underscores_is_suggested(tmp_path, capsys, monkeypatch):
    """hp74b c40: `--evaluator classifier_accuracy:FILE` was read as a Python module, with no "did you mean"."""
    from helpers_ckpt import run_cli

    monkeypatch.chdir(tmp_path)
    rc, _, err = run_cli(["tune", "--base", "b", "--model", "m", "--model", "n", "--evaluator",
                          "classifier_accuracy:val.jsonl"], capsys)
    assert rc != 0 and "did you mean the built-in classifier-accuracy:val.jsonl" in err, err


def test_pass_75_merge_side_words(tmp_path, capsys):
    """hp75a c04, c05: a hard-linked copy of a sharded model (no model.safetensors) listed beside it in a base-less
    mergekit recipe was "model 0 is the base itself"; c09: validate's hint "use weights: to count one more" named a
    top-level key a recipe refuses (the weights are under parameters:); c28: a dare_ties density of 1e-300 was refused
    as "drop_rate ... got 1.0", a key mergekit recipes have not."""
    import os

    from helpers_ckpt import make_family, run_cli, write_hf_dir

    base, models = make_family(2)
    sharded = write_hf_dir(tmp_path / "sh", models[0], shards=2)
    copy = tmp_path / "shh"
    copy.mkdir()
    for f in sharded.iterdir():
        os.link(f, copy / f.name)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {sharded}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {copy}\n    parameters: {{weight: 0.5}}\n")
    rc, _, err = run_cli(["merge", recipe, "-o", tmp_path / "o"], capsys)
    assert rc == 2 and "are one model (one weights file under two names" in err, err
    b, a = write_hf_dir(tmp_path / "base", base), write_hf_dir(tmp_path / "a", models[1])
    own = tmp_path / "own.yaml"
    own.write_text(f"method: task_arithmetic\nbase: {b}\nmodels: [{a}, {a}]\n")
    rc, _, err = run_cli(["validate", own], capsys)
    assert rc != 0 and "weights: [...] under parameters:" in err, err
    dare = tmp_path / "dare.yaml"
    dare.write_text(f"merge_method: dare_ties\nbase_model: {b}\nmodels:\n  - model: {a}\n"
                    "    parameters: {weight: 1.0, density: 1.0e-300}\n")
    rc, _, err = run_cli(["merge", dare, "-o", tmp_path / "o2"], capsys)
    assert rc != 0 and "density 1e-300 keeps a fraction too small" in err and "drop_rate" not in err, err
    # c29: a density of 1e-7 merges (almost surely to the base), its warning's advice said as a density too
    dare.write_text(f"merge_method: dare_ties\nbase_model: {b}\nmodels:\n  - model: {a}\n"
                    "    parameters: {weight: 1.0, density: 1.0e-7}\n")
    rc, _, err = run_cli(["merge", dare, "-o", tmp_path / "o3"], capsys)
    assert rc == 0 and "(density 1e-07) leaves" in err and "(a density of at least " in err, err
    # hp76a c09: the least density the refusal names is taken; below it, every entry would drop
    for density, ok in (("3.0e-8", True), ("2.9e-8", False), ("1.0e-15", False)):
        dare.write_text(f"merge_method: dare_ties\nbase_model: {b}\nmodels:\n  - model: {a}\n"
                        f"    parameters: {{weight: 1.0, density: {density}}}\n")
        rc, _, err = run_cli(["validate", dare], capsys)
        assert (rc == 0) is ok and (ok or "give a density of at least 3e-08" in err), (density, err)


def test_output_file_spellings_through_files_and_folders(tmp_path):
    """hp75b c07: --json a/config.json/.. was "goes through a/config.json, which does not exist" (a file that does);
    c06: --json od/. for an existing folder od hinted "e.g. od", which is refused in turn."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="which is a file, not a folder"):
        check_output_file(str(tmp_path / "a" / "config.json" / ".."), False, [], "--json")
    (tmp_path / "od").mkdir()
    with pytest.raises(OutputError) as caught:
        check_output_file(str(tmp_path / "od") + "/.", False, [], "--json")
    assert caught.value.hint.endswith(f"{tmp_path / 'od' / 'scores.json'}")


def test_a_file_of_a_model_folder_given_as_a_model_hints_the_folder(tmp_path):
    """hp75a c36: an index (or config.json) given as a model path was "not a .safetensors file or a model directory"
    with only --help's generic hint; a file of a model folder now points at that folder."""
    from helpers_ckpt import make_family, write_hf_dir
    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.checkpoint import open_checkpoint

    _, models = make_family(1)
    sharded = write_hf_dir(tmp_path / "sh", models[0], shards=2)
    for name in ("model.safetensors.index.json", "config.json"):
        with pytest.raises(CheckpointError, match="not a .safetensors file") as caught:
            open_checkpoint(sharded / name)
        assert caught.value.hint == f"give the model's folder instead: {sharded}"
    stray = tmp_path / "notes.txt"
    stray.write_text("x")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(stray)
    assert "give a model directory" in caught.value.hint


def test_a_look_alike_letter_in_target_modules_is_named():
    """hp75a c39: target_modules ['q_prоj'] with a Cyrillic 'о' (U+043E) was "does not select it" of a module
    q_proj, which reads as nonsense; the character is now named."""
    from tiesmerge.io.peft_targets import Targeting

    targeting = Targeting.of({"target_modules": ["q_pr\u043ej", "v_proj"]}, "cfg")
    why = targeting.why_not("model.layers.0.self_attn.q_proj")
    assert "U+043E CYRILLIC SMALL LETTER O" in why and "'q_pr\u043ej' holds" in why, why
    assert targeting.why_not("model.layers.0.self_attn.v_proj") is None
    regex = Targeting.of({"target_modules": ".*q_pr\u043ej"}, "cfg").why_not("model.layers.0.self_attn.q_proj")
    assert "'.*q_pr\u043ej' holds U+043E" in regex, regex
    plain = Targeting.of({"target_modules": ["k_proj"]}, "cfg").why_not("model.layers.0.self_attn.q_proj")
    assert plain == "target_modules ['k_proj'] does not select it"


def test_a_tiesmerge_recipe_listing_a_model_twice_hints_its_own_key(tmp_path, capsys):
    """hp75a c10: `merge recipe.yaml` of a tiesmerge recipe listing a model twice hinted "use --weights to count one
    more", a flag, where validate names the recipe's key."""
    from helpers_ckpt import make_family, run_cli, write_hf_dir

    base, models = make_family(1)
    b, a = write_hf_dir(tmp_path / "base", base), write_hf_dir(tmp_path / "a", models[0])
    own = tmp_path / "own.yaml"
    own.write_text(f"method: task_arithmetic\nbase: {b}\nmodels: [{a}, {a}/model.safetensors]\n")
    rc, _, err = run_cli(["merge", own, "-o", tmp_path / "o"], capsys)
    assert rc != 0 and "weights: [...] under the recipe's parameters: (or --weights) to count one more" in err, err
    assert not (tmp_path / "o").exists()
    rc, _, err = run_cli(["merge", "--base", b, "--model", a, "--model", a, "-o", tmp_path / "o"], capsys)
    assert rc != 0 and "use --weights to count one more" in err, err


def test_an_ia3_adapter_losing_most_of_its_change_to_rounding_warns(tmp_path):
    """hp75a c24: a bfloat16 (IA)³ merge whose vectors mostly differ from 1 by less than bfloat16's spacing there
    (1.0015 written as 1.0) was written silently; only where every entry rounded to 1 was it refused."""
    import warnings

    import tiesmerge
    from helpers_adapters import random_ia3, write_ia3_dir
    from helpers_ckpt import make_family, write_hf_dir
    from tiesmerge.errors import MergeWarning

    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    vectors = {m: 1 + (v - 1) * 5e-3 for m, v in random_ia3(base, 1).items()}  # mostly within 3e-3 of 1
    first = next(iter(vectors))
    vectors[first].view(-1)[0] = 1.05  # one entry bfloat16 holds: not every vector rounds to ones
    adapter = write_ia3_dir(tmp_path / "ia3", vectors)
    with pytest.warns(MergeWarning, match="of bfloat16's rounding at 1 .* round to exactly 1 and change nothing"):
        tiesmerge.merge(str(b), [str(adapter)], "task_arithmetic", lam=1.0, output=str(tmp_path / "bf16"),
                        output_format="adapter", dtype="bfloat16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)  # float32 holds the change; a large change in bfloat16 too
        tiesmerge.merge(str(b), [str(adapter)], "task_arithmetic", lam=1.0, output=str(tmp_path / "f32"),
                        output_format="adapter", dtype="float32")
        wide = write_ia3_dir(tmp_path / "wide", random_ia3(base, 2))
        tiesmerge.merge(str(b), [str(wide)], "task_arithmetic", lam=1.0, output=str(tmp_path / "wide-bf16"),
                        output_format="adapter", dtype="bfloat16")


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_a_narrower_output_whose_whole_change_rounds_away_warns(tmp_path, monkeypatch, kernels):
    """hp74a c38: a float32 merge written in float16 whose every change is below float16's spacing at the base's
    values was written as the base, silently: the fused kernel's watch assumed a change wherever the output's dtype
    was not the inputs'."""
    import warnings

    from safetensors.torch import save_file

    import tiesmerge
    from tiesmerge.errors import MergeWarning

    monkeypatch.setenv("TIESMERGE_KERNELS", kernels)

    def files(name, models):
        paths = []
        for k, m in enumerate(models):
            save_file(m, str(tmp_path / f"{name}{k}.safetensors"))
            paths.append(str(tmp_path / f"{name}{k}.safetensors"))
        return paths

    base = files("base", [{"w": torch.ones(64, 64)}])[0]
    small = files("small", [{"w": torch.ones(64, 64) + 1e-5 * (k + 1)} for k in range(2)])  # float16: 9.8e-4 at 1
    with pytest.warns(MergeWarning, match="or its change is below float16's spacing"):
        tiesmerge.merge(base, small, "task_arithmetic", output=str(tmp_path / "h"), dtype="float16")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        tiesmerge.merge(base, small, "task_arithmetic", output=str(tmp_path / "f"), dtype="float32")
        wide = files("wide", [{"w": torch.ones(64, 64) + 0.1 * (k + 1)} for k in range(2)])
        tiesmerge.merge(base, wide, "task_arithmetic", output=str(tmp_path / "w"), dtype="float16")


def test_an_exact_number_in_the_apis_grid_is_said_as_one():
    """hp74b c26: grid={'lam': [Decimal('1.5')]} was refused as "not a finite number"; it is one, an exact one the
    grid does not take: said so, with the float to write."""
    from decimal import Decimal
    from fractions import Fraction

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.space import check_grid

    with pytest.raises(ConfigError, match=r"grid\['lam'\] holds Decimal\('1.5'\), an exact Decimal: a grid takes int "
                                          r"and float values \(write 1.5\)"):
        check_grid({"lam": [Decimal("1.5")]})
    with pytest.raises(ConfigError, match=r"grid\['density'\] holds Fraction\(1, 5\), an exact Fraction.*write 0.2"):
        check_grid({"density": [0.1, Fraction(1, 5)]})
    with pytest.raises(ConfigError, match=r"an exact Fraction: a grid takes int and float values\n"):
        check_grid({"lam": [Fraction(10 ** 400)]})
    check_grid({"lam": [1, 1.5], "density": [0.2]})


def test_encoder_accuracy_on_a_causal_lm_says_its_head_is_unused(tmp_path):
    """hp74b c19: encoder-accuracy over a GPT-2 language model scored the mean of its hidden states without a word
    (its LM head unused), where a classifier base is warned about."""
    import json

    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tiesmerge.errors import MergeWarning
    from tiesmerge.evaluation.builtin import builtin_evaluator

    words = ["[PAD]", "[UNK]", "good", "bad", "fine"]
    cfg = transformers.GPT2Config(vocab_size=len(words), n_positions=16, n_embd=8, n_layer=1, n_head=2)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "gpt")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(
        tmp_path / "gpt")
    data = tmp_path / "enc.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in [
        {"task": "t", "classes": ["good", "bad"]}, {"task": "t", "text": "good fine", "label": 0},
        {"task": "t", "text": "bad", "label": 1}]) + "\n")
    with pytest.warns(MergeWarning, match=r"the base is a causal language model \(GPT2LMHeadModel\).* language-model "
                                          r"head is not used; choice-accuracy:FILE"):
        builtin_evaluator(f"encoder-accuracy:{data}", tmp_path / "gpt")


def test_an_output_beside_a_look_alike_name_is_refused(tmp_path):
    """hp74a c57: -o fx/dür/new typed with a composed ü, where fx holds 'dür' decomposed, created a second 'dür'
    (ls shows two); an output file's folder or name likewise."""
    import unicodedata

    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file, check_output_location

    composed, decomposed = "d\u00fcr", unicodedata.normalize("NFD", "d\u00fcr")
    (tmp_path / decomposed).mkdir()
    for typed in (tmp_path / composed / "new", tmp_path / composed):
        with pytest.raises(OutputError, match="would be created beside a name that prints alike") as caught:
            check_output_location(typed, False)
        assert "U+0308" in caught.value.hint and "U+00FC" in caught.value.hint
    with pytest.raises(OutputError, match="folder .* does not exist") as caught:
        check_output_file(tmp_path / composed / "s.json", False, [], "--json")
    assert "differs from the" in caught.value.hint
    (tmp_path / decomposed / unicodedata.normalize("NFD", "\u00fc.json")).write_text("{}")
    with pytest.raises(OutputError, match="--json would be created beside a name that prints alike"):
        check_output_file(tmp_path / decomposed / "\u00fc.json", False, [], "--json")
    check_output_location(tmp_path / decomposed / "new", False)  # typed as stored: fine
    check_output_location(tmp_path / "plain", False)


@pytest.mark.parametrize("text", [b"my notes line1\nmy precious line2 no newline",
                                  b'{"task": "t", "text": "good", "label": 0}\n{"task": "t", "text": "bad"',
                                  b'{"a": 1, "b": [2, 3]}'])
def test_a_file_given_as_the_search_log_is_never_cut_or_replaced(tmp_path, text):
    """hp76b c95, c96, c97: a file given as run_search's log= that is no search log lost its last line (no final
    newline: read as a line cut mid-write and truncated) before the "not a search log" refusal; a one-line file
    was truncated to nothing and replaced by a log."""
    import hashlib

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.results_log import ResultsLog

    path = tmp_path / "victim.txt"
    path.write_bytes(text)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(ConfigError, match="not a search log"):
        ResultsLog(path, {"space": {"lam": [1.0]}})
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_a_search_logs_cut_lines_are_still_dropped(tmp_path):
    """The cut last line of the search's own log (or its cut header alone) is dropped as before."""
    import json

    from tiesmerge.tuning.results_log import ResultsLog

    header = {"space": {"lam": [1.0]}}
    path = tmp_path / "log.jsonl"
    log = ResultsLog(path, header)
    log.append({"key": json.dumps({"lam": 1.0}), "options": {"lam": 1.0}, "score": 0.5, "seconds": 1.0})
    log.close()
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"key": "{\\"lam\\": 2')  # a record cut mid-write
    again = ResultsLog(path, header)
    again.close()
    assert path.read_bytes() == whole and len(again.records) == 1
    path.write_bytes(whole[:25])  # the header alone, cut
    ResultsLog(path, header).close()
    assert path.read_bytes() == whole.split(b"\n")[0] + b"\n"
