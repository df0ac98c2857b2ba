"""Statistics as files: safetensors keyed like the model, plus a small JSON manifest.

A statistics directory holds ``model.safetensors`` (or shards and an index, like a model)
and ``tiesmerge_stats.json``: the kind (``fisher`` or ``gram``), the digest of the model the
statistics were computed with, the number of examples and the options. It is written
atomically (a temporary sibling renamed into place), so an interrupted run leaves nothing
that looks complete. Because the tensors are an ordinary checkpoint, the merge engine reads
them chunk by chunk with the same readers as the models.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError, InvalidTensorError
from ..io.checkpoint import Checkpoint, StateDictCheckpoint, open_checkpoint
from ..io.writer import OutputEntry, ShardedWriter, atomic_directory, output_footprint
from ..limits import read_json
from ..paths import TOKENIZER_FILE_NAMES, check_input, check_not_input, fs_text, inside
from ..sizes import DEFAULT_SHARD_SIZE, parse_size
from ..version import __version__

__all__ = ["STATS_KINDS", "MANIFEST_NAME", "StatsManifest", "Statistics", "StatsSource", "save_stats", "load_stats",
           "open_stats", "model_digest", "files_digest", "combine_digests", "config_digest"]

STATS_KINDS = ("fisher", "gram")
MANIFEST_NAME = "tiesmerge_stats.json"


@dataclass(frozen=True)
class StatsManifest:
    kind: str  # "fisher": diagonal Fisher, shaped like each parameter; "gram": (in, in) per Linear weight
    examples: int  # examples the statistics average over
    options: dict[str, Any] = field(default_factory=dict)  # how they were computed (method options)
    model_digest: str | None = None  # "files:<sha256>" of the model's weight files, or "tensors:<sha256>"
    model: str | None = None  # where the model was read from, for people
    tokenizer_digest: str | None = None  # sha256 of the model folder's tokenizer files the texts were encoded with
    config_digest: str | None = None  # sha256 of the model's config.json as read (its function: activations, ...)
    tiesmerge_version: str = __version__
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str) -> StatsManifest:
        known = {f for f in cls.__dataclass_fields__}
        if not isinstance(data, Mapping) or data.get("kind") not in STATS_KINDS or "examples" not in data:
            raise CheckpointError(f"{source}: not a tiesmerge statistics manifest (needs kind "
                                  f"{'|'.join(STATS_KINDS)} and examples)",
                                  hint="statistics directories are written by tiesmerge stats fisher|gram")
        from ..methods.base import _shown  # (bounded: a value of thousands of digits or levels is shown short)

        examples = data["examples"]
        if not isinstance(examples, int) or isinstance(examples, bool) or examples < 0:  # the value said (hp63a c16)
            raise CheckpointError(f"{source}: statistics manifest field 'examples' is {_shown(examples)}, not a "
                                  "count of examples (a whole number)",
                                  hint="recompute the statistics with tiesmerge stats fisher|gram")
        types = {"options": dict, "model_digest": (str, type(None)), "model": (str, type(None)),
                 "tokenizer_digest": (str, type(None)), "config_digest": (str, type(None)),
                 "tiesmerge_version": str, "created": str}
        wrong = [k for k, t in types.items() if k in data and not isinstance(data[k], t)]
        if wrong:
            raise CheckpointError(f"{source}: statistics manifest field {wrong[0]!r} is {_shown(data[wrong[0]])}, of "
                                  "the wrong type", hint="recompute the statistics with tiesmerge stats fisher|gram")
        odd = next((k for k in ("tokenizer_digest", "config_digest") if isinstance(data.get(k), str)
                    and not re.fullmatch(r"[0-9a-f]{64}", data[k])), None)
        if odd is not None:  # "" or an edit: not a sha256, said as damage, not as "its tokenizer changed" (hp81b c08)
            raise CheckpointError(f"{source}: statistics manifest field {odd!r} is {_shown(data[odd])}, not a sha256 "
                                  "digest (the manifest was edited or damaged)",
                                  hint="recompute the statistics with tiesmerge stats fisher|gram")
        if isinstance(data.get("model"), str) and "\0" in data["model"]:  # no path holds one: os calls on it raised
            raise CheckpointError(f"{source}: statistics manifest field 'model' holds a NUL byte, which no path can "
                                  "(the manifest was edited or damaged)",  # ValueError, "a bug" (hp80b c18)
                                  hint="recompute the statistics with tiesmerge stats fisher|gram")
        if data["examples"] == 0:  # tiesmerge stats refuses empty data: statistics of nothing weigh nothing
            raise CheckpointError(f"{source}: the statistics were computed from 0 examples, so they describe no data",
                                  hint="recompute the statistics with tiesmerge stats fisher|gram on the task's data")
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class Statistics:
    """Statistics in memory: tensors keyed like the model's parameters, and their manifest."""

    manifest: StatsManifest
    tensors: dict[str, torch.Tensor]

    @property
    def kind(self) -> str:
        return self.manifest.kind

    def save(self, directory: str | os.PathLike, *, force: bool = False,
             shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
        return save_stats(directory, self, force=force, shard_size=shard_size)


@dataclass
class StatsSource:
    """Opened statistics for a merge: a lazily read checkpoint and the manifest, if any."""

    checkpoint: Checkpoint
    manifest: StatsManifest | None
    label: str

    def close(self) -> None:
        self.checkpoint.close()


def combine_digests(named: list[tuple[str, str]]) -> str:
    """One sha256 over (name, sha256) pairs, in name order: a model's digest from its files'."""
    digest = hashlib.sha256()
    for name, sha in sorted(named):
        digest.update(f"{name}\0{sha}\n".encode())
    return digest.hexdigest()


def files_digest(source: str | os.PathLike) -> str:
    """``files:<sha256>`` over the weight files of a model directory or file (names and contents):
    the digest a merge can check for free, since it hashes its inputs' files anyway."""
    ckpt = open_checkpoint(source)
    try:
        files = ckpt.files()
    finally:
        ckpt.close()
    named = []
    for path in files:
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(16 << 20):
                sha.update(block)
        named.append((path.name, sha.hexdigest()))
    return "files:" + combine_digests(named)


# the files a tokenizer is read from: statistics of texts encoded by another tokenizer describe another input
# pipeline, though the weights are the same (hp38 C38)
TOKENIZER_FILES = TOKENIZER_FILE_NAMES  # paths' list: what a merge copies and a resume stamps too (hp40 P1)


def recorded_place(model: str | os.PathLike | None) -> str | None:
    """Where the model was read from, as the manifest records it: an existing path made absolute, so that a later
    message names it wherever it runs (hp76b c76: a --model typed '.' was later "another model (.)", the caller's
    working folder), anything else as given."""
    if model is None:
        return None
    return os.path.abspath(model) if os.path.exists(model) else os.fspath(model)


def _model_folder(model: str | os.PathLike | None) -> Path | None:
    """The folder whose config and tokenizer go with ``model``: the folder itself, or a weights file's own folder
    (the link's, for a Hugging Face cache's link into blobs/), as a merge reading that file compares them (hp78b c20:
    statistics of model=folder/model.safetensors recorded neither digest)."""
    if model is None:
        return None
    path = Path(os.fspath(model))
    if path.is_dir():
        return path
    return path.parent if path.is_file() else None


def tokenizer_digest(model: str | os.PathLike | None) -> str | None:
    """sha256 over the names and contents of the tokenizer files in the model folder ``model`` (or the folder of the
    weights file ``model``), or None (no folder, or no tokenizer file)."""
    model = _model_folder(model)
    if model is None:
        return None
    named = []
    for name in TOKENIZER_FILES:
        path = Path(model) / name
        if path.is_file():
            named.append((name, hashlib.sha256(path.read_bytes()).hexdigest()))
    return combine_digests(named) if named else None


# fields of config.json that describe where the file came from, not the model's function
_CONFIG_PROVENANCE = ("_name_or_path", "transformers_version", "_commit_hash")


def config_digest(model: str | os.PathLike | None) -> str | None:
    """sha256 of the model folder's config.json as JSON (keys sorted; where it came from left out), or None (no folder
    or no config): statistics are the activations or gradients of the model the config builds, and the same weights
    under another config (hidden_act gelu -> relu) are another function (hp40 D12)."""
    model = _model_folder(model)
    if model is None or not (model / "config.json").is_file():
        return None
    try:
        config = read_json(Path(model) / "config.json", "the model's config.json")
    except (CheckpointError, ConfigError):
        return None  # the forward that computes statistics reads it first and names any problem
    if isinstance(config, dict):
        config = {k: v for k, v in config.items() if k not in _CONFIG_PROVENANCE}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def model_digest(module: torch.nn.Module, model: str | os.PathLike | None = None) -> str:
    """The digest a statistics manifest records: of ``model``'s weight files when the module was
    loaded from that directory (checked again when merging), else ``tensors:<sha256>`` over the
    module's state dict (provenance only)."""
    if model is not None and Path(model).exists():
        return files_digest(model)
    named = []
    for name, tensor in module.state_dict().items():
        raw = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        named.append((name, hashlib.sha256(str((tuple(tensor.shape), str(tensor.dtype))).encode() + raw).hexdigest()))
    return "tensors:" + combine_digests(named)


def check_finite_statistics(kind: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Statistics whose float32 values are not finite cannot weigh a merge: refused where they are computed
    (fisher_information, gram_matrices: hp63b c36, returned with NaN and Inf without a word) and saved."""
    for name, value in tensors.items():
        finite = torch.isfinite(value.float())  # float32: a float64 value past its range is said here too (c40)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise InvalidTensorError(
                f"{kind} statistic {name!r} {tuple(value.shape)}: {bad:,} entries are not finite (Inf or NaN) "
                "in float32", hint="the model's activations (or gradients) overflow float32 on these texts: its "
                "weights are likely damaged (check the model); statistics that overflow cannot weigh a merge")


def save_stats(directory: str | os.PathLike, stats: Statistics, *, force: bool = False,
               shard_size: int | str = DEFAULT_SHARD_SIZE) -> Path:
    """Write ``stats`` to ``directory`` atomically (safetensors + ``tiesmerge_stats.json``)."""
    if not isinstance(stats, Statistics):  # (hp46 c29b: the arguments swapped were a raw AttributeError)
        swapped = " (the arguments swapped? it is save_stats(directory, stats))" if isinstance(directory, Statistics) \
            else ""
        raise ConfigError(f"save_stats: stats must be a Statistics object, got {type(stats).__name__}{swapped}",
                          hint="save_stats(directory, Statistics(StatsManifest(kind, samples, ...), tensors))")
    directory = fs_text(directory)  # bytes, as every path of the API may be (hp45 c24)
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:  # typed, as merge's (hp45 c25: a bare ValueError)
        raise ConfigError(f"shard_size: {exc}") from None
    bad = [k for k, v in stats.tensors.items() if not isinstance(v, torch.Tensor) or not v.is_floating_point()]
    if bad:
        raise ConfigError(f"statistics tensor {bad[0]!r} is not a floating torch.Tensor")
    if not stats.tensors:  # written, then refused by every reader as "no model weights found" (hp63b c20)
        raise ConfigError("save_stats: the statistics hold no tensor", hint="statistics are one tensor per parameter "
                          "(fisher) or per Linear weight (gram): compute them with tiesmerge.stats")
    _check_manifest(stats.manifest)
    manifest = stats.manifest
    if not manifest.created:
        manifest = StatsManifest(**{**manifest.to_dict(),
                                    "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in stats.tensors.items()}
    check_finite_statistics(manifest.kind, tensors)  # before anything is written: a merge would refuse them
    if manifest.model and os.path.exists(manifest.model):  # never inside (or over) the model the statistics
        # describe, as `tiesmerge stats -o` refuses; a relative path recorded from another working folder that names
        # nothing here guards nothing (hp64b c30: it was resolved here, and named a folder that does not exist)
        check_not_input(directory, [("the model these statistics describe", manifest.model)])
    groups = [[OutputEntry(k, tuple(v.shape), v.dtype)] for k, v in tensors.items()]
    needed = output_footprint(sum(v.numel() * 4 for v in tensors.values()), tensors=len(tensors),
                              shard_bytes=shard_bytes)
    with atomic_directory(directory, force=force, needed_bytes=needed,
                          marker="tiesmerge_stats.json") as tmp:
        writer = ShardedWriter(tmp, groups, shard_bytes,
                               metadata={"format": "pt", "tiesmerge_stats": manifest.kind})
        try:
            for name, value in tensors.items():
                writer.write(name, None, value)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return Path(directory)


def _check_manifest(manifest: Any) -> None:
    """A manifest :func:`save_stats` writes must read back as one (hp63b c20: kind "bogus", examples -1 or "3",
    model_digest 5 were written, then refused by load_stats; a set in options was a raw TypeError, a NaN written as
    bare NaN, which is no JSON): its own reader's checks, before anything is written."""
    if not isinstance(manifest, StatsManifest):
        raise ConfigError(f"save_stats: the manifest is a {type(manifest).__name__}, not a StatsManifest",
                          hint="Statistics(StatsManifest(kind, examples, ...), tensors)")
    try:
        text = json.dumps(manifest.to_dict(), allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"save_stats: the manifest cannot be written as JSON ({str(exc)[:160]})",
                          hint="options hold plain values: numbers (finite), strings, lists and mappings") from None
    try:
        StatsManifest.from_dict(json.loads(text), "save_stats: the manifest")
    except CheckpointError as exc:
        raise ConfigError(exc.message, hint=f"kind is one of {'|'.join(STATS_KINDS)}, examples the count of "
                                            "examples (at least 1), digests texts or None") from None


def _read_manifest(directory: Path) -> StatsManifest:
    path = directory / MANIFEST_NAME
    if not os.path.lexists(path):
        raise CheckpointError(f"{directory}: no {MANIFEST_NAME}; this is not a statistics directory",
                              hint="compute statistics with tiesmerge stats fisher|gram --model ... -o DIR")
    inside(path, directory, "the statistics manifest")  # never read through a link that leaves the folder
    # finite: its values go into the merged model's manifest, which strict JSON readers read (hp70a c34)
    return StatsManifest.from_dict(read_json(path, "the statistics manifest", finite=True), str(path))


def open_stats(source: str | os.PathLike | Statistics | Mapping[str, torch.Tensor], *, kind: str | None = None,
               label: str | None = None) -> StatsSource:
    """Open statistics for reading: a directory written by :func:`save_stats`, a
    :class:`Statistics` object, or a plain mapping of tensors (no manifest, so no checks of
    kind or model digest). ``kind`` given: statistics of another kind are a ConfigError."""
    if isinstance(source, Statistics):
        manifest: StatsManifest | None = source.manifest
        ckpt: Checkpoint = StateDictCheckpoint(source.tensors, label or f"{source.kind} statistics")
    elif isinstance(source, Mapping):
        manifest, ckpt = None, StateDictCheckpoint(source, label or "statistics state dict")
    elif not isinstance(fs_text(source), (str, os.PathLike)):  # (hp69a c25: None, 5, a list: a bare TypeError)
        raise ConfigError(f"{label or 'statistics'}: a {type(source).__name__} is no statistics (a directory written "
                          "by tiesmerge stats, a Statistics object, or a mapping of tensors)",
                          hint="give one statistics directory per model, in the models' order")
    else:
        path = Path(fs_text(source))  # bytes, as every path of the API may be (hp45 c24)
        if os.path.lexists(path):
            check_input(path, "the statistics folder",  # loops, dangling links, FIFOs: typed errors
                        hint="pass the folder `tiesmerge stats fisher|gram -o DIR` wrote")
        if not path.is_dir():
            why = " (no such path)" if not path.exists() else ""
            from ..paths import look_alike_hint  # (hp74a c56: a folder stored decomposed, typed composed)

            raise CheckpointError(f"{path}: not a statistics directory{why}",
                                  hint=(look_alike_hint(path) if why else None)
                                  or "pass the directory written by tiesmerge stats fisher|gram")
        manifest = _read_manifest(path)
        ckpt = open_checkpoint(path, label=label or str(path))
    where = label or getattr(ckpt, "label", "statistics")
    if kind is not None and manifest is not None and manifest.kind != kind:
        ckpt.close()
        raise ConfigError(f"{where}: holds {manifest.kind} statistics, but the method needs {kind} statistics",
                          hint=f"compute them with: tiesmerge stats {kind} --model MODEL --data DATA -o DIR")
    return StatsSource(ckpt, manifest, where)


def load_stats(directory: str | os.PathLike) -> Statistics:
    """Read a statistics directory fully into memory."""
    if not isinstance(fs_text(directory), (str, os.PathLike)):  # (hp69a c26, c27: None a TypeError, a mapping
        # of tensors a bare AssertionError)
        raise ConfigError(f"load_stats reads a statistics directory, got {type(directory).__name__}",
                          hint="pass the directory written by tiesmerge stats (or Statistics.save)")
    opened = open_stats(directory)
    try:
        return Statistics(opened.manifest, {n: opened.checkpoint.read(n) for n in opened.checkpoint.names()})
    finally:
        opened.close()
