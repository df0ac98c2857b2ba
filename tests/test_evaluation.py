"""Evaluation layer on tiny, randomly initialised models built here (no downloads): sentence
encoder + frozen cosine heads, suite accuracy, fine-tuning, results tables, rank classification."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from tiesmerge.evaluation.encoder import LOGIT_SCALE, CosineHead, SentenceEncoder, build_head, mean_pool  # noqa: E402
from tiesmerge.evaluation.finetune import TrainConfig, finetune  # noqa: E402
from tiesmerge.evaluation.rank_classification import (  # noqa: E402
    ChoiceExample,
    rank_classification_accuracy,
    score_choices,
)
from tiesmerge.evaluation.results import ResultRow, ResultsTable  # noqa: E402
from tiesmerge.evaluation.suite_eval import SuiteResult, evaluate_encoder, task_accuracy  # noqa: E402

WORDS = ("the cat sat on a mat dog ran far away bird sang song tree green red blue house small big "
         "old new river fast slow sun moon star night day rain snow cold warm").split()

# ---------------------------------------------------------------------------------------------
# sentence encoder


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    # transformers 5 takes the vocab as ``vocab=`` (a ``vocab_file=`` keyword is silently ignored)
    try:
        tok = transformers.BertTokenizerFast(vocab=str(vocab))
    except TypeError:  # transformers 4
        tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    assert len(tok) == 5 + len(WORDS)
    assert tok.unk_token_id not in tok(" ".join(WORDS))["input_ids"]
    return tok


def _tiny_bert_encoder(tokenizer, seed: int = 0) -> SentenceEncoder:
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    return SentenceEncoder(model, tokenizer, max_length=32)


@pytest.fixture(scope="module")
def encoder(bert_tokenizer):
    enc = _tiny_bert_encoder(bert_tokenizer)
    enc.eval()
    return enc


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]],
                           [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]],
                           [[-2.0, 0.0], [50.0, 50.0], [50.0, 50.0]]])  # (3, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    expected = torch.tensor([[2.0, 3.0], [7.0, 8.0], [-2.0, 0.0]])
    assert torch.equal(mean_pool(hidden, mask), expected)


def test_encode_returns_unit_vectors_in_input_order(encoder):
    # lengths deliberately unsorted, so the length-sorted batches must be scattered back
    texts = ["the cat sat on a mat far away", "dog", "bird sang a song", "a small red house by the river",
             "sun", "moon and star at night", "cold rain", "the big old tree is green"]
    batched = encoder.encode(texts, batch_size=3)
    assert batched.shape == (len(texts), 32)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(texts)), atol=1e-5)
    single = torch.cat([encoder.encode([t]) for t in texts])
    assert torch.allclose(batched, single, atol=1e-5)
    # the rows are distinct, so a permutation would be caught
    cos = batched @ batched.T
    assert (cos - torch.eye(len(texts))).max() < 0.9999


def test_encode_restores_training_mode(encoder):
    encoder.train()
    try:
        encoder.encode(["the cat"])
        assert encoder.training
    finally:
        encoder.eval()
    encoder.encode(["the cat"])
    assert not encoder.training


def test_cosine_head_is_scaled_cosine(encoder):
    descriptions = ["a cat", "a dog", "a bird sang"]
    head = build_head(encoder, descriptions, scale=7.0)
    assert head.scale == 7.0
    assert torch.allclose(head.class_embeddings, encoder.encode(descriptions), atol=1e-6)
    queries = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    queries = torch.nn.functional.normalize(queries, dim=-1)
    cosine = torch.nn.functional.cosine_similarity(queries[:, None, :], head.class_embeddings[None, :, :], dim=-1)
    assert torch.allclose(head.logits(queries), 7.0 * cosine, atol=1e-5)
    assert build_head(encoder, descriptions).scale == LOGIT_SCALE


# ---------------------------------------------------------------------------------------------
# suite accuracy

TASK_A = ["the cat sat on a mat", "a dog ran far away", "bird sang a song", "the big old tree"]
TASK_B = ["cold rain at night", "warm sun on a day", "the moon and a star", "snow on a small house",
          "a fast river"]


def test_task_accuracy_perfect_with_self_heads_and_drops_when_permuted(encoder):
    examples = [(t, i) for i, t in enumerate(TASK_A)]
    head = build_head(encoder, TASK_A)
    assert task_accuracy(encoder, head, examples, batch_size=3) == 1.0
    derangement = [1, 2, 3, 0]  # no class keeps its own row
    permuted = CosineHead(head.class_embeddings[derangement], head.scale)
    assert task_accuracy(encoder, permuted, examples, batch_size=3) == 0.0
    # half the labels wrong -> 0.5
    half = [(t, (i + 1) % 4 if i % 2 else i) for i, t in enumerate(TASK_A)]
    assert task_accuracy(encoder, head, half) == 0.5
    with pytest.raises(ValueError):
        task_accuracy(encoder, head, [])


def test_evaluate_encoder_per_task(encoder):
    splits = {"a": [(t, i) for i, t in enumerate(TASK_A)], "b": [(t, i) for i, t in enumerate(TASK_B)]}
    heads = {"a": build_head(encoder, TASK_A), "b": build_head(encoder, TASK_B)}
    result = evaluate_encoder(encoder, splits, heads, batch_size=2)
    assert result.accuracy == {"a": 1.0, "b": 1.0}
    emb_b = heads["b"].class_embeddings
    heads["b"] = CosineHead(emb_b[[1, 2, 3, 4, 0]], heads["b"].scale)
    result = evaluate_encoder(encoder, splits, heads)
    assert result.accuracy == {"a": 1.0, "b": 0.0}
    assert result.mean == 0.5


def test_suite_result_arithmetic():
    r = SuiteResult({"a": 0.5, "b": 1.0, "c": 0.3})
    ref = SuiteResult({"a": 1.0, "b": 0.8, "c": 0.6})
    assert r.mean == pytest.approx(0.6)
    assert r.normalized(ref) == pytest.approx({"a": 0.5, "b": 1.25, "c": 0.5})
    assert r.normalized_mean(ref) == pytest.approx(0.75)
    assert r.normalized_mean(r) == pytest.approx(1.0)
    zero_ref = SuiteResult({"a": 0.0, "b": 0.8, "c": 0.6})
    assert math.isnan(r.normalized(zero_ref)["a"])


# ---------------------------------------------------------------------------------------------
# fine-tuning

FT_DATA = {
    "animals": [("the cat sat", 0), ("a cat ran", 0), ("cat on a mat", 0), ("the old cat", 0),
                ("the dog sat", 1), ("a dog ran", 1), ("dog on a mat", 1), ("the old dog", 1)],
    "weather": [("cold rain", 0), ("snow at night", 0), ("cold snow", 0), ("rain and snow", 0),
                ("warm sun", 1), ("sun on a day", 1), ("warm day", 1), ("the sun", 1)],
}
FT_DESCRIPTIONS = {"animals": ["a cat", "a dog"], "weather": ["cold", "warm"]}
FT_CONFIG = TrainConfig(epochs=4, lr=3e-3, batch_size=4, warmup_fraction=0.1, seed=3)


def _ft_setup(tokenizer):
    enc = _tiny_bert_encoder(tokenizer, seed=5)
    heads = {t: build_head(enc, d) for t, d in FT_DESCRIPTIONS.items()}
    return enc, heads


@torch.no_grad()
def _dataset_loss(enc, heads) -> float:
    enc.eval()
    losses = []
    for task, rows in FT_DATA.items():
        emb = enc.encode([t for t, _ in rows])
        labels = torch.tensor([y for _, y in rows])
        losses.append(torch.nn.functional.cross_entropy(heads[task].logits(emb), labels))
    return float(torch.stack(losses).mean())


def test_finetune_lowers_loss_and_trains_only_the_encoder(bert_tokenizer):
    enc, heads = _ft_setup(bert_tokenizer)
    head_before = {t: h.class_embeddings.clone() for t, h in heads.items()}
    weights_before = {k: v.clone() for k, v in enc.state_dict().items()}
    loss_before = _dataset_loss(enc, heads)
    steps = []
    log = finetune(enc, heads, FT_DATA, FT_CONFIG, on_step=lambda s, total, loss: steps.append((s, total, loss)))
    # 2 tasks x 8 examples / batch 4 = 4 batches per epoch
    assert log.steps == 4 * 4 == len(steps)
    assert log.examples == 4 * 16
    assert [s for s, _, _ in steps] == list(range(1, 17)) and {t for _, t, _ in steps} == {16}
    assert log.final_loss == steps[-1][2]
    assert not enc.training
    loss_after = _dataset_loss(enc, heads)
    assert loss_after < 0.7 * loss_before, (loss_before, loss_after)
    first_epoch = sum(x for _, _, x in steps[:4]) / 4
    last_epoch = sum(x for _, _, x in steps[-4:]) / 4
    assert last_epoch < first_epoch
    for t, h in heads.items():
        assert torch.equal(h.class_embeddings, head_before[t])
        assert not h.class_embeddings.requires_grad
    changed = [k for k, v in enc.state_dict().items() if not torch.equal(v, weights_before[k])]
    assert any("encoder.layer.0" in k for k in changed) and any("embeddings" in k for k in changed)


def test_finetune_is_deterministic_for_a_seed(bert_tokenizer):
    config = TrainConfig(epochs=2, lr=3e-3, batch_size=4, seed=3)
    enc, heads = _ft_setup(bert_tokenizer)
    twin, other = copy.deepcopy(enc), copy.deepcopy(enc)
    torch.manual_seed(111)  # the global RNG differs between the runs: finetune must seed its own
    finetune(enc, heads, FT_DATA, config)
    torch.manual_seed(222)
    finetune(twin, heads, FT_DATA, config)
    a, b = enc.state_dict(), twin.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # another seed trains differently (dropout and batch order depend on it)
    finetune(other, heads, FT_DATA, dataclasses.replace(config, seed=4))
    assert any(not torch.equal(a[k], v) for k, v in other.state_dict().items())


# ---------------------------------------------------------------------------------------------
# results tables

TASKS = ("a", "b")


def _table() -> ResultsTable:
    table = ResultsTable(tasks=TASKS, meta={"seed": 0})
    table.add(ResultRow("fine-tuned", SuiteResult({"a": 0.9, "b": 0.8})))
    table.add(ResultRow("ties", SuiteResult({"a": 0.81234, "b": 0.6}), validation=True, note="k=0.2"))
    table.add(ResultRow("average", SuiteResult({"a": 0.45, "b": 0.4})))
    return table


def test_results_markdown():
    md = _table().to_markdown()
    lines = md.rstrip("\n").split("\n")
    assert md.endswith("\n")
    assert len(lines) == 2 + 3
    assert lines[0] == "| method | val | a | b | mean | norm. mean |"
    assert lines[1].count("---") == 6
    assert lines[2] == "| fine-tuned | no | 90.0 | 80.0 | **85.0** | 100.0 |"
    # mean (0.81234 + 0.6) / 2 = 70.617 %; normalized (0.81234/0.9 + 0.6/0.8) / 2 = 82.63 %
    assert lines[3] == "| ties (k=0.2) | yes | 81.2 | 60.0 | **70.6** | 82.6 |"
    # normalized (0.5 + 0.5) / 2
    assert lines[4] == "| average | no | 45.0 | 40.0 | **42.5** | 50.0 |"


def test_results_markdown_without_reference():
    table = ResultsTable(tasks=TASKS)
    table.add(ResultRow("ties", SuiteResult({"a": 0.5, "b": 0.25})))
    assert table.to_markdown().splitlines()[2] == "| ties | no | 50.0 | 25.0 | **37.5** | – |"
    assert "normalized" not in table.to_dict()["rows"][0]


def test_results_add_replaces_same_name_and_rejects_missing_task():
    table = _table()
    table.add(ResultRow("ties", SuiteResult({"a": 0.1, "b": 0.2}), validation=True))
    assert [r.name for r in table.rows] == ["fine-tuned", "average", "ties"]
    assert table.rows[-1].result.accuracy == {"a": 0.1, "b": 0.2}
    # the same method without validation is another row (Table 1 has both)
    table.add(ResultRow("ties", SuiteResult({"a": 0.3, "b": 0.4})))
    assert [(r.name, r.validation) for r in table.rows][-2:] == [("ties", True), ("ties", False)]
    with pytest.raises(ValueError, match="missing"):
        table.add(ResultRow("broken", SuiteResult({"a": 0.5})))
    with pytest.raises(ValueError, match="extra"):
        table.add(ResultRow("broken", SuiteResult({"a": 0.5, "b": 0.5, "c": 0.5})))
    assert "broken" not in [r.name for r in table.rows]


def test_results_dict_round_trip():
    table = _table()
    data = table.to_dict()
    assert data["tasks"] == ["a", "b"] and data["reference"] == "fine-tuned" and data["meta"] == {"seed": 0}
    ties = data["rows"][1]
    assert ties["validation"] is True and ties["note"] == "k=0.2"
    assert ties["mean"] == pytest.approx(0.70617)
    assert ties["normalized"] == pytest.approx({"a": 0.81234 / 0.9, "b": 0.75})
    assert ties["normalized_mean"] == pytest.approx((0.81234 / 0.9 + 0.75) / 2)
    back = ResultsTable.from_dict(json.loads(json.dumps(data)))
    assert back.to_dict() == data
    assert back.to_markdown() == table.to_markdown()


def test_results_write(tmp_path):
    table = _table()
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    table.write(md, js, preamble="# Results\n\n", epilogue="\nend\n")
    assert md.read_text() == "# Results\n\n" + table.to_markdown() + "\nend\n"
    assert json.loads(js.read_text()) == table.to_dict()
    assert ResultsTable.from_dict(json.loads(js.read_text())).to_markdown() == table.to_markdown()


# ---------------------------------------------------------------------------------------------
# rank classification

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
