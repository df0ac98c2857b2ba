"""The new tokens' rows of a vocabulary union (io/vocab_rows._Part): the mean of the models' rows that
hold each token, read a block of consecutive rows at a time (not row by row: 400,000 added tokens took
53 s that way), the same for any chunking of the rows, and a NaN named by its row and token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tiesmerge.dtypes import FLOAT32
from tiesmerge.errors import InvalidTensorError
from tiesmerge.io.vocab import TokenizerVocab, union_of
from tiesmerge.io.vocab_rows import _Part

NAME = "model.embed_tokens.weight"
VB, WIDTH = 5, 3


class _Rows:
    """A checkpoint of one tensor that counts its reads."""

    def __init__(self, label: str, value: torch.Tensor) -> None:
        self.label, self.value, self.reads = label, value, 0

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        assert name == NAME
        self.reads += 1
        return self.value if rows is None else self.value[rows]

    def location(self, name: str) -> str:
        return f"{self.label}/model.safetensors"


def _vocab(label: str, added: list[str]) -> TokenizerVocab:
    tokens = {i: f"w{i}" for i in range(VB)} | {VB + j: t for j, t in enumerate(added)}
    return TokenizerVocab(label, Path(label), tokens, {VB + j: {"content": t, "special": True}
                                                       for j, t in enumerate(added)}, frozenset(range(VB)), "test")


def _setup(added: list[list[str]], pad: int = 0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    union = union_of(_vocab("base", []), [_vocab(f"m{k}", a) for k, a in enumerate(added)])
    rows = union.size + pad
    base = _Rows("base", torch.randn(rows, WIDTH, generator=g))
    models = tuple(_Rows(f"m{k}", torch.randn(VB + len(a), WIDTH, generator=g)) for k, a in enumerate(added))
    part = _Part(NAME, VB, rows, FLOAT32, (WIDTH,), base, models, union)
    return part, union, base, models


def _expected(union, base, models, rows: int) -> torch.Tensor:
    """Row by row, as the module's docstring says: the mean of the models holding the token, then the base's padding."""
    out = []
    for r in range(VB, rows):
        token = next((t for t in union.new if t.id == r), None)
        if token is None:
            out.append(base.value[r])
            continue
        acc = torch.zeros(WIDTH)
        for k, mid in token.sources:
            acc += models[k].value[mid]
        out.append(acc / len(token.sources))
    return torch.stack(out)


def test_new_rows_are_the_means_read_in_blocks():
    shared = [f"s{i}" for i in range(40)]
    added = [[f"a{i}" for i in range(300)] + shared,    # a block of its own, then the shared ones
             shared[::-1] + [f"b{i}" for i in range(200)],  # the shared ones in the reverse order
             shared[::2]]                                # every other one
    part, union, base, models = _setup(added, pad=7)
    got = part.rows(None)
    assert got.shape == (part.stop - part.first, WIDTH)
    assert torch.equal(got, _expected(union, base, models, part.stop))
    # each model's new rows are consecutive in its file: one read each, wherever they land in the union
    assert [m.reads for m in models] == [1, 1, 1]


def test_rows_apart_in_a_model_are_read_apart():
    """A tokenizer with unused ids between its added tokens: one read per consecutive run of rows."""
    part, union, base, models = _setup([["a", "b", "c"], ["x", "y", "z", "w"]])
    gappy = _vocab("m1", [])
    gappy.tokens.update({VB: "b", VB + 2: "y", VB + 3: "z"})  # ids VB + 1 unused (its row is never read)
    union = union_of(union.base, [union.models[0], gappy])
    part = _Part(NAME, VB, union.size, part.dtype, part.width, base, models, union)
    assert torch.equal(part.rows(None), _expected(union, base, models, union.size))
    assert models[1].reads == 2


@pytest.mark.parametrize("step", [1, 7, 64, 1000])
def test_any_chunking_of_the_rows_gives_the_same_rows(step):
    added = [[f"t{i}" for i in range(150)], [f"t{i}" for i in range(100, 250)][::-1]]
    part, union, base, models = _setup(added, pad=5, seed=1)
    n = part.stop - part.first
    whole = part.rows(None)
    chunks = torch.cat([part.rows(slice(i, min(i + step, n))) for i in range(0, n, step)])
    assert torch.equal(chunks, whole)
    assert torch.equal(whole, _expected(union, base, models, part.stop))
    assert part.rows(slice(n, n)).shape == (0, WIDTH)


def test_a_nan_row_is_named_with_its_token():
    part, _, _, models = _setup([["x", "y", "z"], ["z", "q"]])
    models[1].value[VB + 1, 2] = float("nan")  # model 1's "q"
    with pytest.raises(InvalidTensorError, match=r"m1/model.safetensors: tensor 'model.embed_tokens.weight' row 6 "
                                                 r"\(token 'q'\) of model 1 holds NaN or Inf"):
        part.rows(None)
