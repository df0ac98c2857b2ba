"""Writing merged tensors as they are produced, into a directory that appears only when complete.

The safetensors header lists every tensor's dtype, shape and byte range, all known from the
plan before the first value is computed; so each shard's header is written first and the
data streams in behind it, chunk by chunk. No shard is ever held in memory.

Chunks arrive as numpy arrays of the stored bytes (bfloat16 as a uint16 view: see
``DType.numpy``), which needs no torch, or as torch tensors in the output dtype.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..dtypes import DType, as_dtype
from ..errors import OutputError
from .state_dict import PICKLE_SUFFIXES

if TYPE_CHECKING:
    import torch

__all__ = ["OutputEntry", "plan_shards", "SafetensorsStreamWriter", "ShardedWriter", "atomic_directory",
           "copy_model_files"]

_WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_NOT_COPIED = {"README.md", "tiesmerge.json", "model.safetensors.index.json", "pytorch_model.bin.index.json",
               ".gitattributes"}


@dataclass(frozen=True, init=False)
class OutputEntry:
    """One tensor of the output: built with a ``DType``, a torch dtype or a dtype name."""

    name: str
    shape: tuple[int, ...]
    dtype_info: DType

    def __init__(self, name: str, shape: Sequence[int], dtype: DType | str | torch.dtype) -> None:
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "shape", tuple(shape))
        object.__setattr__(self, "dtype_info", as_dtype(dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype (imports torch)."""
        return self.dtype_info.torch

    @property
    def nbytes(self) -> int:
        return self.dtype_info.itemsize * math.prod(self.shape)


def plan_shards(entries: list[OutputEntry], shard_size: int,
                groups: list[list[OutputEntry]] | None = None) -> list[list[OutputEntry]]:
    """Split entries, in order, into shards of at most ``shard_size`` bytes (a larger tensor
    gets a shard of its own). ``groups`` (default: each entry alone) never straddle shards."""
    shards: list[list[OutputEntry]] = [[]]
    size = 0
    for group in groups if groups is not None else [[e] for e in entries]:
        nbytes = sum(e.nbytes for e in group)
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].extend(group)
        size += nbytes
    return shards if shards[0] else []


class SafetensorsStreamWriter:
    """Writes one safetensors file whose tensors arrive in order, possibly in row chunks."""

    def __init__(self, path: Path, entries: list[OutputEntry], metadata: dict[str, str] | None = None) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._ranges: dict[str, tuple[int, int]] = {}
        self._itemsize: dict[str, int] = {}
        offset = 0
        for e in entries:
            if e.dtype_info.code is None:
                raise OutputError(f"{path.name}: tensor {e.name!r} has dtype {e.dtype_info.name}, which safetensors "
                                  "files written by tiesmerge cannot hold",
                                  hint="convert the tensor to a floating, integer or bool dtype before merging")
            self._ranges[e.name] = (offset, offset + e.nbytes)
            self._itemsize[e.name] = e.dtype_info.itemsize
            header[e.name] = {"dtype": e.dtype_info.code, "shape": list(e.shape),
                              "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
        self.path = path
        self._data_start = 8 + len(raw)
        self._total = offset
        self._written = 0  # data bytes written so far
        self._file = open(path, "wb")  # noqa: SIM115 -- closed in close()
        self._file.write(struct.pack("<Q", len(raw)) + raw)

    def _expect(self, name: str, nbytes: int) -> None:
        """Check that the next ``nbytes`` of the data section belong to tensor ``name``
        (byte ranges are contiguous and in order, so position alone decides)."""
        begin, end = self._ranges.get(name, (-1, -1))
        if not begin <= self._written <= self._written + nbytes <= end:
            raise RuntimeError(f"{self.path.name}: {nbytes} bytes of {name!r} arrived at data offset {self._written}")

    def write(self, name: str, chunk: np.ndarray | torch.Tensor) -> None:
        """Append ``chunk``: the next rows of tensor ``name``, already in its output dtype: a
        numpy array of the stored bytes (bfloat16 as uint16) or a torch tensor."""
        if isinstance(chunk, np.ndarray):
            itemsize, data = chunk.itemsize, np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
        else:  # a torch tensor: torch is loaded already
            import torch

            itemsize = chunk.element_size()
            data = chunk.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if itemsize != self._itemsize.get(name, itemsize):  # a float32 chunk for a bfloat16 tensor
            raise ValueError(f"{self.path.name}: tensor {name!r} holds {self._itemsize[name]}-byte entries, but a "
                             f"chunk of {itemsize}-byte entries ({chunk.dtype}) arrived")
        nbytes = data.nbytes
        self._expect(name, nbytes)
        if nbytes:
            self._file.write(data)
        self._written += nbytes

    def duplicate(self, name: str, source: str) -> None:
        """Write tensor ``name`` as a byte copy of ``source``, written earlier to this file
        (tied weights keep both names without holding the tensor in memory)."""
        begin, end = self._ranges[source]
        self._expect(name, end - begin)
        self._file.flush()
        with open(self.path, "rb") as src:
            src.seek(self._data_start + begin)
            left = end - begin
            while left:
                block = src.read(min(left, 64 << 20))
                self._file.write(block)
                left -= len(block)
        self._written += end - begin

    def close(self) -> None:
        self._file.close()
        if self._written != self._total:
            raise RuntimeError(f"{self.path}: closed after {self._written} of {self._total} data bytes")


class ShardedWriter:
    """A Hugging Face weight layout: ``model.safetensors`` or shards plus their index."""

    def __init__(self, directory: Path, groups: list[list[OutputEntry]], shard_size: int,
                 metadata: dict[str, str] | None = None) -> None:
        self.directory = directory
        entries = [e for g in groups for e in g]
        self.shards = plan_shards(entries, shard_size, groups)
        count = len(self.shards)
        self.files = (["model.safetensors"] if count <= 1 else
                      [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._shard_of = {e.name: i for i, shard in enumerate(self.shards) for e in shard}
        self._metadata = metadata
        self._open: tuple[int, SafetensorsStreamWriter] | None = None
        self.total_size = sum(e.nbytes for e in entries)

    def _file_for(self, name: str) -> SafetensorsStreamWriter:
        shard = self._shard_of[name]
        if self._open is None or self._open[0] != shard:
            if self._open is not None:
                self._open[1].close()
            self._open = (shard, SafetensorsStreamWriter(self.directory / self.files[shard], self.shards[shard],
                                                         self._metadata))
        return self._open[1]

    def write(self, name: str, rows: slice | None, chunk: np.ndarray | torch.Tensor) -> None:
        """The next rows of ``name`` (see ``SafetensorsStreamWriter.write``)."""
        self._file_for(name).write(name, chunk)

    def alias(self, name: str, source: str) -> None:
        """``name`` holds the same values as ``source``, written just before it (tied weights)."""
        if self._shard_of[name] != self._shard_of[source]:
            raise RuntimeError(f"tied tensors {source!r} and {name!r} were planned into different shards")
        self._file_for(name).duplicate(name, source)

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {e.name: self.files[i] for i, shard in enumerate(self.shards) for e in shard}}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _check_output_path(final: Path, force: bool) -> None:
    if final.exists() and not final.is_dir():
        raise OutputError(f"{final}: the output path is a file", hint="choose a directory path for the merged model")
    if final.is_dir() and any(final.iterdir()) and not force:
        raise OutputError(f"{final}: the output directory exists and is not empty",
                          hint="choose another path, or pass --force (force=True) to replace it")


@contextmanager
def atomic_directory(final: str | os.PathLike, *, force: bool = False, needed_bytes: int = 0) -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success rename it into place, on any error
    (Ctrl-C included) remove it, so no half-written output ever looks complete."""
    final = Path(final).absolute()
    _check_output_path(final, force)
    # parent folders this call creates are removed again on failure, like the output itself
    created = [p for p in final.parents if not p.exists()]  # innermost first
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tiesmerge-tmp-", dir=final.parent))
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(f"{final}: cannot create the output directory ({exc.strerror or exc})",
                          hint="choose a location you can write to") from None
    free = shutil.disk_usage(tmp).free
    if needed_bytes > free:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise OutputError(f"{final}: the merge needs {needed_bytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB "
                          "is free there", hint="free some space or write elsewhere")
    try:
        yield tmp
        _check_output_path(final, force)  # the path may have changed while we worked
        old = None
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.tiesmerge-old-", dir=final.parent))
            os.replace(final, old / "replaced")
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:  # put the previous output back instead of leaving it hidden in a dot-folder
                os.replace(old / "replaced", final)
                shutil.rmtree(old, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders (innermost first) that are still empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def copy_model_files(source: Path | None, target: Path, *,
                     dtype: DType | str | torch.dtype | None = None) -> list[str]:
    """Copy config, tokenizer and other non-weight files of the base model. Returns their names.

    When the output dtype differs from the base's, config.json's ``torch_dtype`` follows it
    (``dtype``: a ``DType``, a torch dtype or a name such as ``bf16``).
    """
    if source is None:
        return []
    copied = []
    for item in sorted(source.iterdir()):
        if item.name in _NOT_COPIED or item.suffix in _WEIGHT_SUFFIXES or item.name.startswith("."):
            continue
        if item.is_dir():
            if any(p.suffix in _WEIGHT_SUFFIXES for p in item.rglob("*")):
                continue
            shutil.copytree(item, target / item.name)
        else:
            shutil.copy2(item, target / item.name)
        copied.append(item.name)
    config = target / "config.json"
    if dtype is not None and config.is_file():
        try:
            data = json.loads(config.read_text())
        except ValueError:
            return copied
        name = as_dtype(dtype).name
        for key in ("torch_dtype", "dtype"):
            if key in data:
                data[key] = name
        config.write_text(json.dumps(data, indent=2) + "\n")
    return copied
