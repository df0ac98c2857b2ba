"""Opening a checkpoint: which reader a path (or an in-memory state dict) needs.

The readers live in their own modules and are re-exported here, where callers look for them:
safetensors files (``SafetensorsCheckpoint``, torch-free), PEFT adapters (``io.adapters``),
in-memory state dicts and PyTorch pickles (``StateDictCheckpoint``, ``PickleCheckpoint``, torch).
Pickle files can run arbitrary code when loaded, so they are refused unless the caller opts in.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GGUF_HINT, CheckpointError
from ..limits import read_json
from ..paths import check_input, fs_text, inside
from ..unicode_names import apart, first_twin
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
    "stored_float_dtype",
    "PICKLE_SUFFIXES",
]


def _refuse_pickle(path: Path) -> CheckpointError:
    return CheckpointError(
        f"{path}: is a PyTorch pickle file; loading pickles can run arbitrary code, "
        "so tiesmerge refuses them by default",
        hint="convert it to safetensors, or pass --allow-pickle (allow_pickle=True) to load it with weights_only=True",
    )


def _read_index(index: Path) -> dict[str, Path]:
    """An index's weight_map: tensor name -> shard, every shard a regular file inside the model's
    directory (a ``../`` or absolute entry, or a link leaving the directory, is refused). The index itself
    is read only from inside the directory: a link to a file elsewhere is refused before it is opened."""
    inside(index, index.parent, "the index file")
    data = read_json(index, "the index file", unique_keys=True)  # a key twice: the first entry lost (hp85a c54)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        got = f"a {type(weight_map).__name__} weight_map" if isinstance(data, dict) else f"a {type(data).__name__}"
        raise CheckpointError(f"{index}: not a valid index file (it needs a 'weight_map' mapping tensor names to "
                              f"shard files; got {got})",
                              hint="the download is incomplete or corrupt; fetch the index again")
    if not weight_map:  # its shards' tensors then looked missing: "lacks every tensor ... the same base
        # architecture" (hp84a c19)
        shards = sorted(p.name for p in index.parent.glob("*" + (".bin" if index.name.startswith("pytorch_model")
                                                                    else ".safetensors")))
        raise CheckpointError(f"{index}: the index's weight_map is empty, so it names no tensor"
                              + (f", though the folder holds {len(shards)} weights file(s) ({', '.join(shards[:3])}"
                                 f"{', ...' if len(shards) > 3 else ''})" if shards else ""),
                              hint="the index is incomplete or corrupt: fetch it again (or regenerate it from the "
                                   "shards, so that weight_map names every tensor)")
    bad = next(((k, v) for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise CheckpointError(f"{index}: weight_map entry {bad[0][:200]!r} names {str(bad[1])[:80]!r}, not a shard "
                              "file name", hint="the index is corrupt; fetch it again")
    root = index.parent
    files: dict[str, Path] = {}
    real: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if shard not in real:
            if os.path.isabs(shard) and Path(os.path.abspath(shard)).parent == Path(os.path.abspath(root)):
                raise CheckpointError(f"{index}: weight_map entry {name[:200]!r} names {shard[:200]!r}, an absolute "
                                      "path (to a file of this folder); an index names its shards relative to its "
                                      "own folder", hint="write the shard's file name (e.g. "
                                                         "model-00001-of-00002.safetensors)")
            if os.path.isabs(shard) or ".." in Path(shard).parts:
                inner = not os.path.isabs(shard) and not os.path.normpath(shard).startswith("..")
                raise CheckpointError(f"{index}: weight_map entry {name[:200]!r} names {shard[:200]!r}, "
                                      + ("a path through '..' (an index names its shards plainly, no '..' in them)"
                                         if inner else "a path outside the model's directory"),
                                      hint="shards must lie inside the model's own directory, named by their path in "
                                           "it (e.g. model-00001-of-00002.safetensors)")
            suffix = ".bin" if index.name.startswith("pytorch_model") else ".safetensors"
            if not shard.endswith(suffix) or Path(shard).name == index.name:
                raise CheckpointError(f"{index}: weight_map entry {name[:200]!r} names {shard[:200]!r}, which is no "
                                      f"{suffix} shard", hint="the index is wrong: each entry names a weights "
                                                              f"file ({suffix}) of this folder; fetch it again")
            if not os.path.lexists(root / shard):
                continue  # listed as missing below, all at once
            real[shard] = inside(root / shard, root, "a shard")
        files[name] = root / shard
    missing = sorted({str(root / s) for s in weight_map.values() if s not in real})
    if missing:
        try:  # a name that differs only in case from a file there is the index's error, not a missing download
            here = {n.lower(): n for n in os.listdir(root)}
        except OSError:
            here = {}
        cased = [(m, here[Path(m).name.lower()]) for m in missing if Path(m).name.lower() in here]
        if cased:  # (hp63a c09: "fetch the missing shard(s) again" of a shard that is there as model-…)
            raise CheckpointError(
                f"{index}: names shard(s) that do not exist: {', '.join(missing[:8])}; the folder holds "
                f"{cased[0][1]}, whose name differs from {Path(cased[0][0]).name} only in case",
                hint="fix the index's names (or the file's): file names are case-sensitive here")
        # (hp74a c05: a shard named in the other Unicode normalization, "fetch it again")
        twin = first_twin((Path(m).name for m in missing), here.values())
        raise CheckpointError(
            f"{index}: names shard(s) that do not exist: {', '.join(missing[:8])}",
            hint=f"{apart(*twin)}: write the index's weight_map with the names the files have" if twin else
            "the download is incomplete; fetch the missing shard(s) again",
        )
    return files


def _is_listed_shard(file: Path) -> bool:
    """Whether ``file`` is one shard of the sharded model in its folder: its index lists it. Shards are
    mostly named model-00001-of-00002.safetensors, but an index may name them anything (hp78a c33: a
    shard called part1.safetensors read as a whole model, "lacks 1 of the base's tensors")."""
    index = file.parent / "model.safetensors.index.json"
    if not os.path.lexists(index):
        return False
    if re.search(r"-\d+-of-\d+\.safetensors$", file.name):
        return True
    try:  # an index that cannot be read says nothing about this file: it is then read as what it is
        data = read_json(index, "the index file", unique_keys=True)  # a key twice: the first entry lost (hp85a c54)
    except (CheckpointError, OSError, ValueError):
        return False
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    return isinstance(weight_map, dict) and file.name in {v for v in weight_map.values() if isinstance(v, str)}


def _full_model_files(folder: Path) -> list[str]:
    """The names of a full model's weight files present in ``folder`` (beside an adapter: ambiguous)."""
    return [n for n in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                        "pytorch_model.bin.index.json") if os.path.lexists(folder / n)]


def open_checkpoint(
    source: str | os.PathLike | Mapping[str, torch.Tensor], *, allow_pickle: bool = False, label: str | None = None,
    role: str = "the model",
) -> Checkpoint:
    """Open a model for lazy reading.

    ``source`` is a Hugging Face model directory (sharded safetensors with
    ``model.safetensors.index.json``, or one ``model.safetensors``), a PEFT adapter directory
    (``adapter_config.json``: LoRA or (IA)³, read as task vectors, see ``io.adapters``), a single
    ``.safetensors`` file, or an in-memory state dict. ``role`` names it in errors ("the base", ...).

    >>> ckpt = open_checkpoint("path/to/model")            # doctest: +SKIP
    >>> ckpt.read("model.embed_tokens.weight", rows=slice(0, 8)).shape  # doctest: +SKIP
    torch.Size([8, 4096])
    """
    if isinstance(source, Mapping):
        return StateDictCheckpoint(source, label or "state dict")
    source = fs_text(source)  # bytes, or a PathLike returning bytes (a name that is no UTF-8)
    if not isinstance(source, (str, os.PathLike)):
        raise CheckpointError(f"{role} is a {type(source).__name__}, not a path or a state dict",
                              hint="pass a model directory, a .safetensors file, or a dict of tensors")
    path = Path(source)
    label = label or str(path)
    check_input(path, role)  # loops, dangling links, FIFOs and devices: typed errors, never a hang
    if path.is_file():
        if path.name == "adapter_model.safetensors" and os.path.lexists(path.parent / ADAPTER_CONFIG):
            # a PEFT adapter's weights alone read as a model's: "tensor names differ" (hp54 c12)
            hint = (f"give its folder as a model: {path.parent} (an adapter is never the base, which is the full "
                    "model it was trained on)")  # (hp55 c03: a circular hint)
            if _full_model_files(path.parent):  # that folder would be refused as ambiguous (hp62a c10)
                hint = (f"{path.parent} also holds a full model: move the adapter's files ({ADAPTER_CONFIG}, "
                        f"{path.name}) into a folder of their own and give that folder as a model")
            raise CheckpointError(f"{path}: {role} is a PEFT adapter's weights file, which is read with its "
                                  f"{ADAPTER_CONFIG} (rank, alpha, targets)", hint=hint)
        if path.suffix == ".safetensors":
            real = Path(os.path.realpath(path))  # a link to a shard too (hp78a c11)
            shard = next((p for p in dict.fromkeys((path, real)) if _is_listed_shard(p)), None)
            if shard is not None:  # one shard read as a whole model: "lacks 9 of the base's tensors" (hp77a c27)
                which = "" if shard == path else f" (it links to {shard})"
                raise CheckpointError(f"{path}: {role} is one shard of the sharded model in {shard.parent}{which} "
                                      "(its model.safetensors.index.json lists the shards), not a whole model",
                                      hint=f"give the model's folder instead: {shard.parent}")
            return SafetensorsCheckpoint(path, [path], {}, label)
        if path.suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise _refuse_pickle(path)
            return PickleCheckpoint(path, [path], label)
        if path.suffix.lower() == ".gguf":  # (hp84a c59: "not a .safetensors file or a model directory")
            raise CheckpointError(f"{path}: {role} is a GGUF file, which tiesmerge does not read", hint=GGUF_HINT)
        if path.name == ADAPTER_CONFIG:  # (hp82a c95, c99: hinted at a full model's folder, refused in that slot)
            raise CheckpointError(f"{path}: {role} is a PEFT adapter's config file; an adapter is read from its folder "
                                  "(the config with adapter_model.safetensors)",
                                  hint=f"give the adapter's folder instead: {path.parent}")
        # a file of a model folder (its index, config.json): the folder is what is meant (hp75a c36: an index
        # given as a model had only --help's generic hint)
        hint = (f"give the model's folder instead: {path.parent}" if _full_model_files(path.parent)
                else "give a model directory (config.json and model.safetensors, or a sharded model's index and "
                "shards) or a single .safetensors file")
        raise CheckpointError(f"{path}: not a .safetensors file or a model directory", hint=hint)
    if os.path.lexists(path / ADAPTER_CONFIG):  # a PEFT adapter: read as task vectors (a FIFO, a dangling link
        # or a folder there is named by the limited reader, not misread); beside a full model's weights, which of
        # the two is meant cannot be told (hp53 c25: tiesmerge read the adapter, mergekit and transformers the model)
        full = _full_model_files(path)
        weights = [n for n in ("adapter_model.safetensors", "adapter_model.bin") if os.path.lexists(path / n)]
        if full and not weights:  # a config alone beside a model: a stray file more likely than an adapter (hp63a c48)
            raise CheckpointError(
                f"{path}: holds a full model ({full[0]}) and a PEFT {ADAPTER_CONFIG} without adapter weights (no "
                "adapter_model.safetensors): which is meant cannot be told",
                hint=f"if the folder is the full model, move {ADAPTER_CONFIG} out of it (a leftover of training?); if "
                     "the adapter is meant, put its weights beside the config in a folder of their own")
        if full:
            raise CheckpointError(
                f"{path}: holds both a full model ({full[0]}) and a PEFT adapter ({ADAPTER_CONFIG}): which of them "
                "is meant cannot be told (mergekit and transformers read the full model, a PEFT loader the adapter)",
                hint="move the adapter's files (adapter_config.json, adapter_model.safetensors) into a folder of "
                     "their own, and give the folder of the one you mean")
        return open_adapter(path, label)
    index = path / "model.safetensors.index.json"
    if os.path.lexists(index):  # a FIFO or folder there is named by the limited reader, not "no weights found"
        weight_map = _read_index(index)
        shards = sorted(set(weight_map.values()))
        single = path / "model.safetensors"
        if os.path.lexists(single) and single not in {Path(s) for s in shards}:
            # transformers loads model.safetensors first, the index only without it: which is the model?
            raise CheckpointError(
                f"{path}: holds two sets of weights, model.safetensors and the {len(shards)} shard(s) that "
                "model.safetensors.index.json names; transformers loads model.safetensors, other tools the shards",
                hint="move the set that is not this model out of the folder (or give the single file itself as the "
                     "model), then run again")
        return SafetensorsCheckpoint(path, shards, weight_map, label)
    if (path / "model.safetensors").is_file():
        inside(path / "model.safetensors", path, "the model's weights")  # a link may not leave the model
        return SafetensorsCheckpoint(path, [path / "model.safetensors"], {}, label)
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        inside(singles[0], path, "the model's weights")
        return SafetensorsCheckpoint(path, singles, {}, label)
    pickles = [path / "pytorch_model.bin.index.json"] if (path / "pytorch_model.bin.index.json").is_file() else []
    if pickles:
        weight_map = _read_index(pickles[0])
        pickle_files = sorted(set(weight_map.values()))
    else:
        pickle_files = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        for p in pickle_files:
            inside(p, path, "the model's weights")
    if pickle_files:
        if not allow_pickle:
            raise _refuse_pickle(pickle_files[0])
        return PickleCheckpoint(path, pickle_files, label)
    found = ", ".join(sorted(p.name for p in path.iterdir())[:8]) or "nothing"
    if len(singles) > 1:  # shards without the index that maps tensors to them: which is which cannot be told
        raise CheckpointError(
            f"{path}: holds {len(singles)} .safetensors files ({', '.join(p.name for p in singles[:4])}"
            f"{', ...' if len(singles) > 4 else ''}) but no model.safetensors.index.json, the index that says which "
            "tensors each shard holds and that they are one model",
            hint="the index is missing (a partial download, or a copy that skipped the JSON files): fetch or copy "
                 "model.safetensors.index.json too; or give one .safetensors file itself as the model")
    gguf = sorted(p.name for p in path.glob("*.gguf")) + sorted(p.name for p in path.glob("*.GGUF"))
    if gguf:  # (hp84a c59: "give the directory that holds the weights", which it was)
        raise CheckpointError(f"{path}: its weights are GGUF ({', '.join(gguf[:3])}{', ...' if len(gguf) > 3 else ''}"
                              "), which tiesmerge does not read; no safetensors weights found", hint=GGUF_HINT)
    raise CheckpointError(
        f"{path}: no model weights found (looked for model.safetensors.index.json, model.safetensors, *.safetensors); "
        f"the directory holds: {found}", hint=_shadow_hint(path) or "give the directory that holds the weights",
    )


def _shadow_hint(path: Path) -> str | None:
    """When a folder named like a repo id (``org/name``) stands where the user may have meant the
    cached repository: say that a local path always wins over the Hugging Face cache."""
    from ..hub import _repo_dir, hub_cache, split_repo_id

    if path.is_absolute():  # an id is typed as org/name, never as an absolute path
        return None
    try:
        parts = split_repo_id(str(path))
    except CheckpointError:
        return None
    if parts is None or not _repo_dir(hub_cache(), parts[0], parts[1]).is_dir():  # only where the cache holds it
        return None
    return (f"./{parts[0]}/{parts[1]} is a local folder, and a local path always wins over the Hugging Face cache: "
            f"to use the cached {parts[0]}/{parts[1]}, run from another folder or give the cached snapshot's path")


def stored_float_dtype(checkpoint: Checkpoint) -> Any:
    """The one floating dtype (a ``DType``) a checkpoint's tensors are stored in, from its headers, or None where
    they hold several (or none)."""
    kinds = {checkpoint.info(n).dtype_info for n in checkpoint.names() if checkpoint.info(n).dtype_info.is_floating}
    return kinds.pop() if len(kinds) == 1 else None
