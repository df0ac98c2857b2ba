"""Writing merged tensors as they are produced, into a directory that appears only when complete.

The safetensors header lists every tensor's dtype, shape and byte range, all known from the
plan before the first value is computed; so each shard's header is written first and the
data streams in behind it, chunk by chunk. No shard is ever held in memory.

Chunks arrive as numpy arrays of the stored bytes (bfloat16 as a uint16 view: see
``DType.numpy``), which needs no torch, or as torch tensors in the output dtype.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import stops
from ..dtypes import DType, as_dtype
from ..errors import CheckpointError, ConfigError, MergeWarning, OutputError, kernel_cache_error
from ..finite import check_finite
from ..limits import MAX_CONFIG_BYTES, loads_json, non_finite, read_json
from ..paths import (
    _SPACE,
    CHAT_TEMPLATES_DIR,
    MODEL_FILES,
    MODEL_SUFFIXES,
    OUTPUT_MARKERS,
    STAMPS_FIELD,
    WRITTEN_FIELD,
    as_if_created,
    check_output_location,
    file_stamp,
    inside,
    listing,
    model_dir_files,
    open_regular,
    physical,
    write_error,
)
from ..scratch import host_tag, process_is_dead
from ..sizes import format_size

if TYPE_CHECKING:
    import torch

__all__ = ["OutputEntry", "plan_shards", "SafetensorsStreamWriter", "ShardedWriter", "atomic_directory",
           "copy_model_files", "model_files", "remove_stale", "MODEL_FILES"]

# what a model needs beside its weights: config, generation config, tokenizer, chat template, processor


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


def _shard_error(path: str | os.PathLike, exc: OSError) -> OutputError:
    from .. import sizes

    how = f"write smaller shards ({sizes.shard_size_option}), or " if sizes.shard_size_option else ""
    return write_error(path, exc, too_large_hint=how + "write to another file system, or raise the file size "
                                                        "limit (ulimit -f)")


class SafetensorsStreamWriter:
    """Writes one safetensors file whose tensors arrive in order, possibly in row chunks."""

    def __init__(self, path: Path, entries: list[OutputEntry], metadata: dict[str, str] | None = None,
                 finite: Collection[str] = ()) -> None:
        header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
        self._finite = {e.name: e.dtype_info.code for e in entries if e.name in finite}  # checked before written
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
        try:
            self._file = open(path, "wb")  # noqa: SIM115 -- closed in close()
            self._file.write(struct.pack("<Q", len(raw)) + raw)
        except OSError as exc:
            raise write_error(path, exc) from None

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
        if name in self._finite:  # merged values: an overflow stops the merge before the bytes land
            check_finite(name, chunk, self._finite[name], (self._written - self._ranges[name][0]) // itemsize)
        if nbytes:
            try:
                self._file.write(data)
            except OSError as exc:
                raise _shard_error(self.path, exc) from None
        self._written += nbytes

    def duplicate(self, name: str, source: str) -> None:
        """Write tensor ``name`` as a byte copy of ``source``, written earlier to this file
        (tied weights keep both names without holding the tensor in memory)."""
        begin, end = self._ranges[source]
        self._expect(name, end - begin)
        try:
            self._file.flush()
            with open(self.path, "rb") as src:
                src.seek(self._data_start + begin)
                left = end - begin
                while left:
                    block = src.read(min(left, 64 << 20))
                    self._file.write(block)
                    left -= len(block)
        except OSError as exc:
            raise _shard_error(self.path, exc) from None
        self._written += end - begin

    def abort(self) -> None:
        """Close the file after a failed merge (its folder is removed whole): no check, no error of its own."""
        with contextlib.suppress(OSError):
            self._file.close()

    def close(self) -> None:
        try:
            self._file.close()  # flushes the last buffered bytes: a full disk may show only now
        except OSError as exc:
            raise _shard_error(self.path, exc) from None
        if self._written != self._total:
            raise RuntimeError(f"{self.path}: closed after {self._written} of {self._total} data bytes")


class ShardedWriter:
    """A Hugging Face weight layout: ``model.safetensors`` or shards plus their index."""

    def __init__(self, directory: Path, groups: list[list[OutputEntry]], shard_size: int,
                 metadata: dict[str, str] | None = None, finite: Collection[str] = ()) -> None:
        """``finite``: names of the tensors whose values must be finite (the merged ones)."""
        self.directory = directory
        self._check = frozenset(finite)
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
                                                         self._metadata, self._check))
        return self._open[1]

    def write(self, name: str, rows: slice | None, chunk: np.ndarray | torch.Tensor) -> None:
        """The next rows of ``name`` (see ``SafetensorsStreamWriter.write``)."""
        self._file_for(name).write(name, chunk)

    def alias(self, name: str, source: str) -> None:
        """``name`` holds the same values as ``source``, written just before it (tied weights)."""
        if self._shard_of[name] != self._shard_of[source]:
            raise RuntimeError(f"tied tensors {source!r} and {name!r} were planned into different shards")
        self._file_for(name).duplicate(name, source)

    def abort(self) -> None:
        """After a failed merge: the open shard closed, nothing else written (hp64b c06: a ResourceWarning of an
        unclosed file on every refusal met mid-merge)."""
        if self._open is not None:
            self._open[1].abort()
            self._open = None

    def close(self) -> None:
        if self._open is not None:
            self._open[1].close()
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": {e.name: self.files[i] for i, shard in enumerate(self.shards) for e in shard}}
            path = self.directory / "model.safetensors.index.json"
            try:
                path.write_text(json.dumps(index, indent=2) + "\n")
            except OSError as exc:
                raise write_error(path, exc) from None


def _check_output_path(final: Path, force: bool, marker: str = "tiesmerge.json") -> None:
    check_output_location(final, force, marker)


# Temporary siblings are named for the process, not the output, so that any legal output name
# (up to 255 bytes) works: ".tiesmerge-tmp-<host>-<pid>-<random>". A run killed outright (SIGKILL,
# a power cut) leaves one behind; a later run in the same folder removes those whose process is
# dead (on this host: pids of other machines sharing the folder mean nothing here).
# Single files written beside their place (tune's --json, adapt's checkpoint) are staged as
# ".tiesmerge-file-<host>-<pid>-<random>" and cleaned the same way.
_TMP = re.compile(r"^\.tiesmerge-(tmp|old|file)-([0-9a-f]{8})-(\d+)-[A-Za-z0-9_]+$")


# A temporary folder holds this file from its creation until just before it is renamed into place: what proves a
# dead run's folder of that name is tiesmerge's to remove (hp60b c51, c53: a user's folder named like one, holding a
# tune's data, an evaluator's module, the working folder or a search's --dir, was removed with them)
OWNED = ".tiesmerge-temporary"


def _sibling(parent: Path, kind: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix=f".tiesmerge-{kind}-{host_tag()}-{os.getpid()}-", dir=parent))
    try:
        (folder / OWNED).touch()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return folder


def _ours(path: Path) -> bool:
    """Whether a dead run's temporary-named folder is tiesmerge's: it holds OWNED, or nothing, or only a finished
    output whose manifest lists every file in it (the moment between OWNED's removal and the rename into place)."""
    if os.path.isfile(path / OWNED) and not os.path.islink(path / OWNED):
        return True
    try:
        entries = os.listdir(path)
    except OSError:
        return False
    if not entries:
        return True
    from ..paths import unlisted_files

    return any(os.path.isfile(path / m) for m in OUTPUT_MARKERS) and unlisted_files(path) == []


def _holds_the_run(path: Path) -> bool:
    """Whether ``path`` holds the working folder or a folder Python imports from (an evaluator's module)."""
    import sys

    real = os.path.realpath(path)
    held = [os.getcwd() if os.path.exists(".") else None, *(p or "." for p in sys.path)]
    return any(h is not None and (os.path.realpath(h) + os.sep).startswith(real + os.sep) for h in held)


def _in_use(path: Path) -> bool:
    """Whether ``path`` holds (or lies in) an input of the running merge, or a file this process has open or mapped."""
    from .card import _KEPT_OUT

    real = Path(os.path.realpath(path))
    # a dead run's entry directly in a root is not in use: the root is the folder being cleaned, a search's --dir
    # whose staged report files a killed run left (hp54 c50: never removed); one deeper inside a root is kept
    if any(real == root or real in root.parents or (root in real.parents and root != real.parent)
           for root in _KEPT_OUT):
        return True
    prefix = str(real) + (os.sep if real.is_dir() else "")
    try:
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
                    return True
        with open("/proc/self/maps") as maps:
            return any(prefix in line for line in maps)
    except OSError:  # no /proc (macOS): the merge's registered inputs above are all that is known
        return False


def _dead_temporaries(parent: Path) -> Iterator[tuple[str, os.DirEntry]]:
    """(kind, entry) of each temporary sibling in ``parent`` that a dead run of this host left and tiesmerge may
    remove: a staged file not in use, or a folder proven its own (:func:`_ours`) that holds no input of this run, nor
    the working folder or an import path. What :func:`remove_stale` removes and :func:`_stale_bytes` counts."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    host = host_tag()
    for entry in entries:
        m = _TMP.match(entry.name)
        if not m or m.group(2) != host or m.group(3) == str(os.getpid()) or not process_is_dead(m.group(3)):
            continue
        path = Path(entry.path)
        if m.group(1) == "file":
            if entry.is_file(follow_symlinks=False) and not _in_use(path):
                yield "file", entry
        elif entry.is_dir(follow_symlinks=False) and not _in_use(path) and not _holds_the_run(path) and _ours(path):
            yield m.group(1), entry  # (in use: a salvaged output given as a model; not ours: a folder of the user's)


# the outputs put in place in this process (a command's stop message says what was written before it)
PLACED: list[Path] = []


def remove_stale(parent: Path) -> list[str]:
    """Remove temporary siblings left in ``parent`` by runs of this host whose process is dead.
    A replaced output parked by a run killed between its two renames is put back if its place
    is still free, else kept where it is. Returns what was cleaned."""
    cleaned = []
    for kind, entry in list(_dead_temporaries(parent)):
        path = Path(entry.path)
        if kind == "file":
            os.unlink(path)
        else:
            if kind == "old":
                for parked in path.iterdir():
                    if parked.name != OWNED and not os.path.lexists(parent / parked.name):
                        os.replace(parked, parent / parked.name)  # the previous output, back where it was
                        warnings.warn(f"{parent / parked.name}: put back: a run killed while replacing it (--force) "
                                      f"had set it aside as {path.name}", MergeWarning, stacklevel=2)  # (hp62a c20)
                for parked in path.iterdir():  # its place taken by a newer output of tiesmerge's: the --force that
                    # parked it completed, and this is what it was replacing (a kill cut its removal short: hp66a
                    # c16), so it goes; taken by a folder of the user's, it stays (hp62a c21)
                    if parked.name != OWNED and _is_output(parent / parked.name):
                        shutil.rmtree(parked, ignore_errors=True)
                if any(p.name != OWNED for p in path.iterdir()):  # its place is taken since: the parked output is
                    continue  # kept where it is, never removed (hp62a c21: a previous model deleted without a word)
            shutil.rmtree(path, ignore_errors=True)
        cleaned.append(entry.name)
    return cleaned


def _is_output(path: Path) -> bool:
    """Whether ``path`` is a folder holding one of tiesmerge's output markers (a manifest it wrote)."""
    from ..paths import OUTPUT_MARKERS, _is_marker

    return path.is_dir() and not path.is_symlink() and any(_is_marker(path / m) for m in OUTPUT_MARKERS)


# what an output takes on disk beside its weights' data, for the free-space check (hp56 c38: a dry run's 26 KiB for an
# output taking 60 KiB in 4 KiB blocks): the model card and tiesmerge.json (which lists every tensor), the files
# copied from the base, an index of shards, and each file's last block filled up
_BLOCK = 4096
_MANIFEST_BYTES = 16 << 10  # README.md and tiesmerge.json of a merge of few tensors (9 KiB measured for 20)
_BYTES_PER_TENSOR = 640  # what each tensor adds to them and to a shard index


def output_footprint(data_bytes: int, *, copied: Sequence[int] = (), tensors: int = 0,
                     shard_bytes: int = 5_000_000_000) -> int:
    """Bytes an output takes on disk: ``data_bytes`` of weights in shards of at most ``shard_bytes``, the files of
    ``copied`` sizes, and the card and manifest of ``tensors`` tensors, each file rounded up to whole blocks. The dry
    run and the real run both check free space against it."""
    def blocks(n: int) -> int:
        return -(-n // _BLOCK) * _BLOCK

    shards = max(1, -(-data_bytes // max(shard_bytes, 1)))
    return (data_bytes + shards * _BLOCK + sum(blocks(c) for c in copied)
            + blocks(_MANIFEST_BYTES + _BYTES_PER_TENSOR * tensors) + (_BLOCK if shards > 1 else 0))


def _stale_bytes(parent: Path) -> int:
    """Bytes that :func:`remove_stale` would free in ``parent`` (a parked output is put back, not freed; a file
    with other links frees nothing: hp62a c31)."""
    def freed(path: str) -> int:
        with contextlib.suppress(OSError):
            st = os.lstat(path)
            return st.st_blocks * 512 if st.st_nlink == 1 else 0
        return 0

    total = 0
    for kind, entry in _dead_temporaries(parent):
        if kind == "file":
            total += freed(entry.path)
        elif kind == "tmp":
            total += sum(freed(os.path.join(folder, name)) for folder, _, files in os.walk(entry.path)
                         for name in files)
    return total


def check_free_space(final: str | os.PathLike, needed_bytes: int, where: str | os.PathLike) -> None:
    """Refuse an output of ``needed_bytes`` where the file system holding ``where`` has less free (a dry run asks it
    of the folder the output would go in, the real run of its temporary)."""
    free = shutil.disk_usage(where).free
    if needed_bytes > free:  # a dead run's temporaries beside the output go before the write (a dry run counts them:
        free += _stale_bytes(Path(final).parent)  # hp61a c38, refused by the dry run, written by the real one)
    if needed_bytes > free:
        hint = "free some space or write elsewhere"
        replaced = 0
        with contextlib.suppress(OSError):  # a --force over an earlier output on the same file system (hp62a c14)
            if os.path.isdir(final) and not os.path.islink(final) and os.stat(final).st_dev == os.stat(where).st_dev:
                replaced = _tree_bytes(final)
        if replaced:
            hint = (f"the output it replaces ({format_size(replaced)}) is kept until the new one is complete, so "
                    "both must fit at once: free some space, remove the old output yourself first, or write elsewhere")
        raise OutputError(f"{final}: the output needs {format_size(needed_bytes)} (its weights, model card, "
                          f"manifest and copied files, in whole blocks) but only {format_size(free)} is free there",
                          hint=hint)


def _tree_bytes(folder: str | os.PathLike) -> int:
    """Bytes the files under ``folder`` take on disk (links not followed)."""
    total = 0
    for path, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(path, name)).st_blocks * 512
    return total


@contextmanager
def atomic_directory(final: str | os.PathLike, *, force: bool = False, needed_bytes: int = 0,
                     marker: str = "tiesmerge.json") -> Iterator[Path]:
    """Yield a temporary sibling of ``final``; on success rename it into place, on any error
    (Ctrl-C and SIGTERM included) remove it, so no half-written output ever looks complete.
    ``final`` may replace (``force``) only a directory tiesmerge wrote (see ``tiesmerge.paths``)."""
    if not isinstance(force, bool):  # every writer comes here: force="no" (truthy) must not replace anything
        raise ConfigError(f"force={force!r} must be True or False")
    final = physical(final)  # where the kernel puts it: "l/../out" after a link l is not "./out"
    _check_output_path(final, force, marker)
    # parent folders this call creates are removed again on failure, like the output itself
    created = [p for p in final.parents if not p.exists()]  # innermost first
    tmp: Path | None = None
    try:  # every step from the temporary's creation on removes it when interrupted (hp53 c40: a SIGTERM here left
        try:  # .tiesmerge-tmp-* while the message said nothing was left)
            final.parent.mkdir(parents=True, exist_ok=True)
            remove_stale(final.parent)
            tmp = _sibling(final.parent, "tmp")
            as_if_created(tmp, directory=True)  # mkdtemp's 0700 would outlive the rename into place
        except OSError as exc:
            raise OutputError(f"{final}: cannot create the output directory ({exc.strerror or exc})",
                              hint="choose a location you can write to") from None
        check_free_space(final, needed_bytes, tmp)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    try:
        try:
            yield tmp
        except OutputError as exc:  # a writer's own error names its file in the temporary output: name the output's
            if str(tmp) not in exc.message:  # (hostile pass 33, C38: "…/.tiesmerge-tmp-…/model.safetensors")
                raise
            raise OutputError(exc.message.replace(str(tmp), str(final)), hint=exc.hint) from None
        except OSError as exc:  # a file the caller wrote into tmp (the manifest, the card): name it and the space
            if exc.errno not in _SPACE or kernel_cache_error(exc) is not None:  # numba's own cache: its error
                raise
            named = Path(exc.filename) if exc.filename else None
            if named is not None and (named == tmp or tmp in named.parents):
                named = final / named.relative_to(tmp)
            raise write_error(named or _being_written(tmp, final), exc) from None
        _record_listing(tmp)  # (OWNED is no file of the output: left out of its listing)
        _check_output_path(final, force, marker)  # the path may have changed while we worked
        # the swap runs whole: a stop signal arriving in it is delivered once the new output is in place and the
        # old one gone (hp66a c14-c16: a SIGTERM between the renames left half of the replaced output parked)
        with stops.held():
            old = None
            if os.path.lexists(final):
                old = _sibling(final.parent, "old")
                try:
                    os.replace(final, old / final.name)
                except BaseException:  # nothing moved (a mount point, a busy folder): the parking folder goes too
                    shutil.rmtree(old, ignore_errors=True)
                    raise
            try:
                with contextlib.suppress(FileNotFoundError):  # the output's own files only, from here on (_ours: a
                    os.unlink(tmp / OWNED)  # listed output is ours too)
                os.replace(tmp, final)
            except BaseException:
                if old is not None:  # put the previous output back instead of leaving it hidden in a dot-folder
                    os.replace(old / final.name, final)
                    shutil.rmtree(old, ignore_errors=True)
                raise
            PLACED.append(final)  # complete, whatever stops the command after this: said so (cli.main)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _being_written(tmp: Path, final: Path) -> Path:
    """The file a write error without a file name was about (an OSError from ``write()`` names none):
    the newest file in the temporary output, shown at its place in the final one."""
    try:
        newest = max((p for p in tmp.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns, default=None)
    except OSError:
        newest = None
    return final / newest.relative_to(tmp) if newest is not None else final


def _record_listing(tmp: Path) -> None:
    """Write into each marker of the finished output (its manifest) the list of every file in it,
    the marker itself included, so that a later ``--force`` can tell the files tiesmerge wrote
    from ones a user added since, and delete only the former's folder (tiesmerge.paths)."""
    names = [n for n in listing(tmp) if n != OWNED]
    stamps = {name: file_stamp(tmp / name) for name in names if name not in OUTPUT_MARKERS}
    for marker in OUTPUT_MARKERS:
        path = tmp / marker
        if os.path.islink(path) or not path.is_file():
            continue
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data[WRITTEN_FIELD] = names
            data[STAMPS_FIELD] = stamps
            try:
                path.write_text(json.dumps(data, indent=2) + "\n")
            except OSError as exc:
                raise write_error(path, exc) from None


def _remove_empty(folders: list[Path]) -> None:
    """Remove folders (innermost first) that are still empty; stop at the first that is not."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def model_files(source: Path | None) -> list[Path]:
    """The files of the base model's directory that the output needs beside its weights (config,
    generation config, tokenizer files, chat template), checked before anything heavy is read:
    each must be a regular file inside the directory (a link leaving it, a loop, a dangling link
    or a FIFO is an error now, not after the merge). Anything else there is left alone."""
    if source is None:
        return []
    files = [f for f in model_dir_files(source, "the base")
             if f.name in MODEL_FILES or f.name.endswith(MODEL_SUFFIXES) or f.parent.name == CHAT_TEMPLATES_DIR]
    config = source / "config.json"
    if config in files and not isinstance(read_json(config, "the base's config"), dict):
        raise CheckpointError(f"{config}: holds no JSON object, so it is not a model config",
                              hint="fix or remove the base's config.json")
    return files


def check_model_files(files: Sequence[Path], role: str = "the base") -> None:
    """The files copied beside the merged weights, checked before the merge's heavy work: none held open for writing
    by another process (a tokenizer still downloading), and each JSON file whole (a truncated download would ship
    in an output that looks complete, its tokenizer failing to load). A JSON file past the config cap is copied
    unparsed, as before (no tokenizer is that large; a file that big is not ours to refuse here)."""
    from . import leases

    for path in files:
        fd = open_regular(path, f"{role}'s {path.name}")
        try:
            leases.refuse_writers(fd, path)  # a tokenizer another process is still writing: refused, named
            if path.suffix == ".json" and os.fstat(fd).st_size <= MAX_CONFIG_BYTES:
                with os.fdopen(os.dup(fd), "rb") as f:
                    data = f.read()
                try:
                    parsed = loads_json(data, str(path))
                    if not isinstance(parsed, dict):  # every such file is an object
                        raise CheckpointError(f"{path}: holds JSON that is not an object (e.g. null)")
                except CheckpointError as exc:
                    raise CheckpointError(f"{exc.message}: {role}'s {path.name} is damaged or incomplete (a download "
                                          "cut short?), and the output would carry it",
                                          hint=f"restore {path.name} (download it again), then run again") from None
                _warn_non_finite(parsed, path, role)
        finally:
            os.close(fd)


def _warn_non_finite(data: Any, path: Path, role: str) -> None:
    """A copied JSON file holding NaN, Infinity or a number past a float's range (1e400), which Python's JSON reader
    takes and no JSON standard allows: said, since the output carries it as it is (hp68a c42: a generation_config's
    max_length of NaN copied without a word)."""
    found = [f"{where or 'the top'} = {value}" for where, value in non_finite(data, limit=4)]
    if found:
        warnings.warn(MergeWarning(
            f"{path}: {role}'s {path.name} holds number(s) that are not finite ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}: NaN, Infinity or past a float's range), which the output carries "
            "(a number past a float's range as Infinity, where the file is rewritten); libraries reading them may "
            "fail"), stacklevel=3)  # (hp70a c47: "as they are" of a 1e400 rewritten as Infinity)


def copy_model_files(source: Path | None, target: Path, *, dtype: DType | str | torch.dtype | None = None,
                     files: Sequence[Path] | None = None) -> list[str]:
    """Copy ``files`` (default: :func:`model_files` of ``source``) into ``target`` as new regular
    files: contents only, never a link, never what a link outside the directory points at.
    Returns their names (the manifest lists them).

    config.json's ``torch_dtype`` (and ``dtype``) follow ``dtype``, the dtype the weights are written in (a
    ``DType``, a torch dtype or a name such as ``bf16``), where the config says otherwise.
    """
    if source is None:
        return []
    files = model_files(source) if files is None else files
    copied = []
    for path in files:
        rel = path.relative_to(source) if path.parent != source else Path(path.name)  # chat templates: in their folder
        inside(path, source, f"the base's {rel}")  # checked again: the folder may have changed since
        fd = open_regular(path, f"the base's {rel}")
        try:
            (target / rel).parent.mkdir(exist_ok=True)
            with os.fdopen(fd, "rb") as src, open(target / rel, "xb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except OSError as exc:
            raise write_error(target / rel, exc) from None
        copied.append(str(rel))
    _warn_of_custom_code(target, copied)
    config = target / "config.json"
    if dtype is not None and "config.json" in copied:
        try:
            data = loads_json(config.read_bytes(), str(config))
        except CheckpointError:  # read whole before the merge (model_files): changed since, which the check of the
            data = None  # inputs' stamps names with the base's own path, not this private copy's
        if isinstance(data, dict):
            before = json.dumps(data)
            _set_dtype(data, as_dtype(dtype).name)
            if json.dumps(data) != before:  # a config that already says so is copied byte for byte
                config.write_text(json.dumps(data, indent=2) + "\n")
    return copied


_FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64", "half", "float", "double", "fp16", "bf16", "fp32")


def _set_dtype(config: dict, name: str, depth: int = 0) -> None:
    """The dtype keys of a config and of its sub-configs (a composite model's text_config, vision_config, ...: each
    names the dtype its part loads in; every weight is written in ``name``)."""
    for key in ("torch_dtype", "dtype"):
        # nested: only a floating dtype's name, not a field of another meaning that happens to be called dtype (a
        # quantization config's "dtype": "int8": hp69a c51)
        if key in config and (depth == 0 or config[key] in _FLOAT_DTYPE_NAMES):
            config[key] = name
    if depth < 4:  # configs nest a level or two; the JSON reader bounds the depth anyway
        for value in config.values():
            if isinstance(value, dict):
                _set_dtype(value, name, depth + 1)


def _warn_of_custom_code(target: Path, copied: Sequence[str]) -> None:
    """A copied config naming custom code (``auto_map``): tiesmerge never copies code, so the output
    loads with the standard classes only once the entries go, or with the code put back beside it
    (and ``trust_remote_code``, which runs it). Said, not silently left dangling."""
    for name in ("config.json", "tokenizer_config.json"):
        if name not in copied:
            continue
        try:
            data = loads_json((target / name).read_bytes(), name)
        except CheckpointError:  # not ours to judge here: transformers reads it, and says what is wrong
            continue
        auto_map = data.get("auto_map") if isinstance(data, dict) else None
        if auto_map:
            named = sorted({str(v) for v in (auto_map.values() if isinstance(auto_map, dict) else [auto_map])
                            for v in (v if isinstance(v, list) else [v]) if v})
            warnings.warn(f"the base's {name} names custom code (auto_map: {', '.join(named)[:200]}), which "
                          "tiesmerge never copies: the output loads only with the standard classes (delete the "
                          "auto_map entries) or with that code put beside it and trust_remote_code",
                          MergeWarning, stacklevel=3)
