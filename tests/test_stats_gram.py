"""Gram matrices of Linear inputs (stats/gram.py) against their definition."""

from __future__ import annotations

import torch

from tiesmerge.stats import gram_matrices


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


def test_a_head_tied_to_the_embedding_gets_no_gram_matrix():
    """A causal LM's lm_head tied to the input embedding has no weight of its own in the checkpoint
    (found by the LLM benchmark: the merge refused 'lm_head.weight is not a tensor of the model')."""
    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(5, 4)
            self.proj = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 5, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.proj(self.embed(ids)))

    stats = gram_matrices(Tied(), [torch.tensor([[0, 1, 2]])], lambda m, b: m(b))
    assert set(stats.tensors) == {"proj.weight"}


def test_a_mask_of_other_values_than_true_and_false_is_refused():
    """hp67b c30: a float mask holding NaN was read as True by ``.bool()`` (every padding row counted); 0/1 masks of
    any dtype (an attention mask's int64, a float one) keep working."""
    import pytest

    from tiesmerge.errors import ConfigError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5))
    x = torch.randn(2, 4, 3)  # (B, T, in)
    ones = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    want = gram_matrices(model, [x], lambda m, b: m(b), token_mask=lambda b: ones.bool()).tensors["0.weight"]
    for mask in (ones, ones.float(), ones.to(torch.uint8)):
        got = gram_matrices(model, [x], lambda m, b: m(b), token_mask=lambda b, mask=mask: mask).tensors["0.weight"]
        torch.testing.assert_close(got, want)
    for bad in (torch.full((2, 4), float("nan")), ones * 0.5, ones * 2):
        with pytest.raises(ConfigError, match="a mask holds True/False"):
            gram_matrices(model, [x], lambda m, b: m(b), token_mask=lambda b, bad=bad: bad)


def test_a_layer_whose_every_row_is_masked_is_said():
    """hp68b c23: a Linear whose every input row the token mask dropped was left out of the statistics silently."""
    import pytest

    from tiesmerge.errors import MergeWarning

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l = torch.nn.Linear(4, 4)
            self.h = torch.nn.Linear(4, 2)

        def forward(self, x):  # (B, T, 4) -> (B, 2): h reads the pooled rows, which no (B, T) mask fits
            return self.h(self.l(x).mean(dim=1))

    x, none = torch.randn(2, 5, 4), torch.zeros(2, 5, dtype=torch.bool)
    said = (r"1 Linear layer\(s\) saw no input row over 2 examples \(token_mask kept none of theirs\), so the "
            r"statistics hold no Gram matrix for them: l.weight")
    with pytest.warns(MergeWarning, match=said):
        stats = gram_matrices(Pooled(), [x], lambda m, b: m(b), token_mask=lambda b: none)
    assert set(stats.tensors) == {"h.weight"}
