"""Hostile pass 42 (issue 13), and the notes of pass 41 left for it."""

from __future__ import annotations

import os
from typing import ClassVar

import pytest

import tiesmerge
from helpers_ckpt import make_family, write_hf_dir


def _family_dirs(tmp_path, n=2):
    base, fts = make_family(n)
    return [str(write_hf_dir(tmp_path / name, sd)) for name, sd in zip(("base", *[f"ft{k}" for k in range(n)]),
                                                                        (base, *fts))]


@pytest.mark.parametrize("output", ["", b""])
def test_an_empty_output_path_is_refused_as_empty(tmp_path, monkeypatch, output):
    """hp41 C71: the API's ``output=""`` was taken as the working folder and refused as "OutputError: : the output
    contains the base", with an empty name printed."""
    from tiesmerge.errors import ConfigError

    base, a, b = _family_dirs(tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="the output: the path is empty"):
        tiesmerge.merge(base, [a, b], output=output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft0", "ft1"]


def test_adapts_resume_refusal_names_options_as_the_command_line_does(tmp_path):
    """hp41 C8: a refused resume said "checkpoint_every 2 there, None now" (the spacing of checkpoints may change on
    a resume, so it is never the cause) and "objective 'entropy' there" in the dataclass's names; --limit's change
    was "the data of task(s)" without a word of why."""
    from test_adapt_hostile import _checkpointed, _forward
    from tiesmerge.errors import ConfigError

    base, fts, files, ck = _checkpointed(tmp_path, steps=2)
    with pytest.raises(ConfigError) as caught:
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=4, checkpoint=ck, resume=True, checkpoint_every=1,
                        shuffle_seed=3, clamp=(0.0, 1.0))
    message = str(caught.value)
    assert "--shuffle-seed 0 there, 3 now" in message and "--clamp not set there, [0.0, 1.0] now" in message
    assert "checkpoint_every" not in message and "checkpoint-every" not in message
    # the same run with only the checkpoints' spacing changed resumes
    tiesmerge.adapt(base, fts, files, forward=_forward(), steps=3, checkpoint=ck, resume=True, checkpoint_every=1)


def test_adapts_resume_refusal_names_the_model_whose_files_changed(tmp_path):
    """hp41 C69: a fine-tuned model's weights rewritten in place were "the models: another base or fine-tuned model,
    or their files ... changed", naming none of them."""
    import os

    from test_adapt_hostile import _forward, _setup
    from tiesmerge.errors import ConfigError

    base, fts, files = _setup(tmp_path)
    base, *fts = [str(write_hf_dir(tmp_path / name, sd)) for name, sd in zip(("b", "m1", "m2"), (base, *fts))]
    ck = tmp_path / "ck.safetensors"
    tiesmerge.adapt(base, fts, files, forward=_forward(), steps=2, checkpoint=ck)
    os.utime(os.path.join(fts[1], "model.safetensors"), ns=(1, 1))  # rewritten in place
    with pytest.raises(ConfigError, match=r"another run \(model 1 \(\S+/m2\): its files \(weights, configs, "
                                          r"tokenizer files\) changed since the checkpoint was written"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=4, checkpoint=ck, resume=True)
    with pytest.raises(ConfigError, match=r"another run \(model 0 \S+/m1 there, \S+/m2 now; model 1 \S+/m2 there, "):
        tiesmerge.adapt(base, fts[::-1], files, forward=_forward(), steps=4, checkpoint=ck, resume=True)


def test_a_search_logs_refusal_names_the_model_that_differs(tmp_path, monkeypatch):
    """hp41 C38: a link given as --model, moved from one model to another between runs, was refused as "it differs
    in: models, weights": no model named, and "weights" read as the --weights option."""
    import os

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, a, b = _family_dirs(tmp_path)
    monkeypatch.chdir(tmp_path)
    os.symlink("ft0", "cur")
    grid, log = {"density": (0.5,), "lam": (1.0,)}, str(tmp_path / "log.jsonl")
    run_search(base, ["cur", b], "ties", lambda state: 1.0, grid=grid, log=log)
    os.remove("cur")
    import shutil

    shutil.copytree(b, tmp_path / "ft2")  # another model (pointing at b would list it twice: refused first)
    os.symlink("ft2", "cur")
    with pytest.raises(ConfigError) as caught:
        run_search(base, ["cur", b], "ties", lambda state: 1.0, grid=grid, log=log)
    message = str(caught.value)
    assert f"model 0 {a} there, {tmp_path / 'ft2'} now" in message, message
    # another model: its files' stamps differ with it, not said again as "changed" (hp48 c43)
    assert "changed since the log was started" not in message
    assert "model 1" not in message
    with pytest.raises(ConfigError, match=r"differs in: axis density: values \[0.5\] there, \[0.3\] now\)"):
        run_search(base, ["ft0", b], "ties", lambda state: 1.0, grid={"density": (0.3,), "lam": (1.0,)}, log=log)


def test_a_refused_search_log_is_not_left_locked(tmp_path):
    """Found by the test above: in-process, a search refused as another search's kept the log locked until the
    refused object was collected (a traceback held it), so the corrected call was refused as "another search is
    writing this log now"."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, a, b = _family_dirs(tmp_path)
    log = str(tmp_path / "log.jsonl")
    run_search(base, [a, b], "ties", lambda state: 1.0, grid={"density": (0.5,), "lam": (1.0,)}, log=log)
    with pytest.raises(ConfigError) as kept:  # the traceback (and the refused log object) stays alive here
        run_search(base, [b, a], "ties", lambda state: 1.0, grid={"density": (0.5,), "lam": (1.0,)}, log=log)
    scored = []
    run_search(base, [a, b], "ties", lambda state: 1.0, grid={"density": (0.5, 0.7), "lam": (1.0,)}, log=log + "2",
               on_trial=scored.append)
    run_search(base, [a, b], "ties", lambda state: 1.0, grid={"density": (0.5,), "lam": (1.0,)}, log=log,
               on_trial=scored.append)
    # the second log: 2 scored; this one: resumed, its one candidate scored again to check the log
    assert len(scored) == 3 and kept.value is not None


def test_a_non_finite_api_score_is_said_never_to_win(tmp_path):
    """hp41 C3: in the API (which keeps NaN and inf scores; the CLI refuses them), a trial scoring +inf did not win
    and nothing said why: best was 2.0 while a trial had scored inf."""
    import math

    from tiesmerge.errors import MergeWarning
    from tiesmerge.tuning import run_search

    base, a, b = _family_dirs(tmp_path)
    scores = iter([math.inf, 1.0, 2.0])

    def returns_inf_first(state):
        return next(scores)

    with pytest.warns(MergeWarning, match=r"returns_inf_first returned inf: a score that is not a finite number never "
                                          r"wins .* so the best is the best finite score"):
        result = run_search(base, [a, b], "ties", returns_inf_first, grid={"density": (0.2, 0.5, 0.8), "lam": (1.0,)})
    assert result.best.score == 2.0


@pytest.mark.parametrize("label, said", [(1.0, "got 1.0 (float, not an integer)"),
                                         (True, "got True (bool, not an integer)"),
                                         ("1", "got '1' (str, not an integer)")])
def test_a_label_in_range_but_no_integer_is_said_to_be_no_integer(tmp_path, bert_tokenizer, label, said):
    """hp41 C23: label 1.0 or true was "'label' must be 0..1, got 1.0": 1.0 is in 0..1; the problem is its type."""
    import json

    from test_hostile_fortieth_pass_evaluators import _bert_classifier
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import ClassifierAccuracy

    _bert_classifier(tmp_path / "cls", bert_tokenizer)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "the cat", "label": label}) + "\n")
    with pytest.raises(ConfigError, match=r"d\.jsonl:1: 'label' must be an integer from 0 to 1, " + said.replace(
            "(", r"\(").replace(")", r"\)")):
        ClassifierAccuracy(tmp_path / "cls", data)


def test_a_data_line_naming_a_key_twice_is_refused(tmp_path, bert_tokenizer):
    """hp41 C24: {"text": "good", "label": 1, "label": 0} was read as label 0 without a word (JSON keeps the last);
    whichever was meant, the line is a mistake. Refused naming the file, the line and the key."""
    from test_hostile_fortieth_pass_evaluators import _bert_classifier
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import ClassifierAccuracy

    _bert_classifier(tmp_path / "cls", bert_tokenizer)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "the cat", "label": 0}\n{"text": "good", "label": 1, "label": 0}\n')
    with pytest.raises(ConfigError, match=r"d\.jsonl:2: an object gives the key 'label' twice"):
        ClassifierAccuracy(tmp_path / "cls", data)
    data.write_text('{"text": "the cat", "label": 0, "meta": {"a": 1, "a": 2}}\n')  # nested objects too
    with pytest.raises(ConfigError, match=r"d\.jsonl:1: an object gives the key 'a' twice"):
        ClassifierAccuracy(tmp_path / "cls", data)


@pytest.mark.parametrize("values, said", [(["", "y"], "--task-names: value 1 of 2 is empty"),
                                          (["x", ""], "--task-names: value 2 of 2 is empty"),
                                          ([""], "--task-names is empty")])
def test_an_empty_value_of_a_many_valued_option_is_named_by_its_place(tmp_path, capsys, values, said):
    """hp41 C58: `--task-names '' y` was "--task-names is empty", though only one of its two names is."""
    from helpers_ckpt import run_cli

    base, a, b = _family_dirs(tmp_path)
    rc, _, err = run_cli(["adapt", "--base", base, "--model", a, "--model", b, "--data", "x.jsonl", "--data",
                          "y.jsonl", "--task-names", *values, "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and f"error: {said}\n" in err, err
    assert not (tmp_path / "out").exists()


def test_a_written_files_folder_that_is_a_file_is_said_to_be_a_file(tmp_path):
    """hp41 C36: `--json x.json/y` with x.json a file said "--json's folder .../x.json does not exist" (it does)."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file

    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(OutputError, match=r"--json's folder \S+/x\.json/z does not exist: \S+/x\.json is a file, not "
                                          r"a folder"):
        check_output_file(tmp_path / "x.json" / "z" / "y", False, [], "--json")
    assert (tmp_path / "x.json").read_text() == "{}"


@pytest.mark.parametrize("how, field", [("copy", "modules_to_save"), ("factors", "target_modules")])
def test_an_adapter_on_a_tied_head_is_told_which_field_holds_the_head(tmp_path, how, field):
    """hp41 C30: a GPT-2 LoRA with modules_to_save=["lm_head"] (a whole copy of the tied head) was refused with the
    hint "train the adapter without lm_head in target_modules", a field that did not hold it."""
    import torch

    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_base
    from tiesmerge.errors import IncompatibleCheckpointsError

    base = make_base()
    head = base.pop("lm_head.weight")  # tied: the base stores only the embedding
    b = write_hf_dir(tmp_path / "base", base, config={"tie_word_embeddings": True})
    factors = random_lora(base, 2, seed=1)
    extra, config = {}, {}
    if how == "copy":
        extra, config = {"lm_head.weight": head + 0.1}, {"modules_to_save": ["lm_head"]}
    else:
        factors["lm_head"] = (torch.randn(2, 8), 0.1 * torch.randn(32, 2))
    lora = write_lora_dir(tmp_path / "lora", factors, alpha=4, extra=extra, config=config)
    with pytest.raises(IncompatibleCheckpointsError, match="does not store: it ties the head") as caught:
        tiesmerge.merge(b, [lora], "task_arithmetic", lam=1.0)
    assert caught.value.hint.endswith(f"train the adapter without lm_head in {field}")


@pytest.mark.parametrize("weights", [(0.5,), (0.5, 0.5, 0.5)])
def test_a_held_per_model_option_of_the_wrong_count_is_refused_before_any_candidate(tmp_path, weights):
    """hp41 C84: `search --axis density --set weights=0.5` with 2 models failed in candidate 0's merge ("candidate 0:
    ties: 1 weights given for 2 models"); the count is --set's and is checked with the space."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    base, a, b = _family_dirs(tmp_path)
    scored = []
    with pytest.raises(ConfigError, match=rf"the held weights \(--set weights=\.\.\.\) gives {len(weights)} value\(s\) "
                                          r"for 2 models"):
        run_search(base, [a, b], "ties", lambda state: scored.append(1) or 1.0, grid={"density": (0.2,)},
                   fixed={"weights": weights})
    assert scored == []


def test_thousands_of_slerp_filters_make_lines_not_pages(tmp_path, capsys):
    """hp41 C64: a mergekit slerp recipe of 9,000 filters printed a 440,000-character warning (the filters that
    match nothing) and a 431,000-character "semantics:" line; validate printed t_by_name whole. Each lists the first
    few and counts the rest (the recipe and the manifest keep them all)."""
    from test_recipe_mergekit_family import _family
    from tiesmerge.cli.main import main

    paths, _ = _family(tmp_path, n=1, layers=2)
    rules = "".join(f"    - filter: nowhere{k}\n      value: 0.3\n" for k in range(600))
    recipe = tmp_path / "many.yaml"
    recipe.write_text(f"merge_method: slerp\nbase_model: {paths['base']}\nmodels: [{{model: {paths['base']}}}, "
                      f"{{model: {paths['m1']}}}]\nparameters:\n  t:\n{rules}    - value: 0.5\ndtype: float32\n")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    merged = capsys.readouterr()
    assert main(["validate", str(recipe)]) == 0
    validated = capsys.readouterr()
    lines = [*merged.out.splitlines(), *merged.err.splitlines(), *validated.out.splitlines(),
             *validated.err.splitlines()]
    assert max(len(line) for line in lines) < 1000, max(lines, key=len)[:300]
    assert "and 592 more match no tensor" in merged.err
    assert "and 593 more (all in t_by_name)" in merged.out
    assert "characters in all)" in validated.out
    manifest = (tmp_path / "out" / "tiesmerge.json").read_text()
    assert "nowhere599=0.3" in manifest  # the whole schedule is kept where it is read back


def test_a_float64_range_refusal_says_of_how_many_values_it_counts(tmp_path):
    """hp41 C26: float64 models whose every entry was ±1e300: one command said "1024 value(s)" (the rows it had
    sampled), the other "4096" (the whole tensor), neither saying which. A count of a part says so."""
    import numpy as np

    from tiesmerge.engine.reader import check_float32_range
    from tiesmerge.errors import InvalidTensorError

    values = np.full(1024, 1e300)
    with pytest.raises(InvalidTensorError, match=r"\(1,024 value\(s\) among the 1,024 read of its 4,096, the largest "
                                                 r"of magnitude 1e\+300"):
        check_float32_range("m/model.safetensors", "w", (64, 64), values)
    with pytest.raises(InvalidTensorError, match=r"\(4,096 value\(s\), the largest of magnitude 1e\+300"):
        check_float32_range("m/model.safetensors", "w", (64, 64), np.full(4096, 1e300))


def test_encoder_accuracy_scores_the_encoder_of_a_sequence_classification_base(tmp_path, bert_tokenizer):
    """hp41 C49: encoder-accuracy on a BertForSequenceClassification base failed after the first merge ("the merged
    model has tensors the model built from the base does not: bert.embeddings..."). The encoder is read as
    transformers reads such a checkpoint into AutoModel (bert. stripped, the classifier left out), and what it
    scores is the candidate's encoder, not the base's."""
    import json

    import torch

    from test_hostile_fortieth_pass_evaluators import _bert_classifier
    from tiesmerge.evaluation.builtin import _MODELS, EncoderAccuracy

    model = _bert_classifier(tmp_path / "cls", bert_tokenizer)
    data = tmp_path / "enc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"task": "t", "classes": ["the cat sat", "a dog ran"]}, {"task": "t", "text": "the cat", "label": 0},
        {"task": "t", "text": "a dog", "label": 1}]))
    scorer = EncoderAccuracy(tmp_path / "cls", data, device="cpu")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert 0.0 <= scorer(state) <= 1.0
    encoder = next(v[0] for k, v in _MODELS.items() if k[0] == "encoder" and k[1] == str(tmp_path / "cls"))
    changed = {k: (v + 1.0 if k == "bert.embeddings.word_embeddings.weight" else v) for k, v in state.items()}
    scorer(changed)
    assert torch.equal(encoder.model.state_dict()["embeddings.word_embeddings.weight"],
                       changed["bert.embeddings.word_embeddings.weight"])


def test_lm_perplexity_on_text_its_tokenizer_does_not_know_is_warned(tmp_path):
    """hp41 C80: a text whose every word was <unk> to the tokenizer was scored without a word: every candidate is
    then ranked on how well it predicts <unk> after <unk>."""
    import warnings

    pytest.importorskip("transformers")
    from test_hostile_fortieth_pass_evaluators import _llama
    from tiesmerge.errors import MergeWarning
    from tiesmerge.evaluation.builtin import LMPerplexity

    _llama(tmp_path / "lm")
    (tmp_path / "unknown.txt").write_text("zzz qqq xxx " * 10)
    with pytest.warns(MergeWarning, match=r"unknown\.txt: 100% of the text's 30 tokens are unknown to the base's "
                                          r"tokenizer \(<unk>\)"):
        LMPerplexity(tmp_path / "lm", tmp_path / "unknown.txt")
    (tmp_path / "known.txt").write_text("the cat sat on a mat " * 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        LMPerplexity(tmp_path / "lm", tmp_path / "known.txt")


def test_analyze_says_when_ties_at_the_threshold_keep_far_more_than_the_density(tmp_path):
    """hp41 C44: task vectors of ±0.01 everywhere (float32 leaves a few distinct magnitudes) keep 100% at density
    0.2 under TIES's keep-every-tie rule; analyze said "trimmed to their top 20.0%" and nothing of the ties."""
    import torch

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(32, 32, generator=g)}
    models = [{"w": base["w"] + 0.01 * torch.sign(torch.randn(32, 32, generator=g))} for _ in range(2)]
    exact = [{"w": base["w"] + torch.randn(32, 32, generator=g)} for _ in range(2)]
    # (base + 0.01) - base in float32 takes a handful of magnitudes, the smallest shared by more than 20% of entries
    tied = tiesmerge.analyze({"w": torch.zeros(32, 32)}, [{"w": m["w"] - base["w"]} for m in models], density=0.2)
    said = [line for line in tied["summary"] if "tie at the trim's threshold" in line]
    assert len(said) == 1 and "keep 100.0% to 100.0% of their entries, not 20.0%" in said[0], tied["summary"]
    plain = tiesmerge.analyze(base, exact, density=0.2)
    assert not any("tie at the trim's threshold" in line for line in plain["summary"])


def test_a_mergekit_linear_without_normalize_whose_weights_do_not_sum_to_1_merges_as_mergekit(tmp_path, capsys):
    """hp41 C19: mergekit `linear` with normalize: false and weights 0.7, -0.2 and 0.35 on the base (sum 0.85) was
    refused as inexpressible, though `average --base-weight --no-normalize-weights` computes exactly that (and was
    bit-equal to mergekit 0.1.5 when measured). Merged as mergekit merges it, the scale said."""
    import torch
    from safetensors.torch import load_file

    from test_recipe_mergekit_family import _family
    from tiesmerge.cli.main import main

    paths, states = _family(tmp_path, n=2)
    recipe = tmp_path / "lin.yaml"
    recipe.write_text(f"merge_method: linear\nbase_model: {paths['base']}\nmodels:\n"
                      f"  - {{model: {paths['m1']}, parameters: {{weight: 0.7}}}}\n"
                      f"  - {{model: {paths['m2']}, parameters: {{weight: -0.2}}}}\n"
                      f"  - {{model: {paths['base']}, parameters: {{weight: 0.35}}}}\n"
                      "parameters: {normalize: false}\ndtype: float32\n")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "sum to 0.85, not 1, so the merge Σ w_i θ_i is the models' values scaled by about 0.85" in \
        capsys.readouterr().err  # said by the engine, for flags and recipes alike (hp79a c34)
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name, value in merged.items():
        expected = 0.7 * states["m1"][name] - 0.2 * states["m2"][name] + 0.35 * states["base"][name]
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)


def test_slerps_layers_warning_does_not_call_the_tensors_count_config_jsons(tmp_path):
    """hp41 C51: a mergekit recipe's base config.json said 10^12 layers, its tensors 2; the warning said "--layers 2
    (config.json's num_hidden_layers)": 2 is the tensors' count, and config.json is where the wrong number is."""
    from tiesmerge.errors import MergeWarning
    from tiesmerge.methods import Slerp

    method = Slerp(t_by_name="*=0,0.5,1", layers=10**12, anchor="base")
    with pytest.warns(MergeWarning) as said:
        method.check_tensors({"model.layers.0.mlp.weight": (4, 4), "model.layers.1.mlp.weight": (4, 4)})
    text = " ".join(str(w.message) for w in said)
    assert "layers is 1,000,000,000,000, but the model's tensors name layers 0 to 1 (2 layers)" in text
    assert "layers 2 (--layers 2), the count the tensors hold" in text and "check its num_hidden_layers" in text
    assert "(config.json's num_hidden_layers) spreads" not in text


def _score_with(state, extra=None):
    return 1.0


def _closure_over(value):
    """An evaluator closing over ``value``, as a factory of the user's makes one."""
    def inner(state):
        return _score_with(state, extra=value)
    return inner


class _StrRaises(str):
    def __repr__(self):
        raise RuntimeError("no repr")


class _FloatRaises(float):
    def __repr__(self):
        raise RuntimeError("no repr")


class _EndlessList(list):
    def __iter__(self):
        import itertools

        return itertools.count()


class _KeyRaises(dict):
    def __getitem__(self, key):
        raise KeyError(key)


def _odd_values():
    """(name, maker(sign)): values an evaluator may be built with that broke the digest in hostile pass 42."""
    import numpy as np
    import torch

    return [
        ("huge int", lambda s: 10 ** 5000 * int(s)),  # D5: past Python's 4,300-digit decimal limit
        ("object array of a huge int", lambda s: np.array([10 ** 5000 * int(s)], dtype=object)),
        ("str subclass whose repr raises", lambda s: _StrRaises(str(s))),  # D6
        ("float subclass whose repr raises", lambda s: _FloatRaises(s)),
        ("conjugate view", lambda s: torch.tensor([1 + 1j, 2 - 1j * s]).conj()),  # D7
        ("negative view", lambda s: torch._neg_view(torch.tensor([1.0, 2.0 * s]))),
        ("nested tensor", lambda s: torch.nested.nested_tensor([torch.ones(2) * s, torch.ones(3)])),
        ("quantized tensor", lambda s: torch.quantize_per_tensor(torch.tensor([0.5, 1.0 * s]), 0.1, 0, torch.qint8)),
        ("dict whose getitem raises", lambda s: _KeyRaises(a=s)),  # D9
        ("sparse COO tensor", lambda s: torch.tensor([[0.0, s], [2.0, 0.0]]).to_sparse()),  # D12
        ("sparse CSR tensor", lambda s: torch.tensor([[0.0, s], [2.0, 0.0]]).to_sparse_csr()),
        ("tensor subclass", lambda s: torch.ones(2).mul(s).as_subclass(type("T", (torch.Tensor,), {}))),
        ("datetime64 array", lambda s: np.array(["2020-01-01" if s > 0 else "2021-01-01"], dtype="datetime64[D]")),
        ("structured array", lambda s: np.array([(1, s)], dtype=[("a", "i4"), ("b", "f8")])),
        ("numpy int64", lambda s: np.int64(s)),  # D11: numpy values in a closure failed the first run
        ("numpy bool", lambda s: np.bool_(s > 0)),
        ("0-d array", lambda s: np.array(s)),
        ("array", lambda s: np.array([s, 2.0, 3.0])),
    ]


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch's own: quantized tensors deprecated, sparse CSR in beta
@pytest.mark.parametrize("name, make", _odd_values(), ids=[n for n, _ in _odd_values()])
@pytest.mark.parametrize("how", ["partial", "closure"])
def test_the_evaluator_digest_reads_every_value_and_tells_them_apart(name, make, how):
    """hp42 D5–D12: a partial or closure holding a 5,000-digit int, a str or float subclass whose repr raises, a
    conjugate or negative view, a nested tensor, a dict subclass whose __getitem__ raises, or a numpy value (D11, a
    regression: `h not in ([], None)` on an array raised in the first run) ended the search as "a bug in tiesmerge";
    a sparse tensor counted by its shape only (D12: another sign resumed). Each is read through its base type, and
    another value gives another digest."""
    import functools

    from tiesmerge.tuning.evaluator_digest import evaluator_state

    def build(sign):
        value = make(sign)
        if how == "partial":
            return functools.partial(_score_with, extra=value)

        def inner(state):
            return _score_with(state, extra=value)
        return inner

    plus, minus = evaluator_state(build(1.0)), evaluator_state(build(-1.0))
    if how == "closure" and name == "dict whose getitem raises":  # a closure's dicts are left out (a cache as often
        assert plus is None and minus is None  # as a setting): nothing to read, and nothing raised
        return
    assert plus is not None and plus == evaluator_state(build(1.0))
    if name not in ("str subclass whose repr raises",):  # "1.0" and "-1.0": told apart too, by their characters
        assert plus != minus, name
    assert evaluator_state(build(1.0)) != minus


def test_the_evaluator_digest_of_an_endless_list_ends():
    """hp42 D8: a list subclass whose __iter__ never ends hung the search at start (100% CPU until killed); the
    digest iterates the list's own items."""
    import functools

    from tiesmerge.tuning.evaluator_digest import evaluator_state

    assert evaluator_state(functools.partial(_score_with, extra=_EndlessList([1]))) != \
        evaluator_state(functools.partial(_score_with, extra=_EndlessList([2])))


class _Signed:
    def __init__(self, sign):
        self.sign = sign

    def score(self, state):
        return self.sign

    def __call__(self, state):
        return self.sign


def _wraps(fn):
    import functools

    @functools.wraps(fn)
    def wrapper(state):
        return fn(state)
    return wrapper


@pytest.mark.parametrize("how", ["partial of a bound method", "partial of a callable object",
                                 "wraps around a bound method", "lambda over a bound method"])
def test_a_resume_whose_evaluator_holds_an_object_is_warned(tmp_path, how):
    """hp42 D29: functools.partial(E(sign).score), partial(C(sign)), a functools.wraps decorator around a bound
    method and a lambda over one resumed with another sign silently (a bare bound method or object is warned since
    hp41 C5): the object's attributes decide the scores and are not digested."""
    import functools

    from tiesmerge.errors import ConfigError, MergeWarning
    from tiesmerge.tuning import run_search

    def build(sign):
        obj = _Signed(sign)
        return {"partial of a bound method": lambda: functools.partial(obj.score),
                "partial of a callable object": lambda: functools.partial(obj),
                "wraps around a bound method": lambda: _wraps(obj.score),
                "lambda over a bound method": lambda: (lambda m: (lambda state: m(state)))(obj.score)}[how]()

    base, a, b = _family_dirs(tmp_path)
    grid, log = {"density": (0.5,), "lam": (1.0,)}, str(tmp_path / "log.jsonl")
    run_search(base, [a, b], "ties", build(1.0), grid=grid, log=log)
    with pytest.warns(MergeWarning, match=r"1 logged scores of an evaluator whose scores may depend on a _Signed "
                                          r"object it holds"), \
            pytest.raises(ConfigError, match="now where the log records"):  # the candidate scored again differs
        run_search(base, [a, b], "ties", build(-1.0), grid=grid, log=log)


def test_a_search_with_an_evaluator_closing_over_numpy_values_runs(tmp_path):
    """hp42 D11 end to end: the first run of a search whose evaluator closes over np.float64 failed before scoring
    ("The truth value of an empty array is ambiguous")."""
    import numpy as np

    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning import run_search

    def make(threshold):
        def score(state):
            return float(threshold)
        return score

    base, a, b = _family_dirs(tmp_path)
    grid, log = {"density": (0.5,), "lam": (1.0,)}, str(tmp_path / "log.jsonl")
    assert run_search(base, [a, b], "ties", make(np.array([1.0, 2.0])[0]), grid=grid, log=log).best.score == 1.0
    with pytest.raises(ConfigError, match="what the evaluator was built with"):
        run_search(base, [a, b], "ties", make(np.float64(2.0)), grid=grid, log=log)


def _encoder_dir(tmp_path, bert_tokenizer):
    from test_hostile_fortieth_pass import _encoder_family

    return _encoder_family(tmp_path, bert_tokenizer, n=0)[0]  # a BertModel of 32 positions


def test_class_descriptions_that_differ_only_past_what_the_encoder_reads_are_refused(tmp_path, bert_tokenizer):
    """hp42 D2: encoder-accuracy with two 81-word class descriptions differing in the last word, on a 64-position
    encoder: both are cut to the same tokens, so every candidate scored 1.0 (labels 0) or 0.0 (labels 1)."""
    import json

    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import EncoderAccuracy

    model = _encoder_dir(tmp_path, bert_tokenizer)
    words = ["the"] * 40
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"task": "t", "classes": [" ".join([*words, "cat"]), " ".join([*words, "dog"])]},
        {"task": "t", "text": "the cat", "label": 0}]))
    with pytest.raises(ConfigError, match=r"long\.jsonl: task 't': the class descriptions .* are the same in their "
                                          r"first 32 tokens, all the model reads"):
        EncoderAccuracy(model, data)


@pytest.mark.parametrize("case", ["alike", "cut"])
def test_adapts_heads_that_the_encoder_cannot_tell_apart_are_refused(tmp_path, bert_tokenizer, case):
    """hp42 D3, D27: adapt --forward encoder with --heads ["GOOD", "good"] (a lower-casing tokenizer) or two long
    descriptions differing past the encoder's positions was accepted; the task's entropy stayed log 2 at every step,
    so it steered nothing."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.forward import load_forward

    model = _encoder_dir(tmp_path, bert_tokenizer)
    words = " ".join(["the"] * 40)
    heads = {"t1": ["CAT", "cat"] if case == "alike" else [f"{words} cat", f"{words} dog"], "t2": ["cat", "dog"]}
    said = "are the same tokens to the base's tokenizer" if case == "alike" else \
        "are the same in their first 32 tokens, all the model reads"
    with pytest.raises(ConfigError, match=rf"--heads, task 't1': the class descriptions .* {said}"):
        load_forward("encoder", model, heads=heads)
    load_forward("encoder", model, heads={"t1": ["cat", "dog"], "t2": ["cat", "dog"]})  # apart: built


def test_adapts_choices_that_the_model_cannot_tell_apart_are_refused(tmp_path):
    """hp42 D3, D59: adapt --forward choice with --choices ["zzz", "qqq"] (both <unk>), or rows whose own choices are
    ["good", "good"] or two unknown words, was accepted and steered nothing."""
    from test_hostile_fortieth_pass_evaluators import _llama
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.forward import load_forward

    _llama(tmp_path / "lm")
    with pytest.raises(ConfigError, match=r"--choices, task 't1': the choices 'zzz' and 'qqq' are the same tokens"):
        load_forward("choice", tmp_path / "lm", choices={"t1": ["zzz", "qqq"]})
    forward = load_forward("choice", tmp_path / "lm", choices={"t1": ["cat", "dog"]})
    with pytest.raises(ConfigError, match=r"task 't2', example 2: the choice 'cat' is listed twice"):
        forward.check_rows([{"text": "the", "choices": ["cat", "dog"]}, {"text": "the", "choices": ["cat", "cat"]}],
                           "t2")
    with pytest.raises(ConfigError, match=r"task 't2', example 1: the choices 'zzz' and 'qqq' are the same tokens"):
        forward.check_rows([{"text": "the", "choices": ["zzz", "qqq"]}], "t2")


def test_adapts_heads_file_holding_half_a_surrogate_pair_is_refused_naming_it(tmp_path):
    """hp42 D46: a --heads or --choices file holding "\\ud800" (valid JSON, no text) failed in the tokenizer, as
    "the model fails in its forward pass ... use the model's original config" or as a bug in tiesmerge."""
    from tiesmerge.cli.adapt import _json_mapping
    from tiesmerge.errors import ConfigError

    path = tmp_path / "heads.json"
    path.write_text('{"t1": ["good", "bad \\ud800"], "t2": ["a", "b"]}')
    with pytest.raises(ConfigError, match=r"heads\.json: the heads: 'bad \\ud800' holds \\ud800, half of a UTF-16 "
                                          r"surrogate pair"):
        _json_mapping(str(path), "the heads")


def _linear_recipe(tmp_path, with_base_listed=False):
    """A mergekit linear recipe on base_model (weight 0.5 shared), models m1 (0.6) and m2 (0.4); each model's
    config.json and generation_config.json carry its own tag."""
    import json

    from test_recipe_mergekit_family import _family

    paths, states = _family(tmp_path, n=2)
    for name, p in paths.items():
        (p / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2, "my_tag": name}))
        (p / "generation_config.json").write_text(json.dumps({"max_length": {"base": 111, "m1": 222, "m2": 333}[name]}))
    recipe = tmp_path / "lin.yaml"
    recipe.write_text(f"merge_method: linear\nbase_model: {paths['base']}\nmodels:\n"
                      f"  - {{model: {paths['m1']}, parameters: {{weight: 0.6}}}}\n"
                      f"  - {{model: {paths['m2']}, parameters: {{weight: 0.4}}}}\n"
                      "parameters: {weight: 0.5}\ndtype: float32\n")
    return recipe, paths, states


def test_a_mergekit_linear_recipes_output_takes_base_models_config_and_tokenizer(tmp_path, capsys):
    """hp42 C54: a mergekit linear recipe with base_model wrote the first listed model's config.json and
    generation_config.json (the translation reads that model as the engine's base); mergekit writes base_model's.
    The output's files are base_model's, and the card's recipe re-runs to the same output."""
    import json

    from tiesmerge.cli.main import main

    recipe, paths, _ = _linear_recipe(tmp_path)
    out = tmp_path / "out"
    assert main(["merge", str(recipe), "-o", str(out), "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["my_tag"] == "base"
    assert json.loads((out / "generation_config.json").read_text())["max_length"] == 111
    manifest = json.loads((out / "tiesmerge.json").read_text())
    assert manifest["recipe"]["files_from"] == str(paths["base"])
    rerun = tmp_path / "rerun.yaml"  # the manifest's recipe, as the card gives it
    import yaml

    rerun.write_text(yaml.safe_dump(manifest["recipe"]))
    assert main(["merge", str(rerun), "-o", str(tmp_path / "again"), "--no-progress"]) == 0
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "again" / "config.json").read_text())["my_tag"] == "base"


def test_a_recipes_files_from_must_be_one_of_its_inputs(tmp_path):
    """files_from names the input whose files are copied: a folder that is no input of the merge is refused (its
    files would be copied without the checks the inputs get)."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.recipe import recipe_from_dict

    base, a, b = _family_dirs(tmp_path)
    data = {"method": "ties", "base": base, "models": [a, b]}
    assert recipe_from_dict({**data, "files_from": a}).files_from == a
    with pytest.raises(ConfigError, match="files_from .* must be the base or one of the models"):
        recipe_from_dict({**data, "files_from": str(tmp_path)})
    with pytest.raises(ConfigError, match="neither the base nor one of the models"):
        tiesmerge.merge(base, [a, b], output=tmp_path / "out", files_from=tmp_path)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, said", [(["--method", "ties"], "--method over a mergekit recipe"),
                                         (["--base-weight", "0.9"], "--base-weight over a mergekit recipe: .* so "
                                                                    "--base-weight would set that model's weight")])
def test_method_flags_over_a_mergekit_linear_recipe_are_refused(tmp_path, capsys, flags, said):
    """hp42 C5, C45: `merge linear.yaml --method ties` ran TIES with the first listed model as the base and
    base_model merged as a fine-tune; `--base-weight 0.9` set the first model's weight, not base_model's."""
    from helpers_ckpt import run_cli

    recipe, _, _ = _linear_recipe(tmp_path)
    rc, _, err = run_cli(["merge", str(recipe), *flags, "-o", str(tmp_path / "out")], capsys)
    import re

    assert rc == 2 and "error:" in err and re.search(said, err), err
    assert not (tmp_path / "out").exists()


def test_a_data_file_mixing_lines_with_and_without_a_text_pair_is_refused(tmp_path, bert_tokenizer):
    """hp42 D55, C61: in a file where some lines have text_pair and others not, a batch holding one line without a
    pair was encoded without any pair (classifier-accuracy, adapt's classifier forward, stats fisher), so the result
    depended on the batch size. Refused naming the line, in each reader."""
    import json

    from test_hostile_fortieth_pass_evaluators import _bert_classifier
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import ClassifierAccuracy
    from tiesmerge.evaluation.forward import ClassifierLogits
    from tiesmerge.stats.hf import read_jsonl

    model = _bert_classifier(tmp_path / "cls", bert_tokenizer)
    data = tmp_path / "mixed.jsonl"
    rows = [{"text": "the cat", "text_pair": "a dog", "label": 0}, {"text": "the dog", "label": 1}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    said = r"mixed\.jsonl:2: no 'text_pair', while 1 other line\(s\) have one \(line 1 first\)"
    with pytest.raises(ConfigError, match=said):
        ClassifierAccuracy(tmp_path / "cls", data)
    with pytest.raises(ConfigError, match=said):
        read_jsonl(data)
    with pytest.raises(ConfigError, match=r"task 't': 1 of 2 examples have a 'text_pair' and the others none"):
        ClassifierLogits(model, bert_tokenizer).encode(rows, "t")
    assert ClassifierLogits(model, bert_tokenizer).encode(rows[:1], "t")["input_ids"].shape[0] == 1  # all paired: ok


@pytest.mark.parametrize("given, needs", [("heads", "encoder"), ("choices", "choice")])
def test_heads_or_choices_for_another_forward_are_refused(tmp_path, given, needs):
    """hp42 D60: adapt with --heads or --choices and the default classifier forward was accepted; the file was not
    read, and the manifest recorded it as a forward setting."""
    from test_adapt_hostile import _forward, _setup
    from tiesmerge.errors import ConfigError

    base, fts, files = _setup(tmp_path)
    labels = {"task0": ["a", "b"], "task1": ["a", "b"]}
    with pytest.raises(ConfigError, match=rf"--{given} applies to --forward {needs}, and the forward is"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, **{given: labels})


def test_gram_statistics_of_a_masked_lm_are_named_as_its_checkpoint(tmp_path, bert_tokenizer):
    """hp42 C47: `stats gram` on a BertForMaskedLM (and a GPT2LMHeadModel) loaded it as AutoModel, whose weights
    lose their "bert." prefix, and refused it with a hint to set config.json's architectures, which already named
    the class. The declared language-model class is loaded; GPT-2, whose layers are Conv1D and whose head is tied,
    is refused as having nothing RegMean can use."""
    import json

    import torch
    import transformers

    from tiesmerge.errors import ConfigError
    from tiesmerge.stats.hf import hf_statistics

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(bert_tokenizer), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    transformers.BertForMaskedLM(cfg).save_pretrained(tmp_path / "mlm")
    bert_tokenizer.save_pretrained(tmp_path / "mlm")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("the cat sat", "a dog ran")))
    stats = hf_statistics("gram", tmp_path / "mlm", data)
    names = list(stats.tensors)
    assert names and all(n.startswith(("bert.", "cls.")) for n in names), names[:4]
    gpt = transformers.GPT2Config(vocab_size=len(bert_tokenizer), n_embd=16, n_layer=1, n_head=2, n_positions=32)
    transformers.GPT2LMHeadModel(gpt).save_pretrained(tmp_path / "gpt")
    bert_tokenizer.save_pretrained(tmp_path / "gpt")
    with pytest.raises(ConfigError, match=r"every layer RegMean could use is transformers' Conv1D"):
        hf_statistics("gram", tmp_path / "gpt", data)


def test_the_folder_matplotlib_is_imported_in_is_named_so_a_later_run_can_remove_it(tmp_path, monkeypatch):
    """hp42 C62: a run killed while matplotlib was imported left /tmp/tiesmerge-matplotlib-cwd-XXXX, a name without
    host or pid, which no later run could tell was dead. The folder is a private one (host and pid in its name),
    removed after the import, and a dead run's is removed by the next."""
    import os
    import subprocess
    import sys

    from tiesmerge import scratch

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    code = ("import os, sys; sys.modules.pop('matplotlib', None); import tiesmerge.scratch as s; "
            "s.discard = lambda f: (print(f), os._exit(9)); "  # killed before it could remove it
            "from tiesmerge.plotting import pyplot; pyplot('a test')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    left = done.stdout.strip()
    assert done.returncode == 9 and os.path.isdir(left), done.stderr[-500:]
    assert os.path.basename(left).startswith(f"tiesmerge-matplotlib-{scratch.host_tag()}-")
    scratch.private_folder("tiesmerge-torch-")  # any later run's first private folder removes the dead run's
    assert not os.path.exists(left)


def test_validating_a_recipe_that_lists_one_model_many_times_opens_it_once(tmp_path, monkeypatch, capsys):
    """hp42 C14: a 3 KB recipe listing one model 300 times took 45 s to say "listed twice" (3000 times: over 300 s):
    every entry's 2 MB header was parsed again before the duplicate was reported. Each folder is opened once."""
    import tiesmerge.io.checkpoint as checkpoint
    from tiesmerge.cli.main import main

    base, a, _ = _family_dirs(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: task_arithmetic\nbase: {base}\nmodels:\n" + f"  - {a}\n" * 200)
    opened = []
    real = checkpoint.open_checkpoint

    def counting(source, *args, **kwargs):
        opened.append(str(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "open_checkpoint", counting)
    assert main(["validate", str(recipe)]) != 0
    assert "model 1 is listed twice (also model 0)" in capsys.readouterr().err
    assert opened.count(a) < 10, len(opened)  # a few checks, not one per entry (200 listed)


def test_a_mergekit_linear_recipe_without_dtype_writes_base_models_dtype(tmp_path, capsys):
    """hp42 C68: a mergekit linear recipe without dtype, its first model stored in bfloat16 and base_model in
    float32, wrote bfloat16 (the engine's base is the first model); mergekit writes float32, base_model's."""
    from safetensors.torch import load_file, save_file

    from tiesmerge.cli.main import main

    recipe, paths, states = _linear_recipe(tmp_path)
    save_file({k: v.bfloat16() for k, v in states["m1"].items()}, str(paths["m1"] / "model.safetensors"))
    recipe.write_text(recipe.read_text().replace("dtype: float32\n", ""))
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "no dtype given: the output is float32, the models' dtypes promoted" in capsys.readouterr().err
    assert {str(v.dtype) for v in load_file(str(tmp_path / "out" / "model.safetensors")).values()} == \
        {"torch.float32"}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "task_arithmetic", "average"])
def test_per_model_weights_whose_sum_passes_float32_are_refused(tmp_path, method):
    """hp42 C70: TIES with weights 2e38 and 2e38 (each within float32's range) summed the agreeing weights to inf,
    and every entry where both models agreed kept the base, silently; task_arithmetic with normalize_weights wrote the
    base, with warnings giving another cause. Weights whose magnitudes sum past float32's range are refused."""
    from tiesmerge.errors import ConfigError

    base, a, b = _family_dirs(tmp_path)
    with pytest.raises(ConfigError, match=r"weights must sum to at most 3\.4e38 in magnitude .* summing to 4e\+38"):
        tiesmerge.merge(base, [a, b], method, weights=(2e38, 2e38), output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    if method in ("ties", "task_arithmetic"):  # (average and DARE scale w·θ past float32: a typed NotFiniteError)
        tiesmerge.merge(base, [a, b], method, weights=(1.5e38, 1.5e38), **({"normalize_weights": True}
                                                                           if method == "task_arithmetic" else {}))


def test_a_merge_in_memory_too_large_to_allocate_is_an_out_of_memory_error():
    """hp42 C23: an API merge of expanded (stride-0) tensors of 10^6 x 10^5 returned in memory raised torch's raw
    RuntimeError ("DefaultCPUAllocator: can't allocate memory") from the result's allocation; it is an
    OutOfMemoryError naming the tensor and its size, with what needs less."""
    import os
    import subprocess
    import sys

    code = ("import resource, torch, tiesmerge\n"
            "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "big = lambda v: torch.full((1,), v).expand(10**6, 10**5)\n"
            "try:\n"
            "    tiesmerge.merge({'e': big(1.0)}, [{'e': big(1.001)}, {'e': big(0.999)}], 'task_arithmetic')\n"
            "except tiesmerge.errors.OutOfMemoryError as exc:\n"
            "    print('typed:', exc.message, '|', exc.hint)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "typed: tensor 'e' (1000000, 100000) of the merged model (372.5 GiB as float32) cannot be allocated" in \
        done.stdout, done.stderr[-800:]
    assert "give an output folder" in done.stdout


@pytest.mark.parametrize("how", ["search", "tune"])
def test_a_model_replaced_while_a_search_runs_stops_it(tmp_path, how):
    """hp42 D50: a model file replaced (by rename) while a search or tune ran: later candidates merged the new model,
    were scored and logged beside the earlier ones, and the best was written from it. The inputs' stamps are checked
    after each candidate, and the one that changed is named."""
    import os

    from safetensors.torch import load_file, save_file

    from tiesmerge.errors import CheckpointError
    from tiesmerge.tuning import run_search, tune

    base, a, b = _family_dirs(tmp_path)
    calls = []

    def evaluate(state):
        calls.append(1)
        if len(calls) == 2:  # the first candidate is scored and kept; then the model is replaced, as a download would
            weights = load_file(os.path.join(b, "model.safetensors"))
            save_file({k: v * 3 for k, v in weights.items()}, os.path.join(tmp_path, "new.safetensors"))
            os.replace(os.path.join(tmp_path, "new.safetensors"), os.path.join(b, "model.safetensors"))
        return 1.0

    log = str(tmp_path / "log.jsonl")
    during = "the search" if how == "search" else "tune"
    with pytest.raises(CheckpointError, match=f"ft1: model 1 changed while {during} ran"):
        if how == "search":
            run_search(base, [a, b], "ties", evaluate, grid={"density": (0.2, 0.5, 0.8), "lam": (1.0,)}, log=log)
        else:
            tune(base, [a, b], "ties", evaluate, grid={"density": (0.2, 0.5, 0.8), "lam": (1.0,)})
    if how == "search":
        assert len(open(log).read().splitlines()) == 2  # the header and the first candidate, scored before it


def _method_of(merge_fn, name):
    from tiesmerge.methods import Requirements, method_config

    @method_config
    class Custom:
        name: ClassVar[str] = "custom"
        paper: ClassVar[str] = "none"
        summary: ClassVar[str] = "a method of the caller's"

        def requirements(self):
            return Requirements()

        def merge(self, tau, ctx):
            return merge_fn(tau)

    Custom.name = name
    return Custom()


@pytest.mark.parametrize("name, merge_fn, said", [
    ("bad_shape", lambda tau: tau.sum(0)[..., :1], r"returned \(.*\) for tensor '.*', whose chunk is"),
    ("raiser", lambda tau: (_ for _ in ()).throw(ValueError("boom in method")), r"raised ValueError on tensor .*: "
                                                                                 r"boom in method"),
    ("int_result", lambda tau: tau.sum(0).to(__import__("torch").int64), r"returned int64 values for tensor"),
])
@pytest.mark.parametrize("to_disk", [False, True])
def test_a_method_not_tiesmerges_own_that_fails_or_returns_a_wrong_chunk_is_a_method_error(tmp_path, name, merge_fn,
                                                                                          said, to_disk):
    """hp42 C59, C60: a plugin or API method whose merge returned (..., 1) was broadcast over every column and
    written; one that raised ValueError was "unexpected ValueError ... a bug in tiesmerge" (the raw ValueError in the
    API); an int64 result truncated every value. Each is a MethodError naming the method and its class."""
    from tiesmerge.errors import MethodError

    base, a, b = _family_dirs(tmp_path)
    out = tmp_path / "out" if to_disk else None
    with pytest.raises(MethodError, match=rf"method '{name}' \(.*Custom\) {said}"):
        tiesmerge.merge(base, [a, b], _method_of(merge_fn, name), output=out)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make", [lambda np: np.array("0.5", dtype=object), lambda np: np.array("0.5"),
                                  lambda np: np.array(0.5 + 0j)])
def test_a_numpy_score_holding_no_real_number_is_not_a_number(make):
    """hp42 D57: an evaluator returning np.array("0.5", dtype=object) was accepted as the score 0.5 (numpy.str_ is
    refused since hp41 C56)."""
    import numpy as np

    from tiesmerge.errors import EvaluatorError
    from tiesmerge.tuning.evaluator import guard

    with pytest.raises(EvaluatorError, match="not a number"):
        guard(lambda state: make(np), "score")({})
    assert guard(lambda state: np.array(0.5), "score")({}) == 0.5


@pytest.mark.parametrize("declared, used", [({"pooling_mode_cls_token": True}, "cls"),
                                            ({"pooling_mode_max_tokens": True}, "max"),
                                            ({"pooling_mode_mean_tokens": True}, "mean"),
                                            ({"pooling_mode_weightedmean_tokens": True}, "mean")])
def test_a_sentence_transformers_folders_pooling_is_the_encoders(tmp_path, bert_tokenizer, declared, used):
    """hp42 D67: encoder-accuracy and adapt --forward encoder mean-pooled a sentence-transformers folder whose
    1_Pooling/config.json says CLS pooling, without a word. The declared pooling is used where tiesmerge's encoder
    reproduces it, and said where it does not."""
    import json
    import warnings

    import torch

    from tiesmerge.errors import MergeWarning
    from tiesmerge.evaluation.encoder import SentenceEncoder

    model = _encoder_dir(tmp_path, bert_tokenizer)
    (model / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (model / "1_Pooling").mkdir()
    (model / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 16, **declared}))
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        encoder = SentenceEncoder.from_pretrained(model)
    assert encoder.pooling == used
    warned = any("weightedmean pooling, which tiesmerge's encoder does not reproduce" in str(w.message)
                 for w in said if issubclass(w.category, MergeWarning))
    assert warned == ("pooling_mode_weightedmean_tokens" in declared)
    batch = encoder.tokenize(["the cat sat", "a dog"])
    hidden = encoder.model(**batch).last_hidden_state
    if used == "cls":
        torch.testing.assert_close(encoder(batch), torch.nn.functional.normalize(hidden[:, 0], dim=-1))


@pytest.mark.parametrize("method, options", [("ties", {"scope": "per_tensor"}), ("ties", {"scope": "global"}),
                                             ("magnitude_prune", {"scope": "per_tensor"})])
def test_ties_at_the_threshold_keeping_far_more_are_said_under_every_scope(method, options):
    """hp42 C57: the warning that keeping every tie at the trim's threshold keeps far more than the density (hp40b
    C76) was said under the global scope only; per_tensor (TIES's keep rule there too) kept 91.6% without a word.
    Said once per merge, over every scope."""
    import re
    import warnings

    import torch

    from tiesmerge.errors import MergeWarning

    g = torch.Generator().manual_seed(0)
    base = {f"w{k}": torch.zeros(32, 32) for k in range(3)}
    models = [{n: 0.01 * torch.sign(torch.randn(32, 32, generator=g)) for n in base} for _ in range(2)]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        tiesmerge.merge(base, models, method, **options)
    ties = [w for w in said if issubclass(w.category, MergeWarning) and "tie at the trim's threshold" in str(w.message)]
    assert len(ties) == 1 and re.search(r"model 0 100\.0% \(asked (19\.9|20\.0)%\)", str(ties[0].message))


def test_a_long_literal_target_modules_is_checked_as_peft_reads_it(tmp_path):
    """hp42 C25: target_modules of 'a' x 30,000 (a plain literal) was "not checked" (past the regex size tiesmerge
    runs) and merged, though PEFT refuses the adapter (its fullmatch selects no module). A literal's fullmatch is
    equality: checked in linear time, and refused naming the field."""
    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_base
    from tiesmerge.errors import IncompatibleCheckpointsError

    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=1), alpha=4,
                          config={"target_modules": "a" * 30_000})
    with pytest.raises(IncompatibleCheckpointsError, match=r"its config does not adapt, .* \(target_modules 'aaa"):
        tiesmerge.merge(b, [lora], "task_arithmetic", lam=1.0)


def test_lora_factors_of_the_wrong_rank_are_said_to_be_a_damaged_file(tmp_path):
    """hp42 C27: a 1-D lora_A got the options' --help hint; the file is what is wrong."""
    import torch

    from helpers_adapters import random_lora, write_lora_dir
    from helpers_ckpt import make_base
    from tiesmerge.errors import IncompatibleCheckpointsError

    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    factors = random_lora(base, 2, seed=1)
    module = next(iter(factors))
    factors[module] = (torch.randn(factors[module][0].numel()), factors[module][1])
    lora = write_lora_dir(tmp_path / "lora", factors, alpha=4, config={"r": 2})
    with pytest.raises(IncompatibleCheckpointsError, match="expected A \\(r, in\\) and B \\(out, r\\)") as caught:
        tiesmerge.merge(b, [lora], "task_arithmetic", lam=1.0)
    assert "incomplete or damaged" in caught.value.hint


def test_an_init_outside_the_clamp_is_refused(tmp_path):
    """hp42 D36: adapt --clamp 0.5 0.6 with the default --init 0.3 measured the first step at 0.3, then every
    coefficient jumped to 0.5, without a word."""
    from test_adapt_hostile import _forward, _setup
    from tiesmerge.errors import ConfigError

    base, fts, files = _setup(tmp_path)
    with pytest.raises(ConfigError, match=r"init 0\.3 lies outside clamp \[0\.5, 0\.6\]"):
        tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, clamp=(0.5, 0.6))
    tiesmerge.adapt(base, fts, files, forward=_forward(), steps=1, clamp=(0.5, 0.6), init=0.55)


@pytest.mark.parametrize("which", ["classifier", "encoder"])
def test_builtin_evaluators_say_how_many_examples_they_cut(tmp_path, bert_tokenizer, which):
    """hp42 D19: classifier-accuracy and encoder-accuracy on 101-word examples and a 64-position model cut every
    example to its first tokens (the label word last was never read), scoring 0.5 for every candidate without a
    word; adapt and stats say how many they cut."""
    import json

    from test_hostile_fortieth_pass_evaluators import _bert_classifier
    from tiesmerge.errors import MergeWarning
    from tiesmerge.evaluation.builtin import ClassifierAccuracy, EncoderAccuracy

    long_text = " ".join(["the"] * 60) + " cat"
    data = tmp_path / "d.jsonl"
    if which == "classifier":
        _bert_classifier(tmp_path / "m", bert_tokenizer)  # 32 positions
        rows = [{"text": long_text, "label": 0}, {"text": "a dog", "label": 1}]
        make = ClassifierAccuracy
        model = tmp_path / "m"
    else:
        model = _encoder_dir(tmp_path, bert_tokenizer)
        rows = [{"task": "t", "classes": ["cat", "dog"]}, {"task": "t", "text": long_text, "label": 0},
                {"task": "t", "text": "a dog", "label": 1}]
        make = EncoderAccuracy
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(MergeWarning, match=r"d\.jsonl: 1 of the 2 examples are longer than 32 tokens \(the model's "
                                          r"positions\) and are cut"):
        make(model, data)


def test_an_evaluator_that_changes_torchs_default_device_is_put_back(tmp_path):
    """hp42 D16: an evaluator that called torch.set_default_device("meta") after scoring made the next candidate's
    merge fail as "unexpected RuntimeError: Tensor.item() cannot be called on meta tensors ... a bug in tiesmerge".
    The default device and dtype are put back after each call, said once."""
    import torch

    from tiesmerge.errors import MergeWarning
    from tiesmerge.tuning import run_search

    base, a, b = _family_dirs(tmp_path)

    def meddles(state):
        torch.set_default_device("meta")
        torch.set_default_dtype(torch.float64)
        return 1.0

    try:
        with pytest.warns(MergeWarning, match=r"meddles changed torch's default device or dtype .* set them back"):
            result = run_search(base, [a, b], "ties", meddles, grid={"density": (0.2, 0.5), "lam": (1.0,)})
        assert len(result.trials) == 2
        assert torch.get_default_device() == torch.device("cpu") and torch.get_default_dtype() == torch.float32
    finally:
        torch.set_default_device(None)
        torch.set_default_dtype(torch.float32)


def test_an_axis_another_searched_axis_makes_unused_is_refused():
    """hp42 D64: `search --axis density --axis densities` (TIES: densities overrides density) warned per candidate
    that density was not used, searched on, and plotted density's "effect"."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.tuning.space import build_space

    with pytest.raises(ConfigError, match="searching density changes nothing while densities is searched too"):
        build_space("ties", 2, axes=["density", "densities"])
    assert [a.name for a in build_space("ties", 2, axes=["densities", "lam"]).axes] == ["densities", "lam"]


@pytest.mark.parametrize("make", [lambda s: __import__("torch").float16 if s > 0 else __import__("torch").bfloat16,
                                  lambda s: __import__("torch").device("cpu" if s > 0 else "meta"),
                                  lambda s: __import__("numpy").dtype("float32" if s > 0 else "float64"),
                                  lambda s: _FrozenSetting(s)],
                         ids=["torch dtype", "torch device", "numpy dtype", "frozen dataclass"])
def test_settings_a_closure_holds_are_digested(make):
    """hp42 D13: a closure over a torch dtype or device, a numpy dtype or a frozen dataclass (settings, not caches)
    resumed silently with another value; a partial over a memoryview digested its address only."""
    import functools

    from tiesmerge.tuning.evaluator_digest import evaluator_state

    def build(sign):
        return _closure_over(make(sign))

    assert evaluator_state(build(1.0)) is not None and evaluator_state(build(1.0)) != evaluator_state(build(-1.0))
    assert evaluator_state(functools.partial(_score_with, extra=memoryview(b"ab"))) != \
        evaluator_state(functools.partial(_score_with, extra=memoryview(b"ac")))


@__import__("dataclasses").dataclass(frozen=True)
class _FrozenSetting:
    sign: float


def test_a_choice_too_long_for_the_model_is_refused_naming_its_line(tmp_path):
    """hp42 D18: an 81-token choice on a 64-position GPT-2 failed at the first candidate's scoring, as "answer choice
    'good good ...' is 81 tokens; ..." without the file and line every other data error names."""
    import json

    from test_hostile_fortieth_pass_evaluators import _llama
    from tiesmerge.errors import ConfigError
    from tiesmerge.evaluation.builtin import ChoiceAccuracy

    _llama(tmp_path / "lm")  # 64 positions
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "the cat", "choices": ["sat", " ".join(["the"] * 80)], "label": 0}) + "\n")
    with pytest.raises(ConfigError, match=r"long\.jsonl:1: answer choice 'the the .*' is 80 tokens; with a prompt "
                                          r"token before it that passes the 64 tokens"):
        ChoiceAccuracy(tmp_path / "lm", data)


@pytest.mark.parametrize("raw, said, hint", [
    (b"\x1f\x8b\x08\x00gzipped", "it is gzip-compressed", "gunzip"),
    ('{"text": "a", "label": 0}\n'.encode("utf-16"), "it is UTF-16", "iconv -f UTF-16"),
    (b'{"text": "caf\xe9", "label": 0}\n', "", "iconv -f LATIN1")])
def test_a_data_file_that_is_not_utf8_is_told_what_it_is(tmp_path, raw, said, hint):
    """hp42 D65: a gzip data file got the hint to convert it from UTF-16; lm-perplexity's UTF-16 text the hint to
    convert it from Latin-1. The first bytes say which it is."""
    from tiesmerge.errors import ConfigError
    from tiesmerge.stats.hf import read_jsonl

    path = tmp_path / "d.jsonl"
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match="not UTF-8 text") as caught:
        read_jsonl(path)
    assert said in caught.value.message and hint in caught.value.hint


class _ReprNeverReturns:
    """Stands for an object whose __repr__ never returns (hp43 c02): calling it fails the test instead of hanging."""

    def __init__(self, sign):
        self.sign = sign

    def __repr__(self):
        raise AssertionError("the digest called a user's __repr__")

    __hash__ = object.__hash__


class _TorchFunctionNeverReturns(__import__("torch").Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise AssertionError("the digest ran a subclass's __torch_function__")


def test_the_evaluator_digest_never_runs_a_users_repr_or_torch_function():
    """hp43 c02, c25: an object whose __repr__ never returns (in a partial's default, or as a dict key) and a tensor
    subclass whose __torch_function__ never returns hung the search before its first candidate: the digest called
    them. Objects are read by their class and attributes, tensors with subclass dispatch off."""
    import functools

    import torch

    from tiesmerge.tuning.evaluator_digest import evaluator_state

    def of(value):
        return evaluator_state(functools.partial(_score_with, extra=value))

    assert of(_ReprNeverReturns(1.0)) != of(_ReprNeverReturns(-1.0))
    assert of({_ReprNeverReturns(1.0): 1}) is not None
    sub = torch.Tensor._make_subclass(_TorchFunctionNeverReturns, torch.ones(2))
    other = torch.Tensor._make_subclass(_TorchFunctionNeverReturns, torch.zeros(2))
    assert of(sub) != of(other)


@pytest.mark.parametrize("make", [lambda s: __import__("pathlib").Path("a.txt" if s > 0 else "b.txt"),
                                  lambda s: range(int(s) + 2), lambda s: slice(0, int(s) + 2),
                                  lambda s: __import__("decimal").Decimal(str(s)),
                                  lambda s: __import__("fractions").Fraction(int(s), 3),
                                  lambda s: bytearray(b"a" if s > 0 else b"b")],
                         ids=["path", "range", "slice", "decimal", "fraction", "bytearray"])
def test_closure_values_of_more_kinds_are_settings(make):
    """hp43 c03: a closure over a pathlib.Path (a data file), a range, a slice, a Decimal, a Fraction or a bytearray
    resumed silently with another value (a str path was refused)."""
    from tiesmerge.tuning.evaluator_digest import evaluator_state

    def build(sign):
        return _closure_over(make(sign))

    assert evaluator_state(build(1.0)) is not None and evaluator_state(build(1.0)) != evaluator_state(build(-1.0))


def test_an_lru_cached_evaluator_or_helper_is_followed_to_what_it_wraps(tmp_path):
    """hp43 c26: an evaluator whose closure held an lru_cache helper closing over its data path (or an evaluator
    wrapped in lru_cache) was digested as nothing, so other data resumed silently, and named as an object."""
    import functools

    from tiesmerge.tuning.evaluator_digest import evaluator_objects, evaluator_state

    def make(path):
        @functools.cache
        def load():
            return path

        def score(state):
            return float(len(load()))
        return score

    assert evaluator_state(make("a.jsonl")) is not None
    assert evaluator_state(make("a.jsonl")) != evaluator_state(make("b.jsonl"))
    wrapped_a = functools.lru_cache(maxsize=None)(functools.partial(_score_with, extra="a"))
    wrapped_b = functools.lru_cache(maxsize=None)(functools.partial(_score_with, extra="b"))
    assert evaluator_state(wrapped_a) != evaluator_state(wrapped_b)
    assert evaluator_objects(wrapped_a) == []


def test_option_flags_over_a_mergekit_recipe_are_refused(tmp_path, capsys):
    """hp43 C31: `--normalize-weights` over a mergekit linear recipe with normalize: false normalized the output
    silently, while the printed semantics and the manifest's origin still said "undivided"."""
    from helpers_ckpt import run_cli

    recipe, _, _ = _linear_recipe(tmp_path)
    rc, _, err = run_cli(["merge", str(recipe), "--normalize-weights", "-o", str(tmp_path / "out")], capsys)
    assert rc == 2 and "--normalize-weights over a mergekit recipe" in err, err
    assert not (tmp_path / "out").exists()


def test_a_weights_file_too_large_to_map_is_an_out_of_memory_error(tmp_path):
    """hp43 C51: under an address-space limit, a (sparse) 8 GiB .safetensors file made the API's plan_merge and
    merge raise a bare MemoryError: safetensors maps the whole file to read its header. It is an OutOfMemoryError
    naming the file, whose hint says what helps (a smaller --memory-budget cannot)."""
    import json
    import os
    import struct
    import subprocess
    import sys

    header = json.dumps({"w": {"dtype": "F32", "shape": [65536, 32768], "data_offsets": [0, 65536 * 32768 * 4]}})
    header += " " * (-len(header) % 8)
    for name in ("base", "ft"):
        with open(tmp_path / f"{name}.safetensors", "wb") as f:
            f.write(struct.pack("<Q", len(header)) + header.encode())
            f.truncate(8 + len(header) + 65536 * 32768 * 4)  # sparse: no disk used
    base, ft = str(tmp_path / "base.safetensors"), str(tmp_path / "ft.safetensors")
    code = ("import resource, tiesmerge\n"
            "resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))\n"
            "try:\n"
            f"    tiesmerge.plan_merge({base!r}, [{ft!r}])\n"
            "except tiesmerge.errors.OutOfMemoryError as exc:\n"
            "    print('typed:', exc.message, '|', exc.hint)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert "typed:" in done.stdout and "maps the whole file (8.0 GiB)" in done.stdout, done.stderr[-800:]
    assert "ulimit -v" in done.stdout


def test_a_mergekit_linear_recipe_without_dtype_promotes_its_inputs_dtypes(tmp_path, capsys):
    """hp43 C04: base_model in bfloat16 beside float32 models, no dtype: tiesmerge wrote bfloat16 ("base_model's, as
    mergekit writes it"), mergekit float32 (it stacks the tensors, which promotes their dtypes)."""
    from safetensors.torch import load_file, save_file

    from tiesmerge.cli.main import main

    recipe, paths, states = _linear_recipe(tmp_path)
    save_file({k: v.bfloat16() for k, v in states["base"].items()}, str(paths["base"] / "model.safetensors"))
    recipe.write_text(recipe.read_text().replace("dtype: float32\n", ""))
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert {str(v.dtype) for v in load_file(str(tmp_path / "out" / "model.safetensors")).values()} == \
        {"torch.float32"}


def test_a_mergekit_linear_recipe_whose_first_model_grew_its_vocabulary_keeps_base_models_rows(tmp_path, capsys):
    """hp43 C26 (and C25's root): a mergekit linear recipe with tokenizer_source: base, its first model holding one
    added token's row, was refused as differing shapes ("the base" being that model); mergekit merges it on
    base_model's rows. base_model is read as the base, and tokenizer_source: base keeps its rows."""
    import torch
    from safetensors.torch import load_file, save_file

    from tiesmerge.cli.main import main

    recipe, paths, states = _linear_recipe(tmp_path)
    grown = dict(states["m1"])
    grown["model.embed_tokens.weight"] = torch.cat([grown["model.embed_tokens.weight"], torch.ones(1, 6)])
    save_file(grown, str(paths["m1"] / "model.safetensors"))
    recipe.write_text(recipe.read_text() + "tokenizer_source: base\n")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "base_model is read as the base" in capsys.readouterr().err
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert merged["model.embed_tokens.weight"].shape == (10, 6)
    name = "model.embed_tokens.weight"
    expected = (0.6 * states["m1"][name] + 0.4 * states["m2"][name] + 0.5 * states["base"][name]) / 1.5
    torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6)


def test_files_from_keeps_the_copied_config_true_to_the_written_weights(tmp_path):
    """hp43 C21, C67, C68: with files_from a model stored in another dtype than the base, the copied config.json
    said bfloat16 over float32 weights (transformers' dtype="auto" then loaded the merge in bfloat16); with
    vocab_policy union files_from was ignored, with truncate the copied config's vocab_size described another
    vocabulary. The config's dtype follows the weights; files_from with a vocabulary policy is refused."""
    import json

    from tiesmerge.errors import ConfigError

    base, a, b = _family_dirs(tmp_path)
    config = json.loads(open(f"{a}/config.json").read()) if os.path.exists(f"{a}/config.json") else {}
    config["torch_dtype"] = "bfloat16"
    with open(f"{a}/config.json", "w") as f:
        json.dump(config, f)
    out = tiesmerge.merge(base, [a, b], "task_arithmetic", output=tmp_path / "out", files_from=a)
    written = json.loads((out / "config.json").read_text())
    assert written.get("torch_dtype", written.get("dtype")) == "float32"
    for policy in ("union", "truncate"):
        with pytest.raises(ConfigError, match=f"files_from and vocab_policy '{policy}' together"):
            tiesmerge.merge(base, [a, b], "task_arithmetic", output=tmp_path / policy, files_from=a,
                            vocab_policy=policy)
        assert not (tmp_path / policy).exists()


def test_a_resume_whose_evaluator_closes_over_an_object_is_warned(tmp_path):
    """hp43 c55: `lambda sd: e.score(sd)` (a closure over an object) resumed silently after the object's settings
    changed; the partial and decorator forms were warned since hp42 D29."""
    from tiesmerge.errors import ConfigError, MergeWarning
    from tiesmerge.tuning import run_search

    base, a, b = _family_dirs(tmp_path)
    grid, log = {"density": (0.5,), "lam": (1.0,)}, str(tmp_path / "log.jsonl")

    def build(sign):
        e = _Signed(sign)
        return lambda state: e.score(state)

    run_search(base, [a, b], "ties", build(1.0), grid=grid, log=log)
    with pytest.warns(MergeWarning, match=r"may depend on a _Signed object it holds"), \
            pytest.raises(ConfigError, match="now where the log records"):  # the candidate scored again differs
        run_search(base, [a, b], "ties", build(-1.0), grid=grid, log=log)


@pytest.mark.parametrize("options, said", [({"densities": (0.2, 0.3, 0.4)}, "3 densities given for 2 models"),
                                           ({"weights": (5.0,)}, "1 weights given for 2 models")])
def test_adapt_refuses_per_model_values_of_the_wrong_count(tmp_path, options, said):
    """hp43 c44, c45: adapt --method ties --densities with 3 values for 2 models was "unexpected RuntimeError: top-k
    select ... a bug"; --weights 5 for 2 models was accepted and changed the result. Refused as merge refuses them."""
    from test_adapt_hostile import _forward, _setup
    from tiesmerge.errors import ConfigError

    base, fts, files = _setup(tmp_path)
    with pytest.raises(ConfigError, match=said):
        tiesmerge.adapt(base, fts, files, "ties", forward=_forward(), steps=1, **options)


def test_adapt_refuses_a_task_whose_rows_and_choices_file_both_give_choices(tmp_path):
    """hp43 c35: rows carrying their own choices silently won over --choices for the same task, while the manifest
    recorded the --choices values, which were never read."""
    import json

    from test_hostile_fortieth_pass_evaluators import _llama
    from tiesmerge.errors import ConfigError

    model = _llama(tmp_path / "lm")
    for k in range(2):
        tuned = type(model)(model.config)
        tuned.load_state_dict(model.state_dict())
        tuned.save_pretrained(tmp_path / f"ft{k}")
    data = []
    for task in ("r1", "r2"):
        path = tmp_path / f"{task}.jsonl"
        path.write_text("".join(json.dumps({"text": "the cat", "choices": ["sat", "ran"]}) + "\n" for _ in range(2)))
        data.append(path)
    with pytest.raises(ConfigError, match=r"task 'r1': 2 of its rows carry their own 'choices', and --choices gives"):
        tiesmerge.adapt(tmp_path / "lm", [tmp_path / "ft0", tmp_path / "ft1"], data, forward="choice",
                        choices={"r1": ["sat", "ran", "cat"]}, steps=1)


def test_a_model_whose_logits_are_not_finite_scores_nothing(tmp_path, bert_tokenizer):
    """hp43 c08: tune --grid lam=1e30,1 with classifier-accuracy: the lam=1e30 model's logits were all NaN, argmax
    read them as class 0, it scored as well as the sane one (0.5), won the tie and was written to -o."""
    import json

    import torch

    from test_hostile_fortieth_pass_evaluators import _bert_classifier
    from tiesmerge.evaluation.builtin import ClassifierAccuracy

    model = _bert_classifier(tmp_path / "cls", bert_tokenizer)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": 0}) + "\n" for t in ("the cat", "a dog")))
    scorer = ClassifierAccuracy(tmp_path / "cls", data, device="cpu")
    broken = {k: (v * float("nan") if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    assert scorer(broken) == 0.0
    assert scorer({k: v.clone() for k, v in model.state_dict().items()}) in (0.0, 0.5, 1.0)
    from tiesmerge.evaluation.encoder import CosineHead
    from tiesmerge.evaluation.suite_eval import task_accuracy

    class _NaNEncoder:
        def encode(self, texts, batch_size=64):
            return torch.full((len(texts), 4), float("nan"))

    head = CosineHead(torch.nn.functional.normalize(torch.randn(2, 4), dim=-1))
    assert task_accuracy(_NaNEncoder(), head, [("a", 0), ("b", 0)]) == 0.0


def test_a_thread_the_memory_limit_refuses_is_an_out_of_memory_error(tmp_path, monkeypatch):
    """hp44 c10: under `ulimit -v 450000` the writer thread could not start: the API raised a raw RuntimeError
    ("can't start new thread"), the command line "unexpected RuntimeError ... a bug in tiesmerge"."""
    import concurrent.futures

    from tiesmerge.errors import OutOfMemoryError

    base, a, b = _family_dirs(tmp_path)

    def refused(self, *args, **kwargs):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", refused)
    with pytest.raises(OutOfMemoryError, match=r"ran out of memory \(can't start new thread\)"):
        tiesmerge.merge(base, [a, b], "ties", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_mergekit_ties_recipe_without_dtype_promotes_its_inputs_dtypes(tmp_path, capsys):
    """hp44 c17: a mergekit ties recipe, base_model bfloat16, models float32, no dtype: tiesmerge wrote bfloat16 (the
    base's), mergekit float32 (it computes in the promoted dtype); the pass-43 rule covered linear only."""
    from safetensors.torch import load_file, save_file

    from tiesmerge.cli.main import main

    _, paths, states = _linear_recipe(tmp_path)
    save_file({k: v.bfloat16() for k, v in states["base"].items()}, str(paths["base"] / "model.safetensors"))
    recipe = tmp_path / "ties.yaml"
    recipe.write_text(f"merge_method: ties\nbase_model: {paths['base']}\nmodels:\n"
                      f"  - {{model: {paths['m1']}, parameters: {{weight: 1.0, density: 0.5}}}}\n"
                      f"  - {{model: {paths['m2']}, parameters: {{weight: 1.0, density: 0.5}}}}\n")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out"), "--no-progress"]) == 0
    assert "no dtype given: the output is float32" in capsys.readouterr().err
    assert {str(v.dtype) for v in load_file(str(tmp_path / "out" / "model.safetensors")).values()} == \
        {"torch.float32"}


class _ClassPropertyRaises:
    """An object whose __class__ property and __getattribute__ run user code: the digest must not (hp44 c11)."""

    def __init__(self, sign):
        object.__setattr__(self, "sign", sign)

    @property
    def __class__(self):
        raise AssertionError("the digest read a user's __class__ property")

    def __getattribute__(self, name):
        if name == "__dict__":
            raise AssertionError("the digest ran a user's __getattribute__")
        return object.__getattribute__(self, name)


def test_the_evaluator_digest_never_runs_an_objects_class_property_or_getattribute(tmp_path):
    """hp44 c11: an object whose __class__ property raised (or slept), or whose __getattribute__ slept on __dict__,
    made evaluator_state/evaluator_objects raise the user's error or hang: isinstance() and hasattr() run such code.
    Values are tested through their type."""
    import functools

    from tiesmerge.tuning.evaluator_digest import evaluator_objects, evaluator_state

    def build(sign):
        obj = _ClassPropertyRaises(sign)
        return lambda state: _score_with(state, extra=obj)

    assert evaluator_objects(build(1.0)) == ["_ClassPropertyRaises"]
    assert evaluator_state(functools.partial(_score_with, extra=_ClassPropertyRaises(1.0))) != \
        evaluator_state(functools.partial(_score_with, extra=_ClassPropertyRaises(-1.0)))


class _SignedList(list):
    pass


class _SlotsScore:
    __slots__ = ("sign",)

    def __init__(self, sign):
        self.sign = sign

    def __call__(self, state):
        return self.sign


def test_builtin_subclasses_with_attributes_and_slots_objects_are_digested_or_warned():
    """hp44 c34, c36: a closure over a list subclass carrying a .sign digested as the plain list (same for +1 and -1),
    and a __slots__ evaluator object was neither digested nor warned; both resumed silently."""
    from tiesmerge.tuning.evaluator_digest import evaluator_objects, evaluator_state

    def build(sign):
        cfg = _SignedList([1, 2])
        cfg.sign = sign

        def inner(state):
            return _score_with(state, extra=cfg)
        return inner

    assert evaluator_state(build(1.0)) != evaluator_state(build(-1.0))
    assert evaluator_objects(_SlotsScore(1.0)) == ["_SlotsScore"]


def test_a_recipes_relative_files_from_is_read_against_its_folder(tmp_path, monkeypatch, capsys):
    """hp44 c29: a recipe with relative paths and files_from (the model card's own recipe) was refused from another
    folder ("files_from 'ft1' must be the base or one of the models"): base and models were read against the
    recipe's folder, files_from against the working folder."""
    from tiesmerge.cli.main import main

    _family_dirs(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: average\nbase: base\nmodels: [ft0, ft1]\nfiles_from: ft1\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["validate", str(recipe)]) == 0, capsys.readouterr().err


def test_no_message_names_the_teams_tracker_ids():
    """hp44 c26: an overflow hint read "... even where a mean would not, hp39 C47), not the dtype": the tracker's case
    id, which means nothing to a user. No string of the package but docstrings may hold one."""
    import ast
    import pathlib
    import re

    pattern = re.compile(r"\bhp\d{2}[a-z]?\b|hostile pass \d+")
    found = []
    for path in pathlib.Path(tiesmerge.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        docs = {id(node.body[0].value) for node in ast.walk(tree)
                if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
                and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        found += [f"{path.name}:{node.lineno}" for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                  and pattern.search(node.value)]
    assert found == []


def test_files_from_takes_bytes_as_base_and_models_do_and_linear_counts_its_base(tmp_path, capsys):
    """hp44 c28: files_from=b"ft1" was "must be a path, got bytes" though base and models accept bytes; c02: a
    mergekit linear merge of two models and base_model said "merged 2 models"."""
    import os

    from tiesmerge.cli.main import main

    base, a, b = _family_dirs(tmp_path)
    out = tiesmerge.merge(base, [a, b], "task_arithmetic", output=tmp_path / "out", files_from=os.fsencode(b))
    assert (out / "config.json").is_file()
    recipe, _, _ = _linear_recipe(tmp_path / "lin")
    assert main(["merge", str(recipe), "-o", str(tmp_path / "lin_out"), "--no-progress"]) == 0
    assert "merged 3 models with average" in capsys.readouterr().out


def test_flags_over_a_recipe_say_what_they_replace_and_vocab_policy_over_mergekit_is_refused(tmp_path, capsys):
    """hp44 c21: --density and --dtype over a tiesmerge recipe replaced its values without the warning the README
    promises; c06, c20: --vocab-policy over a mergekit recipe overrode its tokenizer_source silently (or was refused
    as "files_from", a key the user never wrote)."""
    from helpers_ckpt import run_cli

    base, a, b = _family_dirs(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {base}\nmodels: [{a}, {b}]\nparameters: {{density: 0.3}}\n"
                      "dtype: float16\n")
    rc, _, err = run_cli(["merge", str(recipe), "--density", "0.5", "--dtype", "bf16", "-o", str(tmp_path / "o"),
                          "--no-progress"], capsys)
    assert rc == 0 and "--dtype bf16 replaces the recipe's dtype float16" in err
    assert "--density 0.5 replaces the recipe's density 0.3" in err
    linear, _, _ = _linear_recipe(tmp_path / "lin")
    rc, _, err = run_cli(["merge", str(linear), "--vocab-policy", "union", "-o", str(tmp_path / "o2")], capsys)
    assert rc == 2 and "--vocab-policy over a mergekit recipe" in err and "files_from" not in err, err


def test_a_users_object_with_an_evaluate_method_is_the_evaluator_itself():
    """Found in review: the digest unwrapped anything with an ``evaluate`` attribute as tiesmerge's guard, so a user's
    callable object with an evaluate method of its own was read as that (unbound) function, and not warned."""
    from tiesmerge.tuning.evaluator import guard
    from tiesmerge.tuning.evaluator_digest import evaluator_objects

    class Harness:
        def __init__(self, sign):
            self.sign = sign

        def evaluate(self, state):
            return self.sign

        def __call__(self, state):
            return self.evaluate(state)

    assert [n.rsplit(".", 1)[-1] for n in evaluator_objects(Harness(1.0))] == ["Harness"]
    assert [n.rsplit(".", 1)[-1] for n in evaluator_objects(guard(Harness(1.0), "score"))] == ["Harness"]
