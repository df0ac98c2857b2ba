"""Hostile pass 40 (issue 13): the built-in evaluators' and forwards' preconditions, checked before the first merge
(V1 a tokenizer larger than the embedding, V2 a regression head, L7 BART's positions and an encoder-decoder for
lm-perplexity, B3 a label past the classes, V3 repeated answer choices)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from test_evaluation_rank_classification import LM_VOCAB, _wordlevel_tokenizer  # noqa: E402
from tiesmerge.errors import CheckpointError, ConfigError  # noqa: E402

NOT_ITS_TOKENIZER = r"its tokenizer has {} tokens \(ids up to {}\), past the {} rows of .* the tokenizer is not this"


def _llama(directory, vocab_size=LM_VOCAB):
    """A tiny Llama whose config matches its weights, with the word-level tokenizer of LM_VOCAB tokens."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   pad_token_id=0, bos_token_id=2, eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(directory)
    _wordlevel_tokenizer("<s> $A", ("<s>", 2)).save_pretrained(directory)
    return model


def _bert_classifier(directory, bert_tokenizer, vocab_size=None, num_labels=2):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=vocab_size or len(bert_tokenizer), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                                  num_labels=num_labels)
    model = transformers.BertForSequenceClassification(cfg)
    model.save_pretrained(directory)
    bert_tokenizer.save_pretrained(directory)
    return model


def _write_lines(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_tokenizer_larger_than_the_embedding_is_refused_by_the_lm_evaluators_when_made(tmp_path):
    """hp40 V1: a Llama of 8 embedding rows (its config right) beside a tokenizer of LM_VOCAB tokens: lm-perplexity
    and choice-accuracy failed after the first merge with "raised IndexError: index out of range in self / hint: fix
    the evaluator". They refuse it when they are made, naming the folder and both sizes."""
    from tiesmerge.evaluation.builtin import ChoiceAccuracy, LMPerplexity

    _llama(tmp_path / "lm", vocab_size=8)
    (tmp_path / "t.txt").write_text("the cat sat on a mat " * 5)
    data = _write_lines(tmp_path / "ch.jsonl", [{"prompt": "the cat", "choices": ["sat", "ran"], "label": 0}])
    said = NOT_ITS_TOKENIZER.format(LM_VOCAB, LM_VOCAB - 1, 8)
    with pytest.raises(CheckpointError, match=rf"lm: {said}") as caught:
        LMPerplexity(tmp_path / "lm", tmp_path / "t.txt")
    assert "tokenizer files that came with these weights" in caught.value.hint
    with pytest.raises(CheckpointError, match=said):
        ChoiceAccuracy(tmp_path / "lm", data)


def test_a_tokenizer_larger_than_the_embedding_is_refused_by_classifier_accuracy_adapt_and_stats(tmp_path,
                                                                                                 bert_tokenizer):
    """hp40 V1: a BERT classifier of 6 embedding rows with a larger vocab.txt: classifier-accuracy, adapt's forward and
    stats said "the model fails in its forward pass (IndexError ...)" with a hint to use "the model's original config"
    (the config was right; adapt and the evaluator named no folder). Each now names the tokenizer, and
    encoder-accuracy (and adapt's encoder forward) likewise."""
    from tiesmerge.evaluation.builtin import ClassifierAccuracy, EncoderAccuracy
    from tiesmerge.evaluation.encoder import SentenceEncoder
    from tiesmerge.evaluation.forward import load_forward
    from tiesmerge.stats.hf import hf_statistics

    model_dir = tmp_path / "cls"
    _bert_classifier(model_dir, bert_tokenizer, vocab_size=6)
    data = _write_lines(tmp_path / "v.jsonl", [{"text": "the cat sat", "label": 0}, {"text": "a dog ran", "label": 1}])
    said = NOT_ITS_TOKENIZER.format(len(bert_tokenizer), len(bert_tokenizer) - 1, 6)
    with pytest.raises(CheckpointError, match=rf"cls: {said}"):
        ClassifierAccuracy(model_dir, data)
    with pytest.raises(CheckpointError, match=rf"cls: {said}"):
        load_forward("classifier", model_dir)
    with pytest.raises(CheckpointError, match=rf"cls: {said}"):
        hf_statistics("gram", model_dir, data)

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=6, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "enc")
    bert_tokenizer.save_pretrained(tmp_path / "enc")
    with pytest.raises(CheckpointError, match=rf"enc: {said}"):
        SentenceEncoder.from_pretrained(tmp_path / "enc")
    heads = _write_lines(tmp_path / "e.jsonl", [{"task": "t", "classes": ["cat", "dog"]},
                                                {"task": "t", "text": "the cat sat", "label": 0}])
    with pytest.raises(CheckpointError, match=rf"enc: {said}"):
        EncoderAccuracy(tmp_path / "enc", heads)


def test_an_index_error_in_a_forward_is_not_blamed_on_the_config_alone():
    """hp40 V1: forward_checked said of every IndexError "its config.json likely does not describe these weights ...
    use the model's original config"; an embedding's "index out of range" is as often a tokenizer's id."""
    from tiesmerge.evaluation.loading import forward_checked

    with pytest.raises(CheckpointError, match=r"m: the model fails in its forward pass \(IndexError") as caught:
        with forward_checked("m"):
            torch.nn.Embedding(4, 2)(torch.tensor([7]))
    assert "a tokenizer that is not this model's" in caught.value.hint


def test_classifier_accuracy_refuses_a_regression_head_before_any_merge(tmp_path, bert_tokenizer, capsys):
    """hp40 V2: classifier-accuracy on a num_labels=1 classifier scored every candidate 1.0 (the argmax of one logit
    is class 0): a constant score, an arbitrary "best". Refused as adapt and stats refuse it, from config.json, before
    the search merges anything."""
    from helpers_ckpt import run_cli
    from tiesmerge.evaluation.builtin import ClassifierAccuracy

    for name in ("base", "a", "b"):
        _bert_classifier(tmp_path / name, bert_tokenizer, num_labels=1)
    data = _write_lines(tmp_path / "v.jsonl", [{"text": "the cat sat", "label": 0}, {"text": "a dog ran", "label": 0}])
    with pytest.raises(ConfigError, match=r"a head of 1 output \(num_labels 1: a regression head\) gives no "
                                          r"distribution over classes"):
        ClassifierAccuracy(tmp_path / "base", data)
    rc, _, err = run_cli(["search", "--base", tmp_path / "base", "--model", tmp_path / "a", "--model", tmp_path / "b",
                          "--evaluator", f"classifier-accuracy:{data}", "--grid", "density=0.2", "--grid", "lam=1.0",
                          "--dir", tmp_path / "s"], capsys)
    assert rc != 0 and "a head of 1 output" in err and "score 1.0000" not in err, err
    assert not (tmp_path / "s").exists()


def test_classifier_accuracy_names_the_line_and_the_label_past_the_classes(tmp_path, bert_tokenizer):
    """hp40 B3: `label: 7` on a 2-class model said "lab7.jsonl: a label is >= the model's 2 classes" (no line, no
    value), after the first merge, with the command-options hint. Refused when the evaluator is made, naming the
    line and the label, with a hint about the data file."""
    from tiesmerge.evaluation.builtin import ClassifierAccuracy

    _bert_classifier(tmp_path / "cls", bert_tokenizer)
    data = _write_lines(tmp_path / "lab7.jsonl", [{"text": "the cat sat", "label": 0}, {"text": "a dog", "label": 7}])
    with pytest.raises(ConfigError, match=r"lab7\.jsonl:2: 'label' must be an integer from 0 to 1, got 7") \
            as caught:
        ClassifierAccuracy(tmp_path / "cls", data)
    assert caught.value.hint and "data file" in caught.value.hint and "2 classes" in caught.value.hint


def test_choice_accuracy_refuses_a_row_whose_choices_repeat(tmp_path):
    """hp40 V3: choices ["sat", "sat"] always tie and the tie goes to the first, so label 1 could never be right; the
    row scored 0 without a word. Refused as encoder-accuracy's classes and adapt --choices refuse repeats."""
    from tiesmerge.evaluation.builtin import ChoiceAccuracy

    _llama(tmp_path / "lm")
    data = _write_lines(tmp_path / "dup.jsonl", [{"prompt": "the cat", "choices": ["sat", "ran"], "label": 0},
                                                 {"prompt": "the cat", "choices": ["sat", " sat"], "label": 1}])
    # (hp46 c41: said as differing only in spaces, which they do)
    with pytest.raises(ConfigError, match=r"dup\.jsonl:2: the choice 'sat' is listed twice \('sat' and ' sat' differ "
                                          r"only in spaces\), so the model could never tell those choices apart"):
        ChoiceAccuracy(tmp_path / "lm", data)


def _bart(directory, positions=16):
    torch.manual_seed(0)
    cfg = transformers.BartConfig(vocab_size=LM_VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=positions, pad_token_id=0,
                                  eos_token_id=1, bos_token_id=2, decoder_start_token_id=1, forced_eos_token_id=1)
    model = transformers.BartForConditionalGeneration(cfg)
    model.save_pretrained(directory)
    _wordlevel_tokenizer("$A </s>", ("</s>", 1)).save_pretrained(directory)
    return model


def test_bart_takes_all_its_positions_and_a_long_choice_is_not_said_to_follow_a_prompt(tmp_path):
    """hp40 L7: BART's position table holds max_position_embeddings + 2 rows (its offset inside it), and
    fitted_length subtracted the 2 again: a 16-position BART took 15-token targets at most. A choice of 16 tokens
    (its EOS included) now scores; one of 17 is refused without "a prompt token before it" (the prompt goes to the
    encoder)."""
    from tiesmerge.evaluation.builtin import ChoiceAccuracy
    from tiesmerge.evaluation.loading import fitted_length

    model = _bart(tmp_path / "bart")
    assert model.model.decoder.embed_positions.weight.shape[0] == 18
    assert fitted_length(model, 512) == 16
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fifteen = " ".join(["the", "cat", "sat", "on", "a"] * 3)  # 15 words and EOS: 16 tokens
    data = _write_lines(tmp_path / "c16.jsonl", [{"prompt": "the dog", "choices": [fifteen, "ran"], "label": 0}])
    assert 0.0 <= ChoiceAccuracy(tmp_path / "bart", data)(state) <= 1.0
    data = _write_lines(tmp_path / "c17.jsonl", [{"prompt": "the dog", "choices": [fifteen + " mat", "ran"],
                                                  "label": 0}])
    with pytest.raises(ConfigError, match=r"is 17 tokens; counted with its special tokens, that passes the 16 "
                                          r"positions of the decoder") as caught:
        ChoiceAccuracy(tmp_path / "bart", data)(state)
    assert "prompt token" not in caught.value.message


def test_lm_perplexity_refuses_an_encoder_decoder_when_it_is_made(tmp_path):
    """hp40 L7: lm-perplexity on a BART was refused only after the first merge, with the command-options hint."""
    from tiesmerge.evaluation.builtin import LMPerplexity

    _bart(tmp_path / "bart")
    (tmp_path / "t.txt").write_text("the cat sat on a mat " * 5)
    with pytest.raises(ConfigError, match=r"bart: lm-perplexity scores causal LMs, and this is an encoder-decoder") \
            as caught:
        LMPerplexity(tmp_path / "bart", tmp_path / "t.txt")
    assert "choice-accuracy" in caught.value.hint
