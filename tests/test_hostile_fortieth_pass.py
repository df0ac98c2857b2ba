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
    with pytest.raises(ConfigError, match=r"another run \(the data of task\(s\) 'task1' \(another file"):
        tiesmerge.adapt("base", ["a", "b"], data, "task_arithmetic", steps=4, resume=True, **kwargs)
    with pytest.raises(ConfigError, match=r"another run \(the method `--method task_arithmetic.* there, "
                                          r"`--method ties.* now\)"):
        tiesmerge.adapt("base", ["a", "b"], _data(), "ties", steps=4, resume=True, **kwargs)
    # the model that differs is named (hp41 C69)
    with pytest.raises(ConfigError, match=r"another run \(model 0 \S+/a there, \S+/b now; model 1 \S+/b there, "):
        tiesmerge.adapt("base", ["b", "a"], _data(), "task_arithmetic", steps=4, resume=True, **kwargs)
    os.utime(dirs[2] / "model.safetensors", ns=(1, 1))  # its files changed since
    with pytest.raises(ConfigError, match=r"another run \(model 1 \(\S+/b\): its files \(weights, configs, "):
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
    assert [t.index for t in scored] == [0]  # candidate 0 scored again to check the log; the other came from it


def _encoder_family(tmp_path, bert_tokenizer, n=2):
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(bert_tokenizer), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    base = transformers.BertModel(cfg, add_pooling_layer=False)
    dirs = []
    for k in range(n + 1):
        model = transformers.BertModel(cfg, add_pooling_layer=False)
        model.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * k * torch.randn_like(p))
        model.save_pretrained(tmp_path / f"m{k}")
        bert_tokenizer.save_pretrained(tmp_path / f"m{k}")
        dirs.append(tmp_path / f"m{k}")
    return dirs


def test_adapt_says_how_many_examples_its_max_length_cuts_and_records_it(tmp_path, bert_tokenizer):
    """hp39 C23: `adapt --max-length 4` on examples of 7 tokens cut every one without a word, and the manifest's
    record of the run left max_length out (it changes the coefficients, and is part of the resume fingerprint)."""
    import json

    from tiesmerge.errors import MergeWarning

    dirs = _encoder_family(tmp_path, bert_tokenizer)
    files = []
    for t, words in enumerate([["the cat sat on the mat today", "a dog"], ["red sun", "cold rain"]]):  # + CLS, SEP
        files.append(tmp_path / f"task{t}.jsonl")
        files[-1].write_text("".join(json.dumps({"text": w}) + "\n" for w in words))
    heads = {"task0": ["cat", "dog"], "task1": ["sun", "rain"]}
    with pytest.warns(MergeWarning, match=r"examples longer than 4 tokens are cut \(their last tokens are lost\): "
                                          r"1 of 2 in task 'task0'; the coefficients"):
        tiesmerge.adapt(dirs[0], dirs[1:], files, forward="encoder", heads=heads, steps=1, batch_size=2,
                        max_length=4, output=tmp_path / "out")
    record = json.loads((tmp_path / "out" / "tiesmerge.json").read_text())["adamerging"]["forward_settings"]
    assert record["max_length"] == 4 and record["examples_cut"] == {"task0": 1}
    assert record["heads"] == heads


def test_the_classifier_and_choice_forwards_count_the_examples_they_cut(bert_tokenizer):
    """hp39 C23, the other two built-in forwards: the classifier loses a text's last tokens past max_length (a pair's
    tokens count too); the choice forward loses a prompt's first tokens where the prompt and its longest choice are past
    max_length."""
    import torch

    from tiesmerge.evaluation.forward import ChoiceLogits, ClassifierLogits

    model = torch.nn.Linear(1, 1)  # no config: max_length is taken as given
    classifier = ClassifierLogits(model, bert_tokenizer, max_length=5)
    rows = [{"text": "the cat"}, {"text": "the cat sat"}, {"text": "the cat sat on the mat"}]
    assert classifier.count_cut(rows, "t") == 1  # [CLS] the cat sat [SEP] is 5: kept whole
    pairs = [{"text": "the cat", "text_pair": "a dog"}, {"text": "the", "text_pair": "dog"}]
    assert classifier.count_cut(pairs, "t") == 1  # [CLS] the cat [SEP] a dog [SEP] is 7
    choice = ChoiceLogits(model, bert_tokenizer, choices={"t": ["cat", "red sun"]}, max_length=5)
    prompts = [{"text": "the"}, {"text": "the cat"}, {"text": "the cat sat"}]
    assert choice.count_cut(prompts, "t") == 2  # [CLS] the [SEP] + red sun is 5; [CLS] the cat [SEP] + 2 is 6


def test_analyze_of_models_near_float32s_limit_reports_finite_magnitudes():
    """hp39 C32: models whose entries are ±3e38 (finite float32) gave "nan" in the report's magnitude tables and null
    in analysis.json: the merged variants' means summed in float32 and overflowed."""
    import math

    import torch

    g = torch.Generator().manual_seed(0)
    base = {"l.weight": torch.zeros(16, 16)}
    models = [{"l.weight": torch.sign(torch.randn(16, 16, generator=g)) * 3e38} for _ in range(3)]
    report = tiesmerge.analyze(base, models, density=0.2)
    for part in ("by_influence", "by_agreement"):
        for table in ("mean", "std"):
            for variant, values in report["magnitudes"][part][table].items():
                assert all(v is not None and math.isfinite(v) for v in values), (part, table, variant, values)
    assert report["magnitudes"]["by_influence"]["mean"]["TIES"][-1] == pytest.approx(3e38, rel=1e-6)


def test_an_overflow_of_sums_of_huge_inputs_is_not_blamed_on_lam_alone():
    """hp39 C47: a TIES merge (lam 1) of models whose entries are ±3e38 overflowed in the disjoint mean's float32 sum,
    and the hint said the overflow "comes from the scaling", naming lam only."""
    import torch

    from tiesmerge.finite import NotFiniteError
    from tiesmerge.methods import Ties

    base = {"l.weight": torch.zeros(4, 4)}
    models = [{"l.weight": torch.full((4, 4), 3e38)} for _ in range(3)]
    with pytest.raises(NotFiniteError) as caught:
        tiesmerge.merge(base, models, Ties(density=1.0))
    assert "inputs near that limit" in caught.value.hint and "sums inside the merge" in caught.value.hint


def test_stats_summary_gives_the_size_of_the_files_written(tmp_path, capsys):
    """hp39 C42: `tiesmerge stats`'s summary gave the tensors' bytes ("24.01 KiB") for a 28,904-byte file: the
    safetensors header and the manifest were left out."""
    from helpers_ckpt import run_cli
    from test_hostile_fifth_pass import _data, _tiny_llama
    from tiesmerge.sizes import format_size

    model = _tiny_llama(tmp_path / "m", pad=True)
    data = _data(tmp_path / "d.jsonl", ["t1 t2 t3"] * 4)
    rc, out, err = run_cli(["stats", "gram", "--model", str(model), "--data", str(data), "-o", str(tmp_path / "st")],
                           capsys)
    assert rc == 0, err
    written = sum(f.stat().st_size for f in (tmp_path / "st").iterdir())
    assert f"tensors, {format_size(written)}) to" in out, (out, written)


def test_a_search_log_keeps_non_finite_api_scores_readable(tmp_path):
    """hp40 E4: run_search(log=...) with an evaluator returning NaN or ±inf (the API keeps such scores) wrote bare
    NaN/Infinity into the log, which is not JSON: the same call again refused tiesmerge's own log as corrupt."""
    import json
    import math

    from helpers_ckpt import make_family
    from tiesmerge.tuning import run_search, write_report

    base, models = make_family(2)
    grid, log = {"density": (0.25, 0.5, 0.75, 1.0), "lam": (1.0,)}, tmp_path / "log.jsonl"
    values = iter([math.nan, math.inf, -math.inf, 0.5, 0.5])

    def score(state):  # scored once each: the second search takes every score from the log but the oldest finite
        return next(values)  # one (0.5), scored again to check the log; a next() past it would raise

    first = run_search(base, models, "ties", score, grid=grid, log=str(log))
    for line in log.read_text().splitlines():
        json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} is not JSON"))
    again = run_search(base, models, "ties", score, grid=grid, log=str(log))  # next(values) would raise
    assert [repr(t.score) for t in again.trials] == [repr(t.score) for t in first.trials] == \
        ["nan", "inf", "-inf", "0.5"]
    assert again.best.score == 0.5
    write_report(again, tmp_path)


@pytest.mark.parametrize("make", ["numpy", "torch"])
def test_an_evaluator_returning_a_boolean_scalar_is_refused_as_a_bool_is(make):
    """hp40 E2: an evaluator returning np.True_ or torch.tensor(True) was scored 1.0, where Python's True is refused
    as "not a number" (a pass/fail answer is no validation score)."""
    import numpy as np
    import torch

    from tiesmerge.errors import EvaluatorError
    from tiesmerge.tuning.evaluator import guard

    value = np.True_ if make == "numpy" else torch.tensor(True)
    with pytest.raises(EvaluatorError, match="not a number"):
        guard(lambda state: value)({})
    assert guard(lambda state: np.float32(0.5))({}) == 0.5  # a numeric scalar is read


def test_a_score_past_the_limit_is_shown_as_returned():
    """hp40 E1: 1.001e300 was shown rounded, "returned 1e+300, past the ±1e+300 a score may reach"."""
    from tiesmerge.errors import EvaluatorError
    from tiesmerge.tuning.evaluator import guard

    with pytest.raises(EvaluatorError, match=r"returned 1\.001e\+300, past the ±1e\+300"):
        guard(lambda state: 1.001e300, finite=True)({})


def test_statistics_of_a_model_whose_config_changed_since_are_refused(tmp_path, capsys):
    """hp40 D12: statistics computed (fisher there, gram here), then the model's config.json changed hidden_act
    gelu -> relu (the same weights, another function): the merge used the old statistics; the manifest's digests
    covered the weight and tokenizer files only."""
    import json

    from helpers_ckpt import run_cli
    from test_hostile_fifth_pass import _data, _tiny_llama

    models = [_tiny_llama(tmp_path / name, pad=True) for name in ("base", "a", "b")]
    data = _data(tmp_path / "d.jsonl", ["t1 t2 t3"] * 4)
    for name in ("a", "b"):
        rc, _, err = run_cli(["stats", "gram", "--model", str(tmp_path / name), "--data", str(data), "-o",
                              str(tmp_path / f"st_{name}")], capsys)
        assert rc == 0, err
    config = json.loads((models[1] / "config.json").read_text())
    (models[1] / "config.json").write_text(json.dumps({**config, "transformers_version": "0.0"}, indent=4))
    merge = ["merge", "--base", str(models[0]), "--model", str(models[1]), "--model", str(models[2]), "--method",
             "regmean", "--stats", str(tmp_path / "st_a"), "--stats", str(tmp_path / "st_b")]
    rc, _, err = run_cli([*merge, "-o", str(tmp_path / "out1")], capsys)
    assert rc == 0, err  # where the file came from, and its layout, are no change of the model
    (models[1] / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    rc, _, err = run_cli([*merge, "-o", str(tmp_path / "out2")], capsys)
    assert rc != 0 and "another config.json" in err and "Traceback" not in err, err
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("family", ["biogpt", "roberta"])
def test_lm_perplexity_windows_fit_position_tables_with_an_offset(tmp_path, family):
    """hp40 L1: lm-perplexity on a BioGPT of 16 positions indexed past its table (an IndexError, "fix the
    evaluator"): its positions start at 2, which only OPT and BART were known for. A RoBERTa-like causal LM counts its
    positions from padding_idx + 1 too."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import math

    import torch

    from test_evaluation_rank_classification import LM_VOCAB, _wordlevel_tokenizer
    from tiesmerge.evaluation.builtin import LMPerplexity

    torch.manual_seed(0)
    if family == "biogpt":
        cfg = transformers.BioGptConfig(vocab_size=LM_VOCAB, max_position_embeddings=16, hidden_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                        pad_token_id=0)
        model = transformers.BioGptForCausalLM(cfg)
    else:
        cfg = transformers.RobertaConfig(vocab_size=LM_VOCAB, max_position_embeddings=18, hidden_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                         pad_token_id=1, is_decoder=True)
        model = transformers.RobertaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "lm")
    _wordlevel_tokenizer("$A", ("<s>", 2)).save_pretrained(tmp_path / "lm")
    (tmp_path / "t.txt").write_text(" ".join(["the cat sat"] * 40))
    score = LMPerplexity(tmp_path / "lm", tmp_path / "t.txt")
    assert math.isfinite(score({k: v.clone() for k, v in model.state_dict().items()}))


def test_choice_accuracy_refuses_a_prompt_or_choice_without_tokens_before_any_merge(tmp_path):
    """hp40 L3: choice-accuracy on a line whose prompt is "" failed after the first merge, as "raised ValueError ...
    fix the evaluator"; a choice of no tokens would have scored 0, above every real choice. Both are refused when the
    evaluator is made, naming the line."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import json

    import torch

    from test_evaluation_rank_classification import LM_VOCAB, _wordlevel_tokenizer
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import ChoiceAccuracy

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=LM_VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "lm")
    _wordlevel_tokenizer("$A", ("<s>", 2)).save_pretrained(tmp_path / "lm")  # no BOS: "" has no tokens
    good = {"prompt": "the cat", "choices": ["sat", "ran"], "label": 0}
    for k, (bad, said) in enumerate([({"prompt": ""}, "the prompt '' has no tokens"),
                                     ({"choices": ["sat", " "]}, "the choice ' ' has no tokens")]):
        data = tmp_path / f"v{k}.jsonl"
        data.write_text(json.dumps(good) + "\n" + json.dumps({**good, **bad}) + "\n")
        with pytest.raises(ConfigError, match=rf"v{k}\.jsonl:2: {said}"):
            ChoiceAccuracy(tmp_path / "lm", data)
    data = tmp_path / "ok.jsonl"
    data.write_text(json.dumps(good) + "\n")
    ChoiceAccuracy(tmp_path / "lm", data)


def test_encoder_accuracy_scores_bert_checkpoints_that_hold_their_pooler(tmp_path, bert_tokenizer):
    """hp40 L5: encoder-accuracy on BertModel checkpoints saved with their pooler (as save_pretrained writes them)
    failed after the first merge: "the merged model has tensors the model built from the base does not
    (pooler.dense.bias ...)". Mean pooling never reads the pooler (adapt --forward encoder leaves it too)."""
    import json

    import transformers

    from tiesmerge.evaluation.builtin import EncoderAccuracy

    cfg = transformers.BertConfig(vocab_size=len(bert_tokenizer), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    model = transformers.BertModel(cfg)  # with its pooler
    model.save_pretrained(tmp_path / "enc")
    bert_tokenizer.save_pretrained(tmp_path / "enc")
    data = tmp_path / "val.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [{"task": "t", "classes": ["cat", "dog"]},
                                                       {"task": "t", "text": "the cat sat", "label": 0},
                                                       {"task": "t", "text": "a dog ran", "label": 1}]) + "\n")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(k.startswith("pooler.") for k in state)
    assert 0.0 <= EncoderAccuracy(tmp_path / "enc", data)(state) <= 1.0


def test_an_average_whose_base_holds_all_the_weight_merges(tmp_path, capsys):
    """hp40 C21: mergekit `linear` with weights 1.0 and 0.0 (the first model read as the base, carrying all of it), and
    `--method average --base-weight 1 --weights 0`, were refused "weights must not sum to 0, got [0.0]": the base's
    weight was left out of the sum. mergekit 0.1.5 merges it (its output equals the first model)."""
    import torch

    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.methods import Average

    base, models = make_family(2)
    merged = tiesmerge.merge(base, models, Average(weights=(0.0, 0.0), base_weight=1.0))
    assert all(torch.equal(merged[k], base[k].float()) for k in base)
    with pytest.raises(ConfigError, match=r"weights must not sum to 0, got \[1.0, -1.0\]"):
        Average(weights=(1.0, -1.0))  # without base_weight the weights alone are normalised
    with pytest.raises(ConfigError, match=r"the weights 0, 0 \(base_weight first\) must not sum to 0"):
        Average(weights=(0.0,), base_weight=0.0)
    recipe = tmp_path / "r.yaml"
    a, b = (write_hf_dir(tmp_path / n, s) for n, s in (("a", models[0]), ("b", models[1])))
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1.0}}\n"
                      f"  - model: {b}\n    parameters: {{weight: 0.0}}\ndtype: float32\n")
    from helpers_ckpt import run_cli

    rc, _, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert rc == 0, err
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(torch.equal(out[k], models[0][k].float()) for k in models[0])


@pytest.mark.parametrize("entry", ["merge", "analyze", "tune", "run_search", "adapt"])
def test_models_given_as_a_set_are_refused(entry, tmp_path):
    """hp40b C43: tiesmerge.merge('base', {'ftA', 'ftB'}, weights=[1, 0]) merged ftA or ftB depending on
    PYTHONHASHSEED: a set has no order, and per-model options bind to the models by position."""
    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    dirs = {str(write_hf_dir(tmp_path / n, s)) for n, s in zip(("a", "b"), models)}
    calls = {"merge": lambda: tiesmerge.merge(base, dirs, "task_arithmetic", weights=[1.0, 0.0]),
             "analyze": lambda: tiesmerge.analyze(base, dirs),
             "tune": lambda: tiesmerge.tune(base, dirs, "ties", lambda state: 1.0),
             "run_search": lambda: run_search(base, dirs, "ties", lambda state: 1.0),
             "adapt": lambda: tiesmerge.adapt(base, dirs, [[{"text": "x"}], [{"text": "y"}]])}
    with pytest.raises(ConfigError, match="models must be a list or tuple, not a set"):
        calls[entry]()


def test_weights_and_stats_flags_replace_a_recipes_per_model_entries(tmp_path, capsys):
    """hp40b C53: `merge ov.yaml --weights 1 1` over a recipe with per-model `weight:` entries was refused as "weights
    are given both per model and in parameters.weights" (a key the recipe lacks), though flags override a recipe; with
    --model the flag's count was blamed on the recipe alone. --stats over per-model `stats:` likewise."""
    from helpers_ckpt import make_family, run_cli

    base, models = make_family(2)
    for name, state in zip(("base", "a", "b"), (base, *models)):
        write_hf_dir(tmp_path / name, state)
    recipe = tmp_path / "ov.yaml"
    recipe.write_text("method: ties\nbase: base\nmodels: [{path: a, weight: 1}, {path: b, weight: 3}]\n")
    rc, out, err = run_cli(["merge", str(recipe), "--weights", "1", "1", "-o", str(tmp_path / "o"), "--dry-run"],
                           capsys)
    assert rc == 0, err
    assert "--weights replaces the recipe's per-model weight" in err and "weights=[1.0, 1.0]" in out
    rc, out, err = run_cli(["merge", str(recipe), "--model", str(tmp_path / "a"), "--weights", "1", "1", "1", "-o",
                            str(tmp_path / "o"), "--dry-run"], capsys)
    assert rc == 2 and "ov.yaml with --model, --weights from the command line: ties: 3 weights given for 1 models" \
        in err, err
    stats = tmp_path / "st.yaml"
    stats.write_text("method: regmean\nbase: base\nmodels: [{path: a, stats: sa}, {path: b, stats: sb}]\n")
    rc, out, err = run_cli(["merge", str(stats), "--stats", str(tmp_path / "x"), "--stats", str(tmp_path / "y"), "-o",
                            str(tmp_path / "o"), "--dry-run"], capsys)
    assert "given both per model" not in err and "--stats replaces the recipe's per-model stats" in err, err
    # hp68a c48, c49: the recipe's parameters.weights and top-level stats: list, replaced without a word
    recipe.write_text("method: task_arithmetic\nbase: base\nmodels: [a, b]\nparameters: {weights: [0.3, 0.7]}\n")
    rc, out, err = run_cli(["merge", str(recipe), "--weights", "0.5", "0.5", "-o", str(tmp_path / "o"), "--dry-run"],
                           capsys)
    assert rc == 0 and "--weights [0.5, 0.5] replaces the recipe's weights [0.3, 0.7]" in err, err
    stats.write_text("method: regmean\nbase: base\nmodels: [a, b]\nstats: [sa, sb]\n")
    rc, out, err = run_cli(["merge", str(stats), "--stats", str(tmp_path / "x"), "--stats", str(tmp_path / "y"), "-o",
                            str(tmp_path / "o"), "--dry-run"], capsys)
    assert "--stats replaces the recipe's stats (2 folder(s))" in err, err


def test_a_tmpdir_inside_an_input_is_refused_before_anything_is_made_there(tmp_path):
    """hp40b C16: TMPDIR inside an input model was refused, but only after tempfile's probe file and the private torch
    folder had been created (and removed) in the input: its folder's mtime changed, and a kill at that instant would
    have left the folder there."""
    import subprocess
    import sys

    from helpers_ckpt import make_family

    base, models = make_family(2)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *models))]
    before = {p.name: p.stat().st_mtime_ns for p in dirs[1].iterdir()}, dirs[1].stat().st_mtime_ns
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TEMP", "TMP")}
    env["TMPDIR"] = str(dirs[1])
    done = subprocess.run([sys.executable, "-m", "tiesmerge", "merge", "--base", str(dirs[0]), "--model", str(dirs[1]),
                           "--model", str(dirs[2]), "-o", str(tmp_path / "out"), "--no-progress"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "(TMPDIR) lies inside model 0" in done.stderr, done.stderr
    after = {p.name: p.stat().st_mtime_ns for p in dirs[1].iterdir()}, dirs[1].stat().st_mtime_ns
    assert after == before  # no probe file and no folder was ever made in the input


def test_every_tokenizer_file_is_copied_stamped_and_digested(tmp_path):
    """hp40 P1, P2: PhoBERT keeps its BPE merges in bpe.codes, which a merge did not copy (the output's tokenizer could
    not load: merges_file None), a resumed search did not stamp and statistics did not digest."""
    from helpers_ckpt import make_family
    from tiesmerge.stats.files import tokenizer_digest
    from tiesmerge.tuning.driver import weights_stamp

    base, models = make_family(2)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *models))]
    (dirs[0] / "vocab.txt").write_text("<s>\n<pad>\n</s>\n<unk>\nthe\ncat\n")
    (dirs[0] / "bpe.codes").write_text("t h 10\nth e 9\n")
    stamp, digest = weights_stamp([dirs[0]]), tokenizer_digest(dirs[0])
    (dirs[0] / "bpe.codes").write_text("c a 10\nca t 9\n")
    assert weights_stamp([dirs[0]]) != stamp and tokenizer_digest(dirs[0]) != digest
    tiesmerge.merge(dirs[0], dirs[1:], "ties", output=tmp_path / "out")
    assert (tmp_path / "out" / "bpe.codes").read_text() == "c a 10\nca t 9\n"


def test_an_evaluator_that_changes_the_working_folder_is_put_back(tmp_path, capsys, monkeypatch):
    """hp40 D19: an evaluator calling os.chdir moved the search with it: its log landed in the evaluator's folder and
    the next merge read the base there ("base: no such file or directory")."""
    import sys

    from helpers_ckpt import make_family, run_cli

    base, models = make_family(2)
    for name, state in zip(("base", "a", "b"), (base, *models)):
        write_hf_dir(tmp_path / name, state)
    (tmp_path / "elsewhere").mkdir()
    moved = str(tmp_path / "elsewhere")
    (tmp_path / "evcd.py").write_text(f"import os\n\n\ndef score(state):\n    os.chdir({moved!r})\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evcd", raising=False)
    rc, out, err = run_cli(["search", "--base", "base", "--model", "a", "--model", "b", "--evaluator", "evcd:score",
                            "--grid", "density=0.2,0.5", "--grid", "lam=1.0", "--dir", "scd", "-o", "bestcd"], capsys)
    assert rc == 0, err
    assert "changed the working folder" in err
    assert (tmp_path / "scd" / "log.jsonl").is_file() and (tmp_path / "bestcd").is_dir()
    assert list((tmp_path / "elsewhere").iterdir()) == []


def _signed_score(state, sign=1.0):
    return sign * float(sum(v.float().sum() for v in state.values()))


class _SignedScore:
    def __init__(self, sign):
        self.sign = sign

    def __call__(self, state):
        return _signed_score(state, self.sign)


def _make_signed(sign):
    def score(state):
        return _signed_score(state, sign)
    return score


@pytest.mark.parametrize("kind", ["partial", "object", "closure"])
def test_a_search_resumed_with_an_evaluator_built_otherwise_is_refused(tmp_path, kind):
    """hp40 D15: run_search(log=...) resumed with the same evaluator code built with another argument (a
    functools.partial's keyword, a callable object's attribute, a closure's cell: sign 1 -> -1) reused every score of
    the first run, and its "best" was the other evaluator's. A callable object's attributes also hold what it records
    while scoring (a counter, a cache), so its resume is said, not refused."""
    import functools

    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError, MergeWarning
    from tiesmerge.tuning import run_search

    def evaluator(sign):
        return {"partial": functools.partial(_signed_score, sign=sign), "object": _SignedScore(sign),
                "closure": _make_signed(sign)}[kind]

    base, models = make_family(2)
    grid, log = {"density": (0.2, 0.5), "lam": (1.0,)}, str(tmp_path / "log.jsonl")
    run_search(base, models, "ties", evaluator(1.0), grid=grid, log=log)
    if kind == "object":  # not digested, so warned; and the first logged candidate, scored again, differs
        with pytest.warns(MergeWarning, match="2 logged scores of an evaluator whose scores may depend on a "
                                              ".* object it holds.*needs a log of its own"), \
                pytest.raises(ConfigError, match="scores .* now where the log records"):
            run_search(base, models, "ties", evaluator(-1.0), grid=grid, log=log)
        return
    run_search(base, models, "ties", evaluator(1.0), grid=grid, log=log)  # built the same: resumes
    with pytest.raises(ConfigError, match="another search .*what the evaluator was built with"):
        run_search(base, models, "ties", evaluator(-1.0), grid=grid, log=log)


def test_a_sourceless_evaluator_module_is_in_the_code_digest(tmp_path, monkeypatch):
    """hp40 D17: an evaluator module that exists only as a .pyc escaped search's code digest: recompiled with another
    constant, the search resumed with the old scores."""
    import importlib
    import py_compile
    import sys

    from tiesmerge.tuning.driver import _evaluator_code

    source = tmp_path / "evc_src.py"
    source.write_text("K = 1.0\n\n\ndef score(state):\n    return K\n")
    py_compile.compile(str(source), cfile=str(tmp_path / "evc.pyc"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "evc", raising=False)
    module = importlib.import_module("evc")
    assert module.__file__.endswith("evc.pyc")
    assert _evaluator_code(module.score) == [str(tmp_path / "evc.pyc")]


def test_tunes_best_state_is_a_fresh_merge_whatever_the_evaluator_does_to_its_argument():
    """hp40 T1: tune's best_state was the very dict its evaluator was handed; an evaluator that changes it in place
    (quantises, fine-tunes) left best_state zeroed, while run_search returned a fresh merge."""
    import torch

    from helpers_ckpt import make_family
    from tiesmerge.methods import Ties

    base, models = make_family(2)

    def score(state):
        value = -float(sum((v.float() ** 2).sum() for v in state.values()))
        for v in state.values():
            v.zero_()
        return value

    result = tiesmerge.tune(base, models, "ties", score, grid={"density": (0.5,), "lam": (1.0,)})
    expected = tiesmerge.merge(base, models, Ties(density=0.5, lam=1.0))
    assert all(torch.allclose(result.best_state[k].float(), expected[k].float(), atol=1e-6) for k in expected)


def test_tiny_scores_keep_their_order_on_screen():
    """hp40 E5: scores below 5e-5 (a small negative loss) all printed as 0.0000, so their order was invisible."""
    from tiesmerge.tuning.evaluator import format_score

    assert format_score(-1.5e-5) == "-1.5e-05" and format_score(2.25e-5) == "2.25e-05"
    assert format_score(0.0) == "0.0000" and format_score(0.64125) == "0.6412"


def test_adapts_manifest_records_the_steps_taken(tmp_path):
    """hp40 A9: a run resumed from a checkpoint past --steps ends at the checkpoint's step, and the manifest recorded
    only the --steps asked."""
    import json

    from test_adapt import _data, _family, _forward

    base, fts = _family(2)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *fts))]
    kwargs = dict(forward=_forward(), checkpoint=tmp_path / "ck.safetensors", granularity="task")
    tiesmerge.adapt(dirs[0], dirs[1:], _data(), steps=2, **kwargs)
    with pytest.warns(Warning):
        tiesmerge.adapt(dirs[0], dirs[1:], _data(), steps=1, resume=True, output=tmp_path / "out", **kwargs)
    record = json.loads((tmp_path / "out" / "tiesmerge.json").read_text())["adamerging"]
    assert record["config"]["steps"] == 1 and record["steps_taken"] == 2


def test_a_local_ray_cluster_that_cannot_start_is_a_typed_error(monkeypatch, tmp_path):
    """hp40 R1: under ulimit -v, Ray's "The current node timed out during startup" was reported as "unexpected
    Exception ... a bug in tiesmerge"."""
    ray = pytest.importorskip("ray")
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import executors

    def refuse(*args, **kwargs):
        raise Exception("The current node timed out during startup. This could happen because ...")

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    with pytest.raises(ConfigError, match="the local Ray cluster could not start \\(The current node timed out"):
        executors.RayExecutor(workers=1)


@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear"])
def test_normalize_weights_with_weights_summing_to_0_is_said(method):
    """hp40b C77: normalize_weights with weights summing to 0 divides by 1 (mergekit's rule) without a word, where
    average and mergekit's linear refuse such weights."""
    from helpers_ckpt import make_family
    from tiesmerge.errors import MergeWarning

    base, models = make_family(2)
    with pytest.warns(MergeWarning, match=r"normalize_weights with weights that sum to 0 \(1, -1\) divides by 1"):
        tiesmerge.merge(base, models, method, weights=[1.0, -1.0], normalize_weights=True,
                        **({"drop_rate": 0.0} if method == "dare_linear" else {}))


def test_the_digest_cache_is_not_written_into_searchs_dir(tmp_path, capsys, monkeypatch):
    """hp40 D16: TIESMERGE_CACHE_DIR pointed at search's --dir wrote digests.json beside the log: --dir is one of
    the command's outputs, which the cache never goes into."""
    from helpers_ckpt import make_family, run_cli

    base, models = make_family(2)
    for name, state in zip(("base", "a", "b"), (base, *models)):
        write_hf_dir(tmp_path / name, state)
    (tmp_path / "evz.py").write_text("def score(state):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(tmp_path / "s2"))
    rc, _, err = run_cli(["search", "--base", "base", "--model", "a", "--model", "b", "--evaluator", "evz:score",
                          "--grid", "density=0.2", "--grid", "lam=1.0", "--dir", "s2", "-o", "best2"], capsys)
    assert rc == 0, err
    assert not (tmp_path / "s2" / "digests.json").exists()
    assert "digests.json" not in {p.name for p in (tmp_path / "s2").iterdir()}


def test_adapt_says_when_nothing_can_move_the_coefficients(tmp_path):
    """hp40 X2: models whose logits are huge gave entropy 0 on every input and zero gradients from the first step:
    adapt ended with every coefficient at --init and said nothing."""
    import torch

    from test_adapt import _data, _family, _forward
    from tiesmerge.errors import MergeWarning

    base, fts = _family(2)
    fts = [{k: v * 1e30 for k, v in ft.items()} for ft in fts]
    with pytest.warns(MergeWarning, match="gradient is 0 at the first step.*saturated"):
        result = tiesmerge.adapt(base, fts, _data(), forward=_forward(), steps=2, granularity="task")
    assert torch.all(result.coefficients == 0.3)


def test_another_commands_file_is_named_as_what_it_is(tmp_path):
    """hp40 C2: tune --json at an adapt checkpoint or a search log, and adapt --checkpoint at tune's --json, were
    refused as "a file tiesmerge did not write"; right to refuse, wrong reason."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file

    log = tmp_path / "log.jsonl"
    log.write_text('{"format": "tiesmerge-search/1", "seed": 0}\n')
    scores = tmp_path / "t.json"
    scores.write_text('{"best": {}, "method": "ties", "points": []}')
    with pytest.raises(OutputError, match="a file tiesmerge wrote as a search's log, not as --json"):
        check_output_file(log, True, [], "--json")
    with pytest.raises(OutputError, match="a file tiesmerge wrote as tune's --json scores, not as the checkpoint"):
        check_output_file(scores, True, [], "the checkpoint")
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="a file tiesmerge did not write"):
        check_output_file(tmp_path / "notes.txt", True, [], "--json")


def test_an_output_inside_the_model_folder_of_a_weights_file_input_is_refused(tmp_path):
    """hp40b C64: `--base base/model.safetensors -o base/sub` wrote a folder into the model folder holding the input
    file; `-o base` itself was refused."""
    from helpers_ckpt import make_family
    from tiesmerge.errors import OutputError

    base, models = make_family(2)
    dirs = [write_hf_dir(tmp_path / n, s) for n, s in zip(("base", "a", "b"), (base, *models))]
    with pytest.raises(OutputError, match="lies inside the base"):
        tiesmerge.merge(dirs[0] / "model.safetensors", dirs[1:], "ties", output=dirs[0] / "sub")
    assert not (dirs[0] / "sub").exists()
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "w.safetensors").write_bytes((dirs[1] / "model.safetensors").read_bytes())  # no config.json beside it
    tiesmerge.merge(dirs[0], [loose / "w.safetensors", dirs[2]], "ties", output=loose / "merged")


def test_ties_that_keep_far_more_than_the_density_are_said():
    """hp40b C76: fine-tunes of base ± 0.01 (one magnitude everywhere): TIES at density 0.2 kept ~90% of each task
    vector (every entry tying at the threshold is kept, the documented default) without a word."""
    import torch

    from tiesmerge.errors import MergeWarning
    from tiesmerge.methods import Ties

    g = torch.Generator().manual_seed(0)
    base = {"w": 1.0 + torch.rand(64, 64, generator=g)}  # one exponent: (b ± 0.01) - b rounds to few values
    models = [{"w": base["w"] + 0.01 * torch.sign(torch.randn(64, 64, generator=g))} for _ in range(2)]
    with pytest.warns(MergeWarning, match=r"keeping every tie keeps far more than the density: model 0 .*\(asked "
                                          r"20\.0%\).*--threshold-ties sort"):
        tiesmerge.merge(base, models, Ties(density=0.2))
    spread = [{"w": base["w"] + torch.randn(64, 64, generator=g)} for _ in range(2)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        tiesmerge.merge(base, spread, Ties(density=0.2))  # no ties: nothing said


def test_zeros_at_a_threshold_of_0_are_not_said_to_be_kept():
    """The C76 warning's false alarm: a fine-tune that changed a few weights has a task vector of mostly exact zeros;
    a threshold of 0 "keeps" them, which adds nothing to the merge."""
    import warnings

    import torch

    from tiesmerge.errors import MergeWarning
    from tiesmerge.methods import Ties

    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(64, 64, generator=g)}
    models = []
    for _ in range(2):
        w = base["w"].clone()
        w.view(-1)[:200] += torch.randn(200, generator=g)  # 5% changed: density 0.2's threshold is 0
        models.append({"w": w})
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        tiesmerge.merge(base, models, Ties(density=0.2))


class _NoRepr:
    def __repr__(self):
        raise RuntimeError("no repr")


def _score_with(state, extra=None, k=1.0):
    return k


@pytest.mark.parametrize("extra", [_NoRepr(), "bf16", "meta", "object"])
def test_the_evaluators_build_digest_never_fails(extra):
    """hp41 C4, C7, C68: a partial holding an argument whose repr raises, a bfloat16 or a meta tensor ended the search
    as "unexpected ... a bug in tiesmerge"; an object array (pandas' .values) was digested by its type alone."""
    import functools

    import numpy as np
    import torch

    from tiesmerge.tuning.evaluator import evaluator_name, guard
    from tiesmerge.tuning.evaluator_digest import evaluator_state as _evaluator_state

    value = {"bf16": torch.ones(3, dtype=torch.bfloat16), "meta": torch.empty(3, device="meta"),
             "object": np.array(["a", "b"], dtype=object)}.get(extra, extra) if isinstance(extra, str) else extra
    first = _evaluator_state(guard(functools.partial(_score_with, extra=value)))
    assert first is not None and evaluator_name(functools.partial(_score_with, extra=value)).startswith("partial of")
    if extra == "bf16":
        assert _evaluator_state(functools.partial(_score_with, extra=value * 2)) != first
    if extra == "object":
        assert _evaluator_state(functools.partial(_score_with, extra=np.array(["a", "c"], dtype=object))) != first


def _make_signed_closure(sign):
    def score(state):
        return sign
    return score


def _timed(fn):
    def wrapper(state):
        return fn(state)
    return wrapper


def test_the_build_digest_follows_partials_and_decorators_into_closures():
    """hp41 C6: a partial over a closure, or a decorator around one, digested only the outer layer: the inner
    closure's sign changed unseen."""
    import functools

    from tiesmerge.tuning.evaluator_digest import evaluator_state as _evaluator_state

    assert _evaluator_state(functools.partial(_make_signed_closure(1.0))) != \
        _evaluator_state(functools.partial(_make_signed_closure(-1.0)))
    assert _evaluator_state(_timed(_make_signed_closure(1.0))) != _evaluator_state(_timed(_make_signed_closure(-1.0)))


def test_a_bound_methods_resume_is_said_as_an_objects_is(tmp_path):
    """hp41 C5: a bound method E(sign).score resumed with another sign silently; as for a callable object, its
    object's attributes cannot be compared, and that is said (and the logged candidate scored again differs)."""
    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError, MergeWarning
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    grid, log = {"density": (0.2,), "lam": (1.0,)}, str(tmp_path / "log.jsonl")
    run_search(base, models, "ties", _SignedScore(1.0).__call__, grid=grid, log=log)
    with pytest.warns(MergeWarning, match="logged scores of an evaluator whose scores may depend on a "
                                          "_SignedScore object it holds"), \
            pytest.raises(ConfigError, match="now where the log records"):
        run_search(base, models, "ties", _SignedScore(-1.0).__call__, grid=grid, log=log)


@pytest.mark.parametrize("value, ok", [("decimal", 0.5), ("fraction", 1 / 3), ("npstr", None), ("meta", None)])
def test_scores_of_other_number_types(value, ok):
    """hp41 C2, C55, C56: Decimal and Fraction are numbers (refused as "not a number"); numpy.str_ was read as a score
    (every other string is refused); a meta tensor ended the search as "a bug in tiesmerge"."""
    import decimal
    import fractions

    import numpy as np
    import torch

    from tiesmerge.errors import EvaluatorError
    from tiesmerge.tuning.evaluator import guard

    score = {"decimal": decimal.Decimal("0.5"), "fraction": fractions.Fraction(1, 3), "npstr": np.str_("0.5"),
             "meta": torch.empty((), device="meta")}[value]
    if ok is None:
        with pytest.raises(EvaluatorError, match="not a number"):
            guard(lambda state: score)({})
    else:
        assert guard(lambda state: score)({}) == pytest.approx(ok)


@pytest.mark.parametrize("where", ["output", "log", "json", "analyze"])
def test_a_nul_byte_in_a_written_path_is_a_typed_error(where, tmp_path):
    """hp41 C70: output="o\\x00x" (and log=, analyze's output) raised a raw "ValueError: embedded null byte", where a
    NUL in an input's path is a ConfigError."""
    from helpers_ckpt import make_family
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, models = make_family(2)
    bad = str(tmp_path / "o\x00x")
    calls = {"output": lambda: tiesmerge.merge(base, models, "ties", output=bad),
             "log": lambda: run_search(base, models, "ties", lambda s: 1.0, grid={"density": (0.5,)}, log=bad),
             "json": lambda: __import__("tiesmerge.paths").paths.check_output_file(bad, False, [], "--json"),
             "analyze": lambda: tiesmerge.analyze(base, models, output=bad)}
    with pytest.raises(ConfigError, match="holds a NUL byte"):
        calls[where]()


@pytest.mark.parametrize("flag", [["--weights", "1", "3"], ["--densities", "0.5", "0.5"]])
def test_per_model_flags_over_a_mergekit_recipe_are_refused(tmp_path, capsys, flag):
    """hp41 C20, C43: `--weights` over a mergekit linear recipe bound to the translated models (the first listed
    became the base): 2 weights were refused "for 1 models", and over a recipe listing the base they weighed gft2 and
    the base."""
    from helpers_ckpt import make_family, run_cli

    base, models = make_family(2)
    a, b = (write_hf_dir(tmp_path / n, s) for n, s in (("a", models[0]), ("b", models[1])))
    recipe = tmp_path / "lin.yaml"
    recipe.write_text(f"merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6}}\n"
                      f"  - model: {b}\n    parameters: {{weight: 0.4}}\ndtype: float32\n")
    rc, _, err = run_cli(["merge", str(recipe), *flag, "-o", str(tmp_path / "o"), "--dry-run"], capsys)
    assert rc == 2 and f"{flag[0]} over a mergekit recipe" in err, err


def test_choices_or_classes_that_tokenize_alike_are_refused(tmp_path, bert_tokenizer):
    """hp41 C47, C48: choices ["zzz", "qqq"] (both unknown) or classes ["GOOD", "good"] (a lower-casing tokenizer)
    score alike whatever the merge: the tie went to the first, so its examples were always right (accuracy 1.0)."""
    import json

    import transformers

    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import ChoiceAccuracy, EncoderAccuracy

    cfg = transformers.BertConfig(vocab_size=len(bert_tokenizer), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "enc")
    bert_tokenizer.save_pretrained(tmp_path / "enc")
    data = tmp_path / "val.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [{"task": "t", "classes": ["CAT", "cat"]},
                                                       {"task": "t", "text": "the cat sat", "label": 0}]) + "\n")
    with pytest.raises(ConfigError, match="the class descriptions 'CAT' and 'cat' are the same tokens"):
        EncoderAccuracy(tmp_path / "enc", data)
    gpt2 = pytest.importorskip("transformers").GPT2Config
    from test_evaluation_rank_classification import LM_VOCAB, _wordlevel_tokenizer

    transformers.GPT2LMHeadModel(gpt2(vocab_size=LM_VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16)
                                 ).save_pretrained(tmp_path / "lm")
    _wordlevel_tokenizer("<s> $A", ("<s>", 2)).save_pretrained(tmp_path / "lm")
    choices = tmp_path / "ch.jsonl"
    choices.write_text(json.dumps({"prompt": "the cat", "choices": ["zzzq", "qqqz"], "label": 0}) + "\n")
    with pytest.raises(ConfigError, match=r"ch\.jsonl:1: the choices 'zzzq' and 'qqqz' are the same tokens"):
        ChoiceAccuracy(tmp_path / "lm", choices)


@pytest.mark.parametrize("flag", ["--model", "--base"])
def test_base_or_model_flags_over_a_mergekit_recipe_are_refused(tmp_path, capsys, flag):
    """hp41 C85: --model/--base over a mergekit linear recipe listing its base misnamed the recipe's base and model
    count ("replaces the recipe's base gft1", "model 1 (gft1) is the base itself"): the translation had made the first
    listed model the base."""
    from helpers_ckpt import make_family, run_cli

    base, models = make_family(2)
    b0, a, b = (write_hf_dir(tmp_path / n, s) for n, s in (("base", base), ("a", models[0]), ("b", models[1])))
    recipe = tmp_path / "lin.yaml"
    recipe.write_text(f"merge_method: linear\nbase_model: {b0}\nmodels:\n"
                      f"  - model: {a}\n    parameters: {{weight: 0.7}}\n"
                      f"  - model: {b}\n    parameters: {{weight: -0.25}}\n"
                      f"  - model: {b0}\n    parameters: {{weight: 0.55}}\n"
                      "parameters: {normalize: false}\ndtype: float32\n")
    rc, _, err = run_cli(["merge", str(recipe), flag, str(b), "-o", str(tmp_path / "o"), "--dry-run"], capsys)
    assert rc == 2 and f"{flag} over a mergekit recipe" in err and "is the base itself" not in err, err


def test_stats_says_how_many_examples_max_length_cuts(tmp_path, capsys):
    """hp41 C12: `stats --max-length 16` on 200-word examples cut every one silently (adapt now says so)."""
    from helpers_ckpt import run_cli
    from test_hostile_fifth_pass import _data, _tiny_llama

    model = _tiny_llama(tmp_path / "m", pad=True)
    data = _data(tmp_path / "d.jsonl", ["t1 t2 t3", " ".join(["t4"] * 40)])
    rc, _, err = run_cli(["stats", "gram", "--model", str(model), "--data", str(data), "--max-length", "16", "-o",
                          str(tmp_path / "st")], capsys)
    assert rc == 0 and "1 of the 2 examples are longer than 16 tokens" in err, err


def test_an_evaluator_that_changes_the_umask_is_put_back():
    """hp41 C40: an evaluator calling os.umask(0o777) left it so, and the search's output was written with mode 000."""
    from tiesmerge.errors import MergeWarning
    from tiesmerge.tuning.evaluator import guard

    def score(state):
        os.umask(0o777)
        return 1.0

    before = os.umask(0o022)
    try:
        with pytest.warns(MergeWarning, match="changed the umask \\(to 777\\); tiesmerge set it back to 022"):
            guard(score)({})
        assert os.umask(0o022) == 0o022
    finally:
        os.umask(before)


def test_the_cut_warning_does_not_advise_a_larger_max_length_past_the_positions():
    """hp41 C9: --max-length 1000 on a model of 64 positions: the warning still said a larger --max-length keeps
    more, which cannot help."""
    from tiesmerge.adamerging.run import _warn_cut
    from tiesmerge.errors import MergeWarning

    class Fitted:
        max_length = 64

        def count_cut(self, rows, task):
            return len(rows)

    with pytest.warns(MergeWarning, match="the model's positions allow no more") as said:
        _warn_cut(Fitted(), {"t": [{"text": "x"}]}, 1000)
    assert "a larger --max-length" not in str(said[0].message)
