"""Checkpoints that are torch tensors already: in-memory state dicts and PyTorch pickle files.

Both hold torch tensors, so both import torch, when one is built (never at import). Pickle
files can run arbitrary code when loaded, so they are refused unless the caller opts in (see
``open_checkpoint``), and then loaded with ``weights_only=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .protocol import TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["StateDictCheckpoint", "PickleCheckpoint", "PICKLE_SUFFIXES"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


class StateDictCheckpoint:
    """An in-memory ``{name: tensor}`` mapping, read through the same interface as files."""

    def __init__(self, state: Mapping[str, torch.Tensor], label: str) -> None:
        import torch

        self.label = label
        bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise CheckpointError(f"{label}: entry {bad[0]!r} is a {type(state[bad[0]]).__name__}, not a torch.Tensor")
        keys = [k for k in state if not isinstance(k, str)]
        if keys:  # a safetensors file, a recipe and the output name tensors by text
            raise CheckpointError(f"{label}: the key {keys[0]!r} is a {type(keys[0]).__name__}, not a tensor name "
                                  "(a string)", hint="name every tensor by its parameter name, e.g. model.state_dict()")
        # nested and quantized tensors have no single shape and dtype to stream rows of (torch fails inside)
        odd = next(((k, kind) for k, v in state.items() for kind, hit in (("a nested tensor", v.is_nested),
                                                                           ("a quantized tensor", v.is_quantized))
                    if hit), None)
        if odd is not None:
            raise CheckpointError(f"{label}: tensor {odd[0]!r} is {odd[1]}, not a dense one",
                                  hint="pass dense floating tensors (tensor.dequantize(), or one tensor per "
                                       "nested component)")
        empty = [k for k, v in state.items() if v.is_meta]
        if empty:  # a model built on the meta device (init_empty_weights) holds shapes, not values
            raise CheckpointError(f"{label}: tensor {empty[0]!r} is on the meta device: it has a shape but no values"
                                  f"{f' ({len(empty)} such tensors)' if len(empty) > 1 else ''}",
                                  hint="load the weights first (a model built with init_empty_weights or "
                                       "device='meta' holds none), or pass the model's directory")
        sparse = [k for k, v in state.items() if v.layout != torch.strided]
        if sparse:  # sparse and quantized layouts have no flat storage to stream rows from
            raise CheckpointError(f"{label}: tensor {sparse[0]!r} has the {state[sparse[0]].layout} layout, not a "
                                  f"dense one{f' ({len(sparse)} such tensors)' if len(sparse) > 1 else ''}",
                                  hint="pass dense tensors (tensor.to_dense())")
        complex_ = [k for k, v in state.items() if v.is_complex()]
        if complex_:  # neither a weight to merge nor a buffer to copy: no model file format holds it as a weight
            kind = str(state[complex_[0]].dtype).removeprefix("torch.")
            more = f" ({len(complex_)} such tensors)" if len(complex_) > 1 else ""
            raise CheckpointError(f"{label}: tensor {complex_[0]!r} is {kind}{more}; tiesmerge merges real floating "
                                  "tensors and copies integer and boolean ones",
                                  hint="pass its real and imaginary parts as two tensors (torch.view_as_real), or "
                                       "leave it out of the state dict")
        from ..dtypes import from_torch

        unread = next((k for k, v in state.items() if v.is_floating_point() and from_torch(v.dtype).code is None), None)
        if unread is not None:  # float8_e4m3fnuz, float8_e8m0fnu: no safetensors dtype holds them, as a file's
            # F8_E4M3FNUZ is refused (hp81b c27: an AttributeError of the output dtype's missing code)
            raise CheckpointError(f"{label}: tensor {unread!r} is {str(state[unread].dtype).removeprefix('torch.')}, "
                                  "which tiesmerge cannot read or write",
                                  hint="convert it to float32, float16 or bfloat16 (tensor.float())")
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
        import torch

        state: dict[str, torch.Tensor] = {}
        for file in files:
            try:
                loaded = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "_use_new_zipfile_serialization" not in str(exc):
                    raise _pickle_error(file, exc) from None
                try:  # PyTorch's legacy (pre-1.6, non-zip) format: read whole (it cannot be mapped), still weights only
                    loaded = torch.load(file, map_location="cpu", weights_only=True)
                except Exception as legacy:  # torch raises many kinds here
                    raise _pickle_error(file, legacy) from None
            except Exception as exc:  # torch raises many kinds here
                raise _pickle_error(file, exc) from None
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


def _pickle_error(file: Path, exc: Exception) -> CheckpointError:
    """A pickle weights_only=True refused, in one line: which code it names (``posix.system``: the file would
    run a command) and what to do. torch's own text advises weights_only=False, which would run that code."""
    import re

    text = str(exc)
    found = re.search(r"(?:Unsupported global|unsupported GLOBAL)[:\s]+(?:GLOBAL\s+)?([\w.]+)", text, re.IGNORECASE)
    if found:
        return CheckpointError(f"{file}: the pickle calls {found.group(1)} when loaded (it would run code, not only "
                               "hold tensors); tiesmerge refused it and ran nothing",
                               hint="do not load this file; ask for the model as safetensors")
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    first = first.replace("Weights only load failed", "the weights-only loader refused it")
    if "weights_only" in first and "False" in first:
        first = type(exc).__name__
    return CheckpointError(f"{file}: not a PyTorch state dict that can be read without running code "
                           f"({type(exc).__name__}: {first[:200]})",
                           hint="convert the model to safetensors, or check that the file is complete")

