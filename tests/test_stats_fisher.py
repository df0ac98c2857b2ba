"""Diagonal Fisher information (stats/fisher.py) against brute-force loops: per example (vmap and
loop), exact, empirical and batched, embedding rows, log-likelihood functions, typed errors."""

from __future__ import annotations

import pytest
import torch

from helpers_models import batches, data, logits, tiny_classifier
from tiesmerge.errors import ConfigError
from tiesmerge.stats import fisher_information


def brute_fisher(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str) -> dict[str, torch.Tensor]:
    """The definitions, one example and one class at a time, in float64."""
    model = model.double()
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for i in range(len(x)):
        classes = [int(y[i])] if kind == "empirical" else range(3)
        for c in classes:
            model.zero_grad()
            logp = torch.log_softmax(model(x[i:i + 1].double()), dim=-1)[0]
            logp[c].backward()
            weight = 1.0 if kind == "empirical" else float(logp[c].detach().exp())
            for n, p in model.named_parameters():
                acc[n] += weight * p.grad ** 2
    return {n: (v / len(x)).float() for n, v in acc.items()}


@pytest.mark.parametrize("per_example", ["vmap", "loop"])
@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_per_example_fisher_matches_brute_force(per_example, kind):
    model = tiny_classifier()
    x, y = data()
    stats = fisher_information(model, batches(x, y, 4), logits, kind=kind, per_example=per_example,
                               targets=lambda b: b[1], class_chunk=2)
    expected = brute_fisher(tiny_classifier(), x, y, kind)
    assert stats.kind == "fisher" and stats.manifest.examples == 10
    assert set(stats.tensors) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(stats.tensors[name], value, rtol=1e-5, atol=1e-8)


def test_exact_and_empirical_fisher_differ():
    """The exact Fisher takes the model's own p(y|x), not the labels: a real difference."""
    model, (x, y) = tiny_classifier(), data()
    exact = fisher_information(model, batches(x, y, 5), logits)
    empirical = fisher_information(model, batches(x, y, 5), logits, kind="empirical", targets=lambda b: b[1])
    assert not torch.allclose(exact.tensors["0.weight"], empirical.tensors["0.weight"], rtol=1e-2)


def test_batched_fisher_is_the_square_of_each_batch_gradient():
    model, (x, y) = tiny_classifier(), data()
    stats = fisher_information(model, batches(x, y, 5), logits, kind="batched", targets=lambda b: b[1])
    reference = tiny_classifier().double()
    acc = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for xb, yb in batches(x, y, 5):
        reference.zero_grad()
        torch.log_softmax(reference(xb.double()), -1).gather(1, yb[:, None]).sum().backward()
        for n, p in reference.named_parameters():
            acc[n] += p.grad ** 2
    for n, v in acc.items():
        torch.testing.assert_close(stats.tensors[n], (v / 10).float(), rtol=1e-5, atol=1e-8)
    assert stats.manifest.options["per_example"] is None  # no per-example gradient (hp69b c20: recorded "vmap")
    # batches of one: the batched shortcut is the empirical Fisher
    single = fisher_information(model, batches(x, y, 1), logits, kind="batched", targets=lambda b: b[1])
    empirical = fisher_information(model, batches(x, y, 4), logits, kind="empirical", targets=lambda b: b[1])
    for n in acc:
        torch.testing.assert_close(single.tensors[n], empirical.tensors[n], rtol=1e-5, atol=1e-8)


def test_fisher_option_errors():
    model, (x, y) = tiny_classifier(), data()
    with pytest.raises(ConfigError, match="true labels"):
        fisher_information(model, batches(x, y, 5), logits, kind="empirical")
    with pytest.raises(ConfigError, match="not one of"):
        fisher_information(model, batches(x, y, 5), logits, kind="sampled")
    with pytest.raises(ConfigError, match="no examples"):
        fisher_information(model, [], logits)


class TokenClassifier(torch.nn.Module):
    """Embedding -> masked mean -> tanh -> Linear; ``tie`` shares the embedding with the head."""

    def __init__(self, vocab: int, tie: bool = False) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = torch.nn.Embedding(vocab, 3 if tie else 4, padding_idx=0)
        self.head = torch.nn.Linear(3 if tie else 4, 3, bias=False)
        if tie:
            self.head.weight = self.embed.weight  # (3, 3): vocabulary of 3, 3 classes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids != 0).float().unsqueeze(-1)  # (B, T, 1)
        pooled = (self.embed(ids) * mask).sum(1) / mask.sum(1).clamp_min(1)  # (B, D)
        return self.head(torch.tanh(pooled + self.embed(ids[:, :1]).squeeze(1)))  # the embedding used twice


@pytest.mark.parametrize("tie", [False, True])
def test_embedding_rows_match_the_dense_gradient(tie):
    vocab = 3 if tie else 12
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, vocab, (6, 5), generator=g)
    ids[:, 3:] = 0  # padding
    ids[0, 1] = ids[0, 2]  # a repeated token: its row gets the sum of both positions' gradients
    model = TokenClassifier(vocab, tie)
    dense = fisher_information(model, [ids[:3], ids[3:]], lambda m, b: m(b), per_example="loop")
    rowwise = fisher_information(model, [ids[:3], ids[3:]], lambda m, b: m(b), per_example="loop",
                                 embedding_rows=True, class_chunk=2)
    reference = TokenClassifier(vocab, tie).double()
    for name, p in reference.named_parameters():
        acc = torch.zeros_like(p)
        for i in range(len(ids)):
            for c in range(3):
                reference.zero_grad()
                logp = torch.log_softmax(reference(ids[i:i + 1]), -1)[0]
                logp[c].backward()
                acc += float(logp[c].detach().exp()) * p.grad ** 2
        torch.testing.assert_close(rowwise.tensors[name], (acc / len(ids)).float(), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(dense.tensors[name], rowwise.tensors[name], rtol=1e-5, atol=1e-9)
    if not tie:  # (tied, row 0 is also the head's weight of class 0)
        assert rowwise.tensors["embed.weight"][0].abs().sum() == 0  # the padding row never trains


def test_a_model_vmap_cannot_run_gets_a_typed_error():
    def branching(module, batch):
        logits = module(batch[0])
        return logits if bool((logits > 0).any()) else -logits  # data-dependent control flow

    model, (x, y) = tiny_classifier(), data()
    with pytest.raises(ConfigError, match="per_example='loop'"):
        fisher_information(model, batches(x, y, 5), branching, per_example="vmap")
    assert fisher_information(model, batches(x, y, 5), branching, per_example="loop").manifest.examples == 10


@pytest.mark.parametrize("per_example", ["vmap", "loop"])
def test_log_likelihood_functions_give_the_empirical_fisher(per_example):
    """logits_fn may return (B,) log p(y_i|x_i) (a language model's answer log-likelihood): the
    empirical and batched Fishers need nothing else; the exact one is refused."""
    model, (x, y) = tiny_classifier(), data()

    def loglik(module, batch):
        return torch.log_softmax(module(batch[0]), -1).gather(1, batch[1][:, None])[:, 0]  # (B,)

    from_logits = fisher_information(model, batches(x, y, 4), logits, kind="empirical", targets=lambda b: b[1])
    from_loglik = fisher_information(model, batches(x, y, 4), loglik, kind="empirical", per_example=per_example)
    batched = fisher_information(model, batches(x, y, 1), loglik, kind="batched")
    for name, value in from_logits.tensors.items():
        torch.testing.assert_close(from_loglik.tensors[name], value, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(batched.tensors[name], value, rtol=1e-5, atol=1e-9)
    with pytest.raises(ConfigError, match="exact Fisher needs .B, C. logits"):
        fisher_information(model, batches(x, y, 4), loglik, per_example=per_example)
