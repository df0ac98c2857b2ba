"""Task forwards (evaluation/forward.py): each kind's logits against the model called directly,
weights swapped in through functional_call, choice scores against rank classification, entropy."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers_models import TEXTS
from tiesmerge.errors import ConfigError
from tiesmerge.evaluation.encoder import build_head
from tiesmerge.evaluation.forward import (
    ChoiceLogits,
    ClassifierLogits,
    EncoderHeadLogits,
    FunctionLogits,
    TaskForward,
    checkpoint_names,
    entropy,
    load_forward,
    logits,
)
from tiesmerge.evaluation.rank_classification import ChoiceExample, score_choices

transformers = pytest.importorskip("transformers")


def _perturbed(state: dict[str, torch.Tensor], scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {k: v + scale * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in state.items()}


def test_encoder_heads_logits_and_swapped_weights(encoder):
    heads = {"colour": build_head(encoder, ["red", "green blue"]),
             "animal": build_head(encoder, ["cat", "dog", "bird"])}
    fwd = EncoderHeadLogits(encoder, heads)
    assert isinstance(fwd, TaskForward)
    rows = [{"text": "the cat sat"}, {"text": "a red house"}]
    batch = fwd.encode(rows, "animal")
    with torch.no_grad():
        out = logits(fwd, batch, "animal")
        assert out.shape == (2, 3)
        direct = heads["animal"].logits(encoder(encoder.tokenize(["the cat sat", "a red house"])))
        torch.testing.assert_close(out, direct)
        assert logits(fwd, batch, "colour").shape == (2, 2)
        # other weights, keyed like the checkpoint, swapped in for one call: the same as a copy holding them
        state = _perturbed(encoder.model.state_dict())
        other = copy.deepcopy(encoder)
        other.model.load_state_dict(state)
        swapped = logits(fwd, batch, "animal", params=state)
        torch.testing.assert_close(swapped, heads["animal"].logits(other(batch)))
        assert not torch.allclose(swapped, out)
        torch.testing.assert_close(logits(fwd, batch, "animal"), out)  # the module's own weights are untouched
    assert "embeddings.word_embeddings.weight" in checkpoint_names(fwd)
    with pytest.raises(ConfigError, match="no head for task 'plants'"):
        fwd.encode(rows, "plants")


def test_classifier_logits_from_a_directory(classifiers):
    root, base, fts, data = classifiers
    fwd = load_forward("classifier", base)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(base).eval()
    rows = [{"text": t} for t, _ in TEXTS]
    batch = fwd.encode(rows, "any")
    with torch.no_grad():
        torch.testing.assert_close(logits(fwd, batch, "any"), model(**batch).logits)
    assert isinstance(fwd, ClassifierLogits) and "classifier.weight" in checkpoint_names(fwd)
    with pytest.raises(ConfigError, match="unknown forward kind 'vision'"):
        load_forward("vision", base)
    with pytest.raises(ConfigError, match="needs class descriptions"):
        load_forward("encoder", base)


def _tiny_causal():
    from test_evaluation_rank_classification import LM_VOCAB, _wordlevel_tokenizer

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=LM_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   initializer_range=0.5, pad_token_id=0, bos_token_id=2, eos_token_id=1)
    return transformers.LlamaForCausalLM(cfg).eval(), _wordlevel_tokenizer("<s> $A", ("<s>", 2))


def test_choice_logits_are_rank_classification_scores():
    pytest.importorskip("tokenizers")
    model, tok = _tiny_causal()
    fwd = ChoiceLogits(model, tok, choices={"qa": ("yes", "no", "maybe not")})
    rows = [{"text": "is it true the cat sat"}, {"text": "the dog ran", "choices": ["far", "not at all really"]}]
    with torch.no_grad():
        out = logits(fwd, fwd.encode(rows, "qa"), "qa")
    expected = score_choices(model, tok, [ChoiceExample(rows[0]["text"], ("yes", "no", "maybe not"), 0),
                                          ChoiceExample(rows[1]["text"], ("far", "not at all really"), 0)])
    torch.testing.assert_close(out[0], torch.tensor(expected[0]), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(out[1, :2], torch.tensor(expected[1]), atol=1e-4, rtol=1e-5)
    probs = out.softmax(-1)
    assert probs[1, 2] == 0 and torch.isfinite(entropy(out)).all()  # the padded choice has probability 0
    with pytest.raises(ConfigError, match="task 'other': no answer choices"):
        fwd.encode([{"text": "the cat"}], "other")


def test_function_logits_gradients_reach_the_swapped_weights():
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    fwd = FunctionLogits(net, lambda m, b, task: m(b), encode=lambda rows, task: torch.tensor(
        [[float(len(r["text"])), 1.0, -1.0, 0.5] for r in rows]))
    batch = fwd.encode([{"text": "ab"}, {"text": "abcd"}], "t")
    params = {k: v.detach().clone().requires_grad_() for k, v in net.state_dict().items()}
    entropy(logits(fwd, batch, "t", params=params)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params.values())
    assert all(p.grad is None for p in net.parameters())  # the module's own weights took no part
    assert checkpoint_names(fwd) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_entropy():
    assert float(entropy(torch.zeros(1, 4))[0]) == pytest.approx(math.log(4))
    assert float(entropy(torch.tensor([[100.0, 0.0, 0.0]]))[0]) == pytest.approx(0.0, abs=1e-6)
