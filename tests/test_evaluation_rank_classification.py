"""Rank classification (evaluation/rank_classification.py): choice log-likelihoods of causal and
seq2seq models against token-by-token brute force, and the argmax rule."""

from __future__ import annotations

import pytest
import torch

from tiesmerge.evaluation.rank_classification import (
    ChoiceExample,
    rank_classification_accuracy,
    score_choices,
)

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


LM_WORDS = "the cat sat on a mat dog ran far yes no maybe not at all really is it true question answer".split()


def _wordlevel_tokenizer(template: str, special: tuple[str, int], padding_side: str = "right"):
    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<s>", "<unk>", *LM_WORDS])}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tk.post_processor = tokenizers.processors.TemplateProcessing(single=template, special_tokens=[special])
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                               bos_token="<s>", unk_token="<unk>",
                                               model_input_names=["input_ids", "attention_mask"])
    tok.padding_side = padding_side
    return tok


LM_VOCAB = 4 + len(LM_WORDS)


EXAMPLES = [
    ChoiceExample("is it true the cat sat on a mat", ("yes", "no", "not at all really"), 0),
    ChoiceExample("the dog ran", ("far", "maybe not"), 1),
    ChoiceExample("question", ("answer is yes", "no", "the cat", "maybe"), 2),
]


def _causal(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(vocab_size=LM_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                       initializer_range=0.5, pad_token_id=0, bos_token_id=2, eos_token_id=1)
        model = transformers.LlamaForCausalLM(cfg)
    else:  # gpt2, with its default dropout: the scorer must switch to eval mode
        cfg = transformers.GPT2Config(vocab_size=LM_VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                      initializer_range=0.5, bos_token_id=2, eos_token_id=1)
        model = transformers.GPT2LMHeadModel(cfg)
    model.train()
    return model


@torch.no_grad()
def _brute_causal(model, tok, prompt: str, choice: str) -> float:
    """Chain rule one token at a time: log p(c_j | prompt, c_<j) from the last position of each prefix."""
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    c = tok(choice, add_special_tokens=False)["input_ids"]
    total = 0.0
    for j in range(len(c)):
        prefix = torch.tensor([p + c[:j]])
        logits = model(input_ids=prefix).logits[0, -1].double()
        total += float(logits.log_softmax(-1)[c[j]])
    return total


def _seq2seq():
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=LM_VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                                num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                initializer_factor=2.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg)
    model.train()
    return model


@torch.no_grad()
def _brute_seq2seq(model, tok, prompt: str, choice: str) -> float:
    """Decode the target one token at a time after the decoder start token, no padding anywhere."""
    enc = torch.tensor([tok(prompt)["input_ids"]])
    target = tok(choice, add_special_tokens=True)["input_ids"]
    start = model.config.decoder_start_token_id
    total = 0.0
    for j in range(len(target)):
        dec = torch.tensor([[start, *target[:j]]])
        logits = model(input_ids=enc, decoder_input_ids=dec).logits[0, -1].double()
        total += float(logits.log_softmax(-1)[target[j]])
    return total


def _check_scores(scores, expected):
    assert [len(s) for s in scores] == [len(ex.choices) for ex in EXAMPLES]
    flat = [x for s in scores for x in s]
    flat_expected = [x for s in expected for x in s]
    assert flat == pytest.approx(flat_expected, rel=1e-5, abs=1e-4)
    # the choices really are told apart (so an off-by-one or a padding leak would show)
    assert max(flat) - min(flat) > 1.0


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_score_choices_causal_matches_brute_force(kind, padding_side):
    model = _causal(kind)
    tok = _wordlevel_tokenizer("<s> $A", ("<s>", 2), padding_side)
    assert tok("the cat", add_special_tokens=True)["input_ids"][0] == 2
    scores = score_choices(model, tok, EXAMPLES, batch_size=4)  # 9 pairs -> batches of 4, 4, 1
    assert not model.training
    expected = [[_brute_causal(model, tok, ex.prompt, c) for c in ex.choices] for ex in EXAMPLES]
    _check_scores(scores, expected)
    # batching does not change anything
    one_by_one = score_choices(model, tok, EXAMPLES, batch_size=1)
    assert sum(one_by_one, []) == pytest.approx(sum(scores, []), rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_score_choices_seq2seq_matches_brute_force(padding_side):
    model = _seq2seq()
    tok = _wordlevel_tokenizer("$A </s>", ("</s>", 1), padding_side)
    assert tok("yes")["input_ids"] == [LM_WORDS.index("yes") + 4, 1]
    scores = score_choices(model, tok, EXAMPLES, batch_size=4)
    assert not model.training
    expected = [[_brute_seq2seq(model, tok, ex.prompt, c) for c in ex.choices] for ex in EXAMPLES]
    _check_scores(scores, expected)
    one_by_one = score_choices(model, tok, EXAMPLES, batch_size=1)
    assert sum(one_by_one, []) == pytest.approx(sum(scores, []), rel=1e-5, abs=1e-4)


def test_score_choices_causal_empty_prompt_without_bos_raises():
    # with no BOS token an empty prompt leaves the first choice token unconditioned: it used to be
    # scored from a wrapped-around slice (silently wrong); now it is an error
    model = _causal("gpt2")
    tok = _wordlevel_tokenizer("$A", ("<s>", 2))
    assert tok("", add_special_tokens=True)["input_ids"] == []
    with pytest.raises(ValueError, match="no tokens"):
        score_choices(model, tok, [ChoiceExample("", ("yes", "no"), 0)])
    with_bos = _wordlevel_tokenizer("<s> $A", ("<s>", 2))
    scores = score_choices(model, with_bos, [ChoiceExample("", ("yes", "not at all"), 0)], batch_size=2)
    assert scores[0] == pytest.approx([_brute_causal(model, with_bos, "", c) for c in ("yes", "not at all")],
                                      rel=1e-5, abs=1e-4)


def test_rank_classification_accuracy_is_argmax_rule():
    model = _causal("llama")
    tok = _wordlevel_tokenizer("<s> $A", ("<s>", 2))
    scores = score_choices(model, tok, EXAMPLES, batch_size=4)
    best = [max(range(len(s)), key=s.__getitem__) for s in scores]
    right = [ChoiceExample(ex.prompt, ex.choices, b) for ex, b in zip(EXAMPLES, best)]
    wrong = [ChoiceExample(ex.prompt, ex.choices, (b + 1) % len(ex.choices)) for ex, b in zip(EXAMPLES, best)]
    assert rank_classification_accuracy(model, tok, right, batch_size=4) == 1.0
    assert rank_classification_accuracy(model, tok, wrong, batch_size=4) == 0.0
    mixed = [right[0], wrong[1], right[2]]
    assert rank_classification_accuracy(model, tok, mixed, batch_size=2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        rank_classification_accuracy(model, tok, [])
