"""The built-in evaluators (evaluation/builtin.py): each scores a candidate state as an independent
computation on the same model does, reads and checks its file when it is made, pickles (Ray), and
works from `tiesmerge tune` and `search` by name; bad files are typed errors naming the line."""

from __future__ import annotations

import copy
import json
import math
import pickle
import warnings

import pytest
import torch
from safetensors.torch import load_file

from helpers_models import CLASSIFIER_WORDS, ENCODER_WORDS, TEXTS, save_word_tokenizer, tiny_bert_encoder
from tiesmerge.errors import ConfigError
from tiesmerge.evaluation import evaluate_encoder
from tiesmerge.evaluation.builtin import builtin_evaluator
from tiesmerge.evaluation.encoder import build_head
from tiesmerge.evaluation.rank_classification import ChoiceExample, rank_classification_accuracy

transformers = pytest.importorskip("transformers")


def _state(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def causal_lm(tmp_path_factory):
    """A tiny random Llama with the word-level tokenizer, and a perturbed copy."""
    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(CLASSIFIER_WORDS), hidden_size=16, intermediate_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                   max_position_embeddings=32, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).eval()
    dirs = []
    for k in range(2):
        m = copy.deepcopy(model)
        if k:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.3 * torch.randn_like(p))
        m.save_pretrained(root / f"m{k}", safe_serialization=True)
        save_word_tokenizer(root / f"m{k}")
        dirs.append(root / f"m{k}")
    return dirs


def test_classifier_accuracy_is_the_models_accuracy_with_the_candidates_weights(classifiers):
    _, base, (ft, _), data = classifiers
    score = builtin_evaluator(f"classifier-accuracy:{data}", base, device="cpu")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(ft).eval()
    tok = transformers.AutoTokenizer.from_pretrained(ft)
    with torch.no_grad():
        predicted = model(**tok([t for t, _ in TEXTS], padding=True, return_tensors="pt")).logits.argmax(-1)
    want = sum(int(p == y) for p, (_, y) in zip(predicted.tolist(), TEXTS)) / len(TEXTS)
    assert score(_state(ft)) == pytest.approx(want)
    # the model is built once per process and refilled: the base's own weights give the base's score
    model0 = transformers.AutoModelForSequenceClassification.from_pretrained(base).eval()
    with torch.no_grad():
        p0 = model0(**tok([t for t, _ in TEXTS], padding=True, return_tensors="pt")).logits.argmax(-1)
    assert score(_state(base)) == pytest.approx(sum(int(p == y) for p, (_, y) in zip(p0.tolist(), TEXTS)) / 5)


def test_choice_accuracy_and_perplexity_match_independent_computations(causal_lm, tmp_path):
    base, ft = causal_lm
    rows = [{"prompt": "very", "choices": ["good film", "bad plot"], "label": 0},
            {"prompt": "not", "choices": ["good", "bad"], "label": 1},
            {"prompt": "film", "choices": ["plot", "very good", "not"], "label": 2}]
    score = builtin_evaluator(f"choice-accuracy:{_jsonl(tmp_path / 'c.jsonl', rows)}", base, device="cpu")
    model = transformers.AutoModelForCausalLM.from_pretrained(ft).eval()
    tok = transformers.AutoTokenizer.from_pretrained(ft)
    examples = [ChoiceExample(r["prompt"], tuple(r["choices"]), r["label"]) for r in rows]
    assert score(_state(ft)) == pytest.approx(rank_classification_accuracy(model, tok, examples))

    text = tmp_path / "prose.txt"
    text.write_text("very good film not bad plot very bad film good plot " * 3)
    ppl = builtin_evaluator(f"lm-perplexity:{text}", base, device="cpu")
    ppl.max_length = 64  # one window: the whole text, so transformers' own loss is the reference
    ids = torch.tensor([tok(text.read_text(), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        want = math.exp(float(model(input_ids=ids, labels=ids).loss))
    assert ppl(_state(ft)) == pytest.approx(-want, rel=1e-5)
    # windows: every token but each window's first is scored once, whatever the window
    ppl.max_length = 8
    assert ppl(_state(ft)) < 0 and ppl(_state(ft)) != pytest.approx(-want, rel=1e-5)


def test_encoder_accuracy_is_the_benchmarks_protocol(tmp_path, bert_tokenizer):
    base_dir, ft_dir = tmp_path / "base", tmp_path / "ft"
    base = tiny_bert_encoder(bert_tokenizer, seed=0)
    ft = tiny_bert_encoder(bert_tokenizer, seed=0)
    with torch.no_grad():
        for p in ft.model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    for enc, d in ((base, base_dir), (ft, ft_dir)):
        enc.model.save_pretrained(d, safe_serialization=True)
        bert_tokenizer.save_pretrained(d)
    words = ENCODER_WORDS
    tasks = {"colour": (["a red thing", "a blue thing"], [(f"the {w} sun", i % 2) for i, w in enumerate(words[:6])]),
             "size": (["small", "big", "old"], [(f"a {w} house", i % 3) for i, w in enumerate(words[6:12])])}
    rows = []
    for task, (classes, examples) in tasks.items():
        rows.append({"task": task, "classes": classes})
        rows += [{"task": task, "text": t, "label": y} for t, y in examples]
    score = builtin_evaluator(f"encoder-accuracy:{_jsonl(tmp_path / 'e.jsonl', rows)}", base_dir, device="cpu",
                              max_length=32)
    base.eval(), ft.eval()
    heads = {t: build_head(base, c) for t, (c, _) in tasks.items()}  # heads from the base, as the benchmark
    want = evaluate_encoder(ft, {t: ex for t, (_, ex) in tasks.items()}, heads).mean
    assert score(_state(ft_dir)) == pytest.approx(want)


def test_they_pickle_for_ray_workers_and_keep_their_examples(classifiers):
    _, base, (ft, _), data = classifiers
    score = builtin_evaluator(f"classifier-accuracy:{data}", base, device="cpu")
    again = pickle.loads(pickle.dumps(score))
    assert again.examples == score.examples and again(_state(ft)) == score(_state(ft))


def test_a_user_module_function_is_not_a_builtin(classifiers):
    _, base, _, _ = classifiers
    assert builtin_evaluator("my_eval:score", base) is None


@pytest.mark.parametrize("rows, message", [
    ([], "holds no examples"),
    ([{"text": "good", "label": "1"}], ":1: 'label' must be"),
    ([{"text": "good"}], r":1: the line has no 'label' \(its keys: 'text'\)"),  # hp62b v3: was "got None"
    ([{"text": "good", "label": 0}, {"text": 5, "label": 0}], ":2: each line needs a string 'text'"),
    ([[1, 2]], ":1: each line must be a JSON object"),
])
def test_a_bad_classifier_file_names_the_line(classifiers, tmp_path, rows, message):
    _, base, _, _ = classifiers
    with pytest.raises(ConfigError, match=message) as err:
        builtin_evaluator(f"classifier-accuracy:{_jsonl(tmp_path / 'bad.jsonl', rows)}", base)
    assert "--help" not in err.value.hint  # about the data file, not the options (hp62b v5: an empty file's was)


@pytest.mark.parametrize("name, rows, message", [
    ("choice-accuracy", [{"prompt": "x", "choices": ["a"], "label": 0}], "at least two"),
    ("choice-accuracy", [{"prompt": "x", "choices": ["a", "b"], "label": 2}],
     r"'label' must be an integer from 0 to 1"),
    ("encoder-accuracy", [{"task": "t", "text": "x", "label": 0}], "task 't' has no 'classes' line"),
    ("encoder-accuracy", [{"task": "t", "classes": ["a", "b"]}], "have classes but no examples"),
    ("encoder-accuracy", [{"task": "t", "classes": ["a", "b"]}, {"task": "t", "text": "x", "label": 2}],
     r"'label' must be an integer from 0 to 1"),
    # hp68b c29: two strings, one empty, said as "at least two"
    ("encoder-accuracy", [{"task": "t", "classes": ["bad", ""]}], r"\(class 1's is empty\)"),
    ("encoder-accuracy", [{"task": "t", "classes": ["bad", " ", "good"]}], r"\(class 1's is empty\)"),
    ("encoder-accuracy", [{"task": "t", "classes": [3, "good"]}], r"\(class 0's is not text but int\)"),
])
def test_bad_choice_and_encoder_files_name_the_problem(classifiers, tmp_path, name, rows, message):
    _, base, _, _ = classifiers
    with pytest.raises(ConfigError, match=message):
        builtin_evaluator(f"{name}:{_jsonl(tmp_path / 'bad.jsonl', rows)}", base)


def test_files_and_bases_a_builtin_cannot_use(classifiers, tmp_path):
    _, base, _, data = classifiers
    with pytest.raises(ConfigError, match="needs its file"):
        builtin_evaluator("classifier-accuracy:", base)
    with pytest.raises(ConfigError, match="the base is a state dict"):
        builtin_evaluator(f"classifier-accuracy:{data}", {"w": torch.zeros(2)})
    with pytest.raises(ConfigError, match="with config.json"):
        builtin_evaluator(f"classifier-accuracy:{data}", tmp_path)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        builtin_evaluator(f"lm-perplexity:{tmp_path / 'latin1.txt'}", base)
    with pytest.raises(ConfigError):
        builtin_evaluator(f"classifier-accuracy:{tmp_path / 'missing.jsonl'}", base)


def test_tune_and_search_take_a_builtin_by_name(classifiers, tmp_path, capsys):
    from tiesmerge.cli.main import main

    _, base, fts, data = classifiers
    flags = ["--base", str(base), *sum((["--model", str(m)] for m in fts), [])]
    code = main(["tune", *flags, "--evaluator", f"classifier-accuracy:{data}", "--grid", "density=0.2",
                 "--grid", "lam=0.5,1.0", "--json", str(tmp_path / "grid.json")])
    assert code == 0, capsys.readouterr().err
    points = json.loads((tmp_path / "grid.json").read_text())["points"]
    assert len(points) == 2 and all(0 <= p["score"] <= 1 for p in points)
    code = main(["search", *flags, "--evaluator", f"classifier-accuracy:{data}", "--grid", "density=0.2",
                 "--grid", "lam=1.0", "--dir", str(tmp_path / "search")])
    assert code == 0, capsys.readouterr().err
    # the evaluator's file is an input: an output over it is refused before any work
    before = data.read_bytes()
    code = main(["tune", *flags, "--evaluator", f"classifier-accuracy:{data}", "--json", str(data), "--force"])
    assert code != 0 and data.read_bytes() == before
    err = capsys.readouterr().err
    # (hp87b c25: "the evaluator's file (classifier-accuracy:val.jsonl) (val.jsonl)", the path said twice)
    assert f"--json is the data file of --evaluator classifier-accuracy ({data})" in err, err


def test_a_builtin_that_does_not_fit_the_bases_kind_says_which_does(classifiers, causal_lm, tmp_path, capsys):
    """Hostile pass 8, F9: lm-perplexity on a BERT classifier printed transformers' 20-line load report (terminal
    escapes, "this checkpoint seem corrupted") before an error about missing tensors."""
    from tiesmerge.errors import ConfigError

    _, base, _, data = classifiers
    text = tmp_path / "t.txt"
    text.write_text("a b c d e f \u2603\u2604\u2605 \u2606\u2607\n")
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ConfigError) as info:
        warnings.simplefilter("always")
        builtin_evaluator(f"lm-perplexity:{text}", base, device="cpu")(_state(base))
    assert "lm-perplexity needs a language model" in str(info.value) and "BertForSequenceClassification" in \
        str(info.value) and "classifier-accuracy fits this base" in info.value.hint
    # (hp84b c48: the text's tokens, unknown to the classifier's tokenizer, were warned of before the real error)
    assert not [w for w in caught if "unknown to the base's tokenizer" in str(w.message)]
    with pytest.raises(ConfigError) as info:
        builtin_evaluator(f"classifier-accuracy:{data}", causal_lm[0], device="cpu")(_state(causal_lm[0]))
    assert "needs a sequence classifier" in str(info.value) and "lm-perplexity or choice-accuracy" in info.value.hint
    captured = capsys.readouterr()
    assert "LOAD REPORT" not in captured.err + captured.out and "\x1b[" not in captured.err + captured.out


def test_choice_accuracy_says_how_many_prompts_lose_their_first_tokens(causal_lm, tmp_path):
    """hp63b c15: a prompt of 90 tokens on a 32-position model lost its first tokens without a word, where the
    other evaluators and the statistics say how many examples they cut."""
    from tiesmerge.errors import MergeWarning

    base, _ = causal_lm
    rows = [{"prompt": "very good film " * 30, "choices": ["good", "bad"], "label": 0},
            {"prompt": "not", "choices": ["good", "bad"], "label": 1}]
    with pytest.warns(MergeWarning, match=r"1 of the 2 examples' prompts with their longest choice are longer than "
                                          r"32 tokens \(the model's positions\)"):
        builtin_evaluator(f"choice-accuracy:{_jsonl(tmp_path / 'c.jsonl', rows)}", base, device="cpu")


def test_texts_the_tokenizer_reads_as_unknown_are_said(tmp_path):
    """hp63b c25: a tokenizer whose vocabulary is its special tokens read every text as [UNK]: accuracies, statistics
    and AdaMerging's coefficients were computed on that without a word (lm-perplexity alone said so)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tiesmerge.errors import MergeWarning
    from tiesmerge.stats.hf import hf_statistics

    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    cfg = transformers.BertConfig(vocab_size=5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32, num_labels=2)
    model = tmp_path / "ub"
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(model)
    fast.save_pretrained(model)
    data = _jsonl(tmp_path / "d.jsonl", [{"text": "hello world good film", "label": k % 2} for k in range(4)])
    with pytest.warns(MergeWarning, match=r"d.jsonl: 100% of the 16 tokens of its first 4 examples are unknown to the "
                                          r"base's tokenizer \(\[UNK\]\), so the scores"):
        builtin_evaluator(f"classifier-accuracy:{data}", model, device="cpu")
    # statistics read the model's own tokenizer: no base there (hp71b c03 said "the base's tokenizer")
    with pytest.warns(MergeWarning, match=r"unknown to the model's tokenizer \(\[UNK\]\), so the statistics"):
        hf_statistics("fisher", model, data)



def test_choice_accuracys_unknown_words_are_counted_per_example(causal_lm, tmp_path):
    """hp68b c33, c43: choice-accuracy listed every prompt, then every choice, as the "examples" of its unknown-word
    check: one line was "its first 3 examples", and with 300 examples the 256 sampled were prompts alone, so choices
    of unknown words went unsaid. Each example is its prompt with its choices."""
    from tiesmerge.errors import MergeWarning

    base, _ = causal_lm
    row = {"prompt": "very", "choices": ["zork blat quux good", "zork blat quux bad"], "label": 0}
    with pytest.warns(MergeWarning, match=r"of its first 256 examples are unknown to the base's tokenizer"):
        builtin_evaluator(f"choice-accuracy:{_jsonl(tmp_path / 'many.jsonl', [row] * 300)}", base, device="cpu")
    with pytest.warns(MergeWarning, match=r"of its one example are unknown"):
        builtin_evaluator(f"choice-accuracy:{_jsonl(tmp_path / 'one.jsonl', [row])}", base, device="cpu")


def test_unknown_choices_and_classes_are_said_and_tokenless_ones_refused(causal_lm, bert_tokenizer, tmp_path):
    """hp69b c09: choices of unknown words went unsaid where long known prompts outweighed them; c10: nothing looked
    at encoder-accuracy's class descriptions; c33: a class of a zero-width space (no tokens: [CLS] [SEP] alone) was
    scored."""
    from tiesmerge.errors import MergeWarning

    base, _ = causal_lm
    rows = [{"prompt": "very good film not bad plot very good", "choices": ["zork blat", "quux"], "label": 0}] * 2
    with pytest.warns(MergeWarning, match=r"c\.jsonl's answer choices: 100% of the 6 tokens of its first 2 examples "
                                          r"are unknown"):
        builtin_evaluator(f"choice-accuracy:{_jsonl(tmp_path / 'c.jsonl', rows)}", base, device="cpu")
    encoder_base = tmp_path / "enc"
    tiny_bert_encoder(bert_tokenizer, seed=0).model.save_pretrained(encoder_base, safe_serialization=True)
    bert_tokenizer.save_pretrained(encoder_base)
    rows = [{"task": "t", "classes": ["zork blat", "quux"]}, {"task": "t", "text": "the sun", "label": 0}]
    with pytest.warns(MergeWarning, match=r"e\.jsonl: the class descriptions of task 't': 100% of the 3 tokens of "
                                          r"its first 2 class descriptions"):
        builtin_evaluator(f"encoder-accuracy:{_jsonl(tmp_path / 'e.jsonl', rows)}", encoder_base, device="cpu",
                          max_length=16)
    # task by task: one task's unknown classes are not hidden by another's known ones (hp70b c24)
    known = [{"task": "k", "classes": ["the sun is a red thing", "the house is a blue thing"]},
             {"task": "k", "text": "the sun", "label": 0}]
    with pytest.warns(MergeWarning, match=r"the class descriptions of task 't': 100%"):
        builtin_evaluator(f"encoder-accuracy:{_jsonl(tmp_path / 'e2.jsonl', known + rows)}", encoder_base,
                          device="cpu", max_length=16)
    texts = [{"task": "t", "classes": ["the sun", "a house"]}, {"task": "t", "text": "\u200b\u200b", "label": 0},
             {"task": "t", "text": "the sun", "label": 1}]  # hp70b c47: a text of no tokens, counted silently
    with pytest.warns(MergeWarning, match=r"1 of its first 2 examples are no tokens to the base's tokenizer"):
        builtin_evaluator(f"encoder-accuracy:{_jsonl(tmp_path / 'zt.jsonl', texts)}", encoder_base, device="cpu",
                          max_length=16)
    rows[0] = {"task": "t", "classes": ["sun", "\u200b"]}
    with pytest.raises(ConfigError, match=r"task 't': the class '\\u200b' has no tokens to the base's tokenizer"):
        builtin_evaluator(f"encoder-accuracy:{_jsonl(tmp_path / 'z.jsonl', rows)}", encoder_base, device="cpu",
                          max_length=16)


def test_a_multi_label_classifier_is_refused_where_a_softmax_is_read(classifiers, tmp_path):
    """hp71b c32, c41: a classifier whose config says problem_type multi_label_classification (a sigmoid per label)
    was scored by classifier-accuracy, and its Fisher computed, as a softmax over exclusive classes, without a word."""
    import json
    import shutil

    from tiesmerge.stats.hf import hf_statistics

    _, base, _, data = classifiers
    multi = tmp_path / "multi"
    shutil.copytree(base, multi)
    config = json.loads((multi / "config.json").read_text())
    (multi / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    with pytest.raises(ConfigError, match="problem_type multi_label_classification: classifier-accuracy reads"):
        builtin_evaluator(f"classifier-accuracy:{data}", multi)
    with pytest.raises(ConfigError, match="problem_type multi_label_classification: the Fisher of stats fisher"):
        hf_statistics("fisher", multi, data)

def test_a_gpt2_configs_positions_and_its_pad_token_are_read(tmp_path):
    """hp64b c34, c35: a GPT-2 config names its positions n_positions, which the evaluators' checks missed (texts cut
    to its 32 positions without a word); c27: following the hint to set pad_token_id in config.json, the tokenizer
    still had no pad token ("Asking to pad but the tokenizer does not have a padding token", blamed on the config)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tiesmerge.evaluation.loading import align_pad_token, fitted_length_of

    cfg = transformers.GPT2Config(vocab_size=20, n_positions=32, n_embd=16, n_layer=1, n_head=2, num_labels=2,
                                  pad_token_id=0)
    model = transformers.GPT2ForSequenceClassification(cfg)
    model.save_pretrained(tmp_path / "gpt")
    assert fitted_length_of(tmp_path / "gpt", 128) == 32
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(20)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w1")
    assert fast.pad_token_id is None
    align_pad_token(model, fast, tmp_path / "gpt")
    assert fast.pad_token_id == 0
    fast(["w2 w3", "w4"], padding=True)  # pads now
