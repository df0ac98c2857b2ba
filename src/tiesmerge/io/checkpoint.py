"""Opening a checkpoint: which reader a path (or an in-memory state dict) needs.

The readers live in their own modules and are re-exported here, where callers look for them:
safetensors files (``SafetensorsCheckpoint``, torch-free), PEFT adapters (``io.adapters``),
in-memory state dicts and PyTorch pickles (``StateDictCheckpoint``, ``PickleCheckpoint``, torch).
Pickle files can run arbitrary code when loaded, so they are refused unless the caller opts in.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import CheckpointError
from .adapters import open_adapter
from .peft import ADAPTER_CONFIG
from .protocol import Checkpoint, TensorInfo, read_rows_into
from .safetensors_reader import SafetensorsCheckpoint
from .state_dict import PICKLE_SUFFIXES, PickleCheckpoint, StateDictCheckpoint

if TYPE_CHECKING:
    import torch

__all__ = [
    "TensorInfo",
    "Checkpoint",
    "SafetensorsCheckpoint",
    "PickleCheckpoint",
    "StateDictCheckpoint",
    "read_rows_into",
    "open_checkpoint",
    "PICKLE_SUFFIXES",
]


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: is a PyTorch pickle file; loading pickles can run arbitrary code, "
        "so tiesmerge refuses them by default",
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
    ``model.safetensors.index.json``, or one ``model.safetensors``), a PEFT adapter directory
    (``adapter_config.json``: LoRA or (IA)³, read as task vectors, see ``io.adapters``), a single
    ``.safetensors`` file, or an in-memory state dict.

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
    if (path / ADAPTER_CONFIG).is_file():  # a PEFT adapter: read as task vectors
        return open_adapter(path, label)
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
