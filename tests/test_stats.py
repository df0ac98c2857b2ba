"""Statistics for the data-aware methods: the Fisher against brute-force loops, Gram matrices
against their definition, the files' round trip, and typed errors for files that do not fit."""

from __future__ import annotations

import json

import pytest
import torch

from helpers_ckpt import assert_no_output
from tiesmerge.errors import CheckpointError, ConfigError
from tiesmerge.stats import (
    MANIFEST_NAME,
    Statistics,
    StatsManifest,
    fisher_information,
    gram_matrices,
    load_stats,
    open_stats,
    save_stats,
)


def tiny_classifier(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def data(seed: int = 1, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def logits(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return module(batch[0])


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


def test_gram_is_mean_of_input_outer_products_over_real_tokens():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    x = torch.randn(2, 4, 3)  # (B, T, in)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)  # padding at the end
    stats = gram_matrices(model, [{"x": x, "mask": mask}], lambda m, b: m(b["x"]), token_mask=lambda b: b["mask"])
    real = x[mask]  # (5, 3)
    torch.testing.assert_close(stats.tensors["0.weight"], real.T @ real / 5)
    hidden = torch.relu(model[0](real))
    torch.testing.assert_close(stats.tensors["2.weight"], hidden.T @ hidden / 5, rtol=1e-5, atol=1e-6)
    assert stats.manifest.options["rows"] == {"0.weight": 5, "2.weight": 5}
    assert set(stats.tensors) == {"0.weight", "2.weight"} and stats.manifest.examples == 2
    # running mean over batches = the mean over all rows
    split = gram_matrices(model, [{"x": x[:1], "mask": mask[:1]}, {"x": x[1:], "mask": mask[1:]}],
                          lambda m, b: m(b["x"]), token_mask=lambda b: b["mask"])
    torch.testing.assert_close(split.tensors["0.weight"], stats.tensors["0.weight"])


def test_statistics_round_trip(tmp_path):
    model, (x, y) = tiny_classifier(), data()
    stats = fisher_information(model, batches(x, y, 5), logits)
    out = save_stats(tmp_path / "fisher", stats)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "fisher" and manifest["examples"] == 10
    assert manifest["options"]["kind"] == "exact" and manifest["model_digest"].startswith("tensors:")
    back = load_stats(out)
    assert back.manifest.kind == "fisher" and back.manifest.model_digest == stats.manifest.model_digest
    assert set(back.tensors) == set(stats.tensors)
    for name, value in stats.tensors.items():
        assert torch.equal(back.tensors[name], value)
    with pytest.raises(Exception, match="not empty"):
        save_stats(out, stats)  # never overwritten silently
    save_stats(out, stats, force=True)


def test_statistics_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a statistics directory"):
        open_stats(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CheckpointError, match=MANIFEST_NAME):
        open_stats(tmp_path / "plain")
    gram = Statistics(StatsManifest("gram", 3), {"0.weight": torch.eye(4)})
    save_stats(tmp_path / "gram", gram)
    with pytest.raises(ConfigError, match="holds gram statistics, but the method needs fisher"):
        open_stats(tmp_path / "gram", kind="fisher")
    (tmp_path / "gram" / MANIFEST_NAME).write_text('{"kind": "hessian", "examples": 1}')
    with pytest.raises(CheckpointError, match="not a tiesmerge statistics manifest"):
        open_stats(tmp_path / "gram")
    with pytest.raises(ConfigError, match="not a floating"):
        save_stats(tmp_path / "ints", Statistics(StatsManifest("gram", 1), {"a": torch.ones(2, dtype=torch.int64)}))
    assert_no_output(tmp_path / "ints")


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
