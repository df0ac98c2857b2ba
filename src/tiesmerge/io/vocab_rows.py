"""The embedding and output-head rows of a vocabulary union, read by ranges like every tensor.

Each vocabulary tensor (an input embedding, an output head, a vocabulary bias: found by name)
becomes two jobs of the merge:

* its first ``V_b`` rows, the base's tokens, which every model holds at the same ids (checked
  on the tokenizers): merged by the method exactly as usual. Every input is seen through a
  view that shows only these rows, so a union merge's base rows are bit for bit those of a
  ``truncate`` merge of the same models;
* the rows after them, ``[V_b, R_out)`` with ``R_out = max(R_b, V_union)``: a part job
  computed here, written right behind the first part into the same output tensor.
  A new token's row is the **mean of the rows of the models that have it** (one model: its row
  exactly). Why not a merge against a base row: a new token has no base row, and any stand-in
  (the mean embedding, zeros) makes TIES trim, DARE drop and every ``lam`` rescale a row that
  only one model ever trained, so the token would come out damaged; the plain mean keeps a
  single model's row as it was trained and averages where several models learned the same
  token. Rows past the union's tokens (a base that pads its vocabulary to a multiple) keep
  the base's values: no token reads them.

Rows are read by ranges (one row per model that has a token, the padding in one range), cast
to the output dtype, and checked finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..dtypes import DType
from ..errors import IncompatibleCheckpointsError, InvalidTensorError
from .protocol import Checkpoint, TensorInfo, read_rows_into
from .vocab import VocabUnion

if TYPE_CHECKING:
    import torch

__all__ = ["VOCAB_SUFFIXES", "VocabLayout", "layout_of", "views_of", "part_name", "is_part"]

# the tensors whose rows are tokens: input embeddings, output heads, the heads' vocabulary biases
VOCAB_SUFFIXES = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "shared.weight", "embed_in.weight",
                  "lm_head.weight", "predictions.decoder.weight", "embed_out.weight", "predictions.bias",
                  "predictions.decoder.bias", "lm_head.bias")


def part_name(name: str, first: int, stop: int) -> str:
    """The job name of a vocabulary tensor's rows ``[first, stop)`` (never a stored tensor's name)."""
    return f"{name} [union rows {first}:{stop}]"


def is_part(name: str) -> bool:
    """Whether a job name is a vocabulary part's (:func:`part_name`)."""
    return name.endswith("]") and " [union rows " in name


@dataclass(frozen=True)
class VocabLayout:
    union: VocabUnion
    tensors: tuple[tuple[str, int, int], ...]  # (name, the base's rows, the output's rows)

    def manifest(self) -> dict[str, Any]:
        return {**self.union.manifest(),
                "tensors": [{"tensor": n, "base_rows": rb, "rows": ro} for n, rb, ro in self.tensors],
                "new_rows": "mean of the rows of the models that have the token",
                "padding_rows": "the base's"}


def _vocab_names(base: Checkpoint) -> list[str]:
    return [n for n in base.names() if n.endswith(VOCAB_SUFFIXES) and base.info(n).is_floating
            and len(base.info(n).shape) >= 1]


def layout_of(base: Checkpoint, models: Sequence[Checkpoint], union: VocabUnion) -> VocabLayout | None:
    """Which tensors' rows are tokens and how many rows the output gets; None when the union adds
    nothing and every model's vocabulary tensors have the base's shapes (a plain merge)."""
    vb, vu = union.base_size, union.size
    tensors = []
    plain = vu == vb
    for name in _vocab_names(base):
        info = base.info(name)
        rb = info.shape[0]
        if rb < vb:
            raise IncompatibleCheckpointsError(
                f"{base.location(name)}: tensor {name!r} {tuple(info.shape)} has {rb} rows but the base's tokenizer "
                f"has {vb} tokens", hint="the base's tokenizer does not belong to these weights")
        for k, m in enumerate(models):
            if name not in m.names():
                continue  # reported by the alignment, which names every input's shape
            mi = m.info(name)
            need = union.models[k].size
            if tuple(mi.shape[1:]) != tuple(info.shape[1:]) or mi.shape[0] < need:
                raise IncompatibleCheckpointsError(
                    f"{m.location(name)}: tensor {name!r} of model {k} is {tuple(mi.shape)}; its tokenizer has {need} "
                    f"tokens and the base's tensor is {tuple(info.shape)}",
                    hint="a model's vocabulary tensors need a row for each of its tokens and the base's row width")
            plain = plain and tuple(mi.shape) == tuple(info.shape)
        tensors.append((name, rb, max(rb, vu)))
    if plain:
        return None
    if not tensors:
        raise IncompatibleCheckpointsError(
            f"the models add {vu - vb} token(s) but no tensor of the base is a vocabulary tensor (names ending in "
            f"{', '.join(VOCAB_SUFFIXES[:4])}, ...)", hint="vocab union knows the usual embedding and head names")
    return VocabLayout(union, tuple(tensors))


class _View:
    """A checkpoint whose vocabulary tensors show only the base's rows, and (the base's view)
    the part tensors holding the rows after them."""

    def __init__(self, inner: Checkpoint, limits: dict[str, int], parts: dict[str, _Part] | None = None) -> None:
        self.inner, self.limits, self.parts = inner, limits, parts or {}
        self.label = inner.label

    def names(self) -> list[str]:
        return self.inner.names()

    def info(self, name: str) -> TensorInfo:
        if name in self.parts:
            return self.parts[name].info
        info = self.inner.info(name)
        if name in self.limits:
            return TensorInfo((self.limits[name], *info.shape[1:]), info.dtype_info)
        return info

    def _rows(self, name: str, rows: slice | None) -> slice | None:
        if name not in self.limits:
            return rows
        limit = self.limits[name]
        if rows is None:
            return slice(0, limit)
        first, stop, step = rows.indices(limit)
        return slice(first, max(first, stop), step)

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        if name in self.parts:
            return self.parts[name].rows(rows)
        return self.inner.read(name, self._rows(name, rows))

    def read_into(self, name: str, rows: slice | None, out: memoryview) -> None:
        if name in self.parts:
            out[:] = self.parts[name].raw(rows).data
            return
        read_rows_into(self.inner, name, self._rows(name, rows), out)

    def location(self, name: str) -> str:
        return self.inner.location(self.parts[name].name if name in self.parts else name)

    def files(self) -> list[Path]:
        return self.inner.files()

    def directory(self) -> Path | None:
        return self.inner.directory()

    def close(self) -> None:
        self.inner.close()


class _MappedView(_View):
    """The same, for readers that map files (the engine's zero-copy path is kept)."""

    def map_rows(self, name: str, rows: slice | None, *, populate: bool = True) -> np.ndarray:
        if name in self.parts:
            return self.parts[name].raw(rows)
        return self.inner.map_rows(name, self._rows(name, rows), populate=populate)

    def mappable(self, name: str) -> bool:
        return name in self.parts or not hasattr(self.inner, "mappable") or self.inner.mappable(name)


@dataclass(frozen=True)
class _Part:
    """Rows ``[first, stop)`` of vocabulary tensor ``name`` in the output: new tokens' means, then
    the base's padding rows."""

    name: str
    first: int
    stop: int
    dtype: DType
    width: tuple[int, ...]
    base: Checkpoint
    models: tuple[Checkpoint, ...]
    union: VocabUnion

    @property
    def info(self) -> TensorInfo:
        return TensorInfo((self.stop - self.first, *self.width), self.dtype)

    def rows(self, rows: slice | None) -> torch.Tensor:
        import torch

        lo, hi = (0, self.stop - self.first) if rows is None else rows.indices(self.stop - self.first)[:2]
        hi = max(lo, hi)
        out = torch.zeros((hi - lo, *self.width), dtype=torch.float32)  # (n, *width)
        # the union's tokens among these rows: union.new[j] has id base_size + j
        j0 = max(self.first + lo - self.union.base_size, 0)
        tokens = self.union.new[j0:max(j0, self.first + hi - self.union.base_size)]
        if tokens:
            at = tokens[0].id - self.first - lo  # the first token's row in ``out``
            sources: list[list[tuple[int, int]]] = [[] for _ in self.models]  # per model: (its row, out's row)
            for i, token in enumerate(tokens):
                for k, mid in token.sources:
                    sources[k].append((mid, at + i))
            for k, pairs in enumerate(sources):
                for run in _runs(sorted(pairs)):
                    self._add_run(out, k, run)
            counts = torch.tensor([len(t.sources) for t in tokens], dtype=torch.float32)
            out[at:at + len(tokens)] /= counts.reshape(-1, *([1] * len(self.width)))
        pad_from = max(self.first + lo, self.union.size)
        if pad_from < self.first + hi:
            out[pad_from - self.first - lo:] = self.base.read(self.name, slice(pad_from, self.first + hi)).float()
        return out.to(self.dtype.torch)

    def _add_run(self, out: torch.Tensor, k: int, run: list[tuple[int, int]]) -> None:
        """Add model ``k``'s rows ``run`` ((its row, out's row), its rows consecutive) into ``out``:
        one read per run, so a model adding 100,000 tokens in one block is one read, not 100,000."""
        import torch

        first = run[0][0]
        block = self.models[k].read(self.name, slice(first, first + len(run))).float()  # (len(run), *width)
        bad = ~torch.isfinite(block.reshape(len(run), -1)).all(dim=1)
        if bool(bad.any()):
            mid = first + int(bad.nonzero()[0, 0])
            content = self.union.new[self.union.maps[k][mid] - self.union.base_size].content
            raise InvalidTensorError(
                f"{self.models[k].location(self.name)}: tensor {self.name!r} row {mid} (token {content!r}) of "
                f"model {k} holds NaN or Inf", hint="merge another checkpoint")
        places = [row for _, row in run]
        if places[-1] - places[0] == len(run) - 1:  # the usual case: the rows land in one block too
            out[places[0]:places[-1] + 1] += block
        else:
            out.index_add_(0, torch.tensor(places), block)
    def raw(self, rows: slice | None) -> np.ndarray:
        """The rows as stored bytes (uint8), for the engine's raw readers."""
        import torch

        value = self.rows(rows).contiguous()
        if not value.numel():
            return np.empty(0, np.uint8)
        return value.reshape(-1).view(torch.uint8).numpy()


def _runs(pairs: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    """Sorted (row, place) pairs split where the rows stop being consecutive."""
    runs: list[list[tuple[int, int]]] = []
    for pair in pairs:
        if runs and pair[0] == runs[-1][-1][0] + 1:
            runs[-1].append(pair)
        else:
            runs.append([pair])
    return runs


def views_of(base: Checkpoint, models: Sequence[Checkpoint], layout: VocabLayout, out_dtype: DType | None
             ) -> tuple[Checkpoint, list[Checkpoint], dict[str, tuple[str, int]]]:
    """The base and the models seen through the union (see the module's docstring), and the part
    jobs to add: part name -> (the tensor's name, its first row)."""
    vb = layout.union.base_size
    limits = {name: vb for name, _, _ in layout.tensors}
    parts: dict[str, _Part] = {}
    routes: dict[str, tuple[str, int]] = {}
    for name, _, rows in layout.tensors:
        if rows > vb:
            info = base.info(name)
            part = _Part(name, vb, rows, out_dtype or info.dtype_info, tuple(info.shape[1:]), base, tuple(models),
                         layout.union)
            pname = part_name(name, vb, rows)
            parts[pname] = part
            routes[pname] = (name, vb)

    def view(c: Checkpoint, p: dict[str, _Part] | None = None) -> Checkpoint:
        return (_MappedView if hasattr(c, "map_rows") else _View)(c, limits, p)

    return view(base, parts), [view(m) for m in models], routes

