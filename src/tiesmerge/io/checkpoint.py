"""Checkpoints read lazily: tensor names, shapes and dtypes up front, data only when asked.

Safetensors files are opened once with ``safe_open`` (memory-mapped) and kept open; a read
takes a whole tensor or a slice of rows through ``get_slice``, so a merge never holds more
than the chunk it works on. PyTorch pickle files can run arbitrary code when loaded, so they
are refused unless the caller opts in, and then loaded with ``weights_only=True``.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

__all__ = [
    "TensorInfo",
    "Checkpoint",
    "SafetensorsCheckpoint",
    "PickleCheckpoint",
    "StateDictCheckpoint",
    "read_rows_into",
    "read_flat_range",
    "open_checkpoint",
    "SAFETENSORS_DTYPES",
]

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CONFIG_FILES = ("config.json", "generation_config.json")


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@runtime_checkable
class Checkpoint(Protocol):
    """What the engine needs of an input model."""

    label: str  # how errors and progress name this checkpoint

    def names(self) -> list[str]: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor: ...

    def location(self, name: str) -> str: ...

    def files(self) -> list[Path]: ...

    def directory(self) -> Path | None: ...

    def close(self) -> None: ...


class SafetensorsCheckpoint:
    """One ``.safetensors`` file, or a directory with one file or with shards and an index.

    Each file is validated once by ``safe_open`` (header, dtypes, that the data covers the
    file exactly), then read with ``pread`` through one descriptor per file: a read copies
    just the requested rows into fresh memory. Reading through the memory map instead would
    leave every touched page of every input resident in the process, so peak RSS would grow
    with the model size rather than stay under the memory budget.
    """

    def __init__(self, path: Path, weight_files: list[Path], weight_map: dict[str, Path], label: str) -> None:
        self.label = label
        self.path = path
        self._files = weight_files
        self._fds: dict[Path, int] = {}
        self._where: dict[str, Path] = {}
        self._info: dict[str, TensorInfo] = {}
        self._start: dict[str, int] = {}  # absolute file offset of each tensor's first byte
        try:
            for file in weight_files:
                self._index_file(file, weight_map)
        except BaseException:
            self.close()
            raise
        missing = [name for name in weight_map if name not in self._where]
        if missing:
            self.close()
            raise CheckpointError(
                f"{path}: the index names {len(missing)} tensor(s) its shards do not hold, first {missing[0]!r} "
                f"(expected in {weight_map[missing[0]].name})",
                hint="the download is incomplete or the index belongs to another model; fetch the shards again",
            )

    def _index_file(self, file: Path, weight_map: dict[str, Path]) -> None:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:  # validates the whole layout
                names = list(handle.keys())
            with open(file, "rb") as f:
                header_len = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(header_len))
        except (SafetensorError, OSError, ValueError, struct.error) as exc:
            raise CheckpointError(
                f"{file}: not a readable safetensors file ({exc})",
                hint="the file is truncated or corrupt; download or copy it again",
            ) from None
        for name in names:
            if weight_map and weight_map.get(name) != file:
                continue  # the index decides which shard owns a name
            entry = header[name]
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, which tiesmerge cannot read")
            self._where[name] = file
            self._info[name] = TensorInfo(tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]])
            self._start[name] = 8 + header_len + entry["data_offsets"][0]
        self._fds[file] = os.open(file, os.O_RDONLY)

    def names(self) -> list[str]:
        return list(self._info)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def location(self, name: str) -> str:
        return str(self._where.get(name, self.path))

    def _span(self, name: str, rows: slice | None) -> tuple[list[int], int, int]:
        """(shape, file offset, bytes) of ``rows`` of tensor ``name``."""
        info = self._info[name]
        shape = list(info.shape)
        row_bytes = info.dtype.itemsize * (info.numel // shape[0] if shape and shape[0] else 0)
        offset = self._start[name]
        if rows is not None and shape:
            first, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("row slices must be contiguous")
            shape[0] = max(0, stop - first)
            offset += first * row_bytes
        return shape, offset, info.dtype.itemsize * math.prod(shape)

    def _pread(self, name: str, offset: int, view: memoryview) -> None:
        done, nbytes = 0, len(view)
        try:
            while done < nbytes:  # pread may return less than asked (2 GiB cap, signals)
                got = os.preadv(self._fds[self._where[name]], [view[done:]], offset + done)
                if got == 0:
                    raise OSError(f"unexpected end of file after {done} of {nbytes} bytes")
                done += got
        except OSError as exc:
            raise CheckpointError(f"{self.location(name)}: cannot read tensor {name!r} ({exc})",
                                  hint="the file changed or was truncated while tiesmerge read it") from None

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        shape, offset, nbytes = self._span(name, rows)
        dtype = self._info[name].dtype
        if not nbytes:
            return torch.empty(shape, dtype=dtype)
        buffer = bytearray(nbytes)
        self._pread(name, offset, memoryview(buffer))
        return torch.frombuffer(buffer, dtype=dtype).view(shape)

    def read_into(self, name: str, rows: slice | None, out: memoryview) -> None:
        """Read ``rows`` of ``name`` as stored into ``out`` (exactly their size in bytes): the
        engine's reusable buffers, so no pass allocates or zeroes memory per chunk."""
        _, offset, nbytes = self._span(name, rows)
        if len(out) != nbytes:
            raise ValueError(f"{name}: buffer of {len(out)} bytes for {nbytes} bytes of rows")
        self._pread(name, offset, out)

    def read_range(self, name: str, start: int, count: int) -> torch.Tensor:
        """Flat entries ``start .. start + count`` of ``name`` (samples for the top-k bracket)."""
        dtype = self._info[name].dtype
        buffer = bytearray(count * dtype.itemsize)
        if count:
            self._pread(name, self._start[name] + start * dtype.itemsize, memoryview(buffer))
        return torch.frombuffer(buffer, dtype=dtype) if count else torch.empty(0, dtype=dtype)

    def files(self) -> list[Path]:
        return list(self._files)

    def directory(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class StateDictCheckpoint:
    """An in-memory ``{name: tensor}`` mapping, read through the same interface as files."""

    def __init__(self, state: Mapping[str, torch.Tensor], label: str) -> None:
        self.label = label
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{label}: entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a torch.Tensor")
        self._state = dict(state)

    def names(self) -> list[str]:
        return list(self._state)

    def info(self, name: str) -> TensorInfo:
        t = self._state[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def location(self, name: str) -> str:
        return self.label

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        t = self._state[name].detach()
        t = t if rows is None or t.dim() == 0 else t[rows]
        return t.cpu() if t.device.type != "cpu" else t

    def files(self) -> list[Path]:
        return []

    def directory(self) -> Path | None:
        return None

    def storage_key(self, name: str) -> tuple[int, int, tuple[int, ...], tuple[int, ...]] | None:
        """Identity of the memory a tensor views, so tied (aliased) tensors can be found."""
        t = self._state[name]
        if t.numel() == 0:
            return None
        return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))

    def close(self) -> None:
        pass


class PickleCheckpoint(StateDictCheckpoint):
    """PyTorch pickle files, loaded with ``weights_only=True`` (no arbitrary code) and mmap."""

    def __init__(self, path: Path, files: list[Path], label: str) -> None:
        state: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many kinds here
                raise CheckpointError(f"{file}: cannot load with weights_only=True ({type(exc).__name__}: {exc})") from None
            if isinstance(loaded, Mapping) and "state_dict" in loaded and isinstance(loaded["state_dict"], Mapping):
                loaded = loaded["state_dict"]
            if not isinstance(loaded, Mapping):
                raise CheckpointError(f"{file}: holds a {type(loaded).__name__}, not a state dict")
            state.update(loaded)
        super().__init__(state, label)
        self.path = path
        self._files = files

    def files(self) -> list[Path]:
        return list(self._files)

    def location(self, name: str) -> str:
        return str(self.path)

    def directory(self) -> Path | None:
        return self.path if self.path.is_dir() else None


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: is a PyTorch pickle file; loading pickles can run arbitrary code, so tiesmerge refuses them by default",
        hint="convert it to safetensors, or pass --allow-pickle (allow_pickle=True) to load it with weights_only=True",
    )


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a valid index file ({type(exc).__name__}: {exc})") from None
    files = {name: index.parent / shard for name, shard in weight_map.items()}
    missing = sorted({str(p) for p in files.values() if not p.is_file()})
    if missing:
        raise CheckpointError(
            f"{index}: names shard(s) that do not exist: {', '.join(missing)}",
            hint="the download is incomplete; fetch the missing shard(s) again",
        )
    return files


def open_checkpoint(
    source: str | os.PathLike | Mapping[str, torch.Tensor], *, allow_pickle: bool = False, label: str | None = None
) -> Checkpoint:
    """Open a model for lazy reading.

    ``source`` is a Hugging Face model directory (sharded safetensors with
    ``model.safetensors.index.json``, or one ``model.safetensors``), a single ``.safetensors``
    file, or an in-memory state dict.

    >>> ckpt = open_checkpoint("path/to/model")            # doctest: +SKIP
    >>> ckpt.read("model.embed_tokens.weight", rows=slice(0, 8)).shape  # doctest: +SKIP
    torch.Size([8, 4096])
    """
    if isinstance(source, Mapping):
        return StateDictCheckpoint(source, label or "state dict")
    path = Path(source)
    label = label or str(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory", hint="check the path of the model")
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint(path, [path], {}, label)
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise _refuse_pickle(path)
            return PickleCheckpoint(path, [path], label)
        raise CheckpointError(f"{path}: not a .safetensors file or a model directory")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_index(index)
        shards = sorted(set(weight_map.values()))
        return SafetensorsCheckpoint(path, shards, weight_map, label)
    if (path / "model.safetensors").is_file():
        return SafetensorsCheckpoint(path, [path / "model.safetensors"], {}, label)
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return SafetensorsCheckpoint(path, singles, {}, label)
    pickles = [path / "pytorch_model.bin.index.json"] if (path / "pytorch_model.bin.index.json").is_file() else []
    if pickles:
        weight_map = _read_index(pickles[0])
        pickle_files = sorted(set(weight_map.values()))
    else:
        pickle_files = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickle_files:
        if not allow_pickle:
            raise _refuse_pickle(pickle_files[0])
        return PickleCheckpoint(path, pickle_files, label)
    found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    raise CheckpointError(
        f"{path}: no model weights found (looked for model.safetensors.index.json, model.safetensors, *.safetensors); "
        f"the directory holds: {found}",
    )


def read_rows_into(ckpt: Checkpoint, name: str, rows: slice | None, out: memoryview) -> None:
    """``ckpt.read_into`` where a reader has it (files: one pread, no copy), else a copy."""
    if hasattr(ckpt, "read_into"):
        ckpt.read_into(name, rows, out)
        return
    value = ckpt.read(name, rows).contiguous()
    out[:] = value.reshape(-1).view(torch.uint8).numpy().data if value.numel() else b""


def read_flat_range(ckpt: Checkpoint, name: str, start: int, count: int) -> torch.Tensor:
    """Flat entries ``start .. start + count`` of ``name``, as stored."""
    if hasattr(ckpt, "read_range"):
        return ckpt.read_range(name, start, count)
    value = ckpt.read(name)
    return value.reshape(-1)[start:start + count]
