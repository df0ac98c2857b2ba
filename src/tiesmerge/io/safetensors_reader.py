"""Safetensors files read lazily, without torch: a header up front, rows of a tensor on demand.

Every file is validated once by safetensors' own parser (header, dtypes, that the data covers
the file exactly) through its numpy front end, which never imports torch; then rows are read
with ``pread`` into fresh or caller-owned memory, or mapped from the page cache. Only ``read``,
which returns a torch tensor, imports torch.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import SafetensorError, safe_open

from ..dtypes import BY_CODE
from ..errors import GGUF_HINT, CheckpointError, OutOfMemoryError, is_out_of_memory, memory_hint
from ..paths import open_regular
from . import leases
from .protocol import TensorInfo

if TYPE_CHECKING:
    import torch

__all__ = ["SafetensorsCheckpoint"]

# fault a mapping's pages in at once (on the read-ahead thread, not in the kernels): Linux 5.14+;
# Python names the constant from 3.12, its value is 22
_POPULATE = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform.startswith("linux") else None)


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
        self._leased: set[Path] = set()  # files whose read lease is held: safe to map
        self._where: dict[str, Path] = {}
        self.unindexed: dict[str, Path] = {}  # tensors a shard holds that the index does not list
        self._info: dict[str, TensorInfo] = {}
        self._start: dict[str, int] = {}  # absolute file offset of each tensor's first byte
        # tensors the index gives to one shard that another shard stores too: name -> [(file, TensorInfo, start)]
        self._copies: dict[str, list[tuple[Path, TensorInfo | None, int]]] = {}
        try:
            for file in weight_files:
                self._index_file(file, weight_map)
            self._refuse_copies_that_differ()
        except BaseException:
            self.close()
            raise
        missing = [name for name in weight_map if name not in self._where]
        misplaced = [name for name in missing if name in self._copies]  # stored, but in another shard (hp62a c24)
        if misplaced:
            self.close()
            first = misplaced[0]
            raise CheckpointError(
                f"{path}: the index puts {len(misplaced)} tensor(s) in a shard that does not hold them, first "
                f"{first!r} (the index says {weight_map[first].name}, it is stored in "
                f"{self._copies[first][0][0].name})",
                hint="the index does not match its shards: regenerate model.safetensors.index.json from the shards' "
                     "headers (or fetch the index again); the shards themselves are not at fault")
        if missing:
            self.close()
            from ..unicode_names import apart, first_twin

            # a name the shards hold in another Unicode normalization prints alike (hp73a c02: "fetch the shards
            # again" of a shard that holds it): the code points said
            twin = first_twin(missing, (*self._where, *self.unindexed))
            hint = "the download is incomplete or the index belongs to another model; fetch the shards again"
            if twin is not None:
                hint = (f"the index's and the shards' names {apart(*twin)}: write the index's weight_map with the "
                        "names as the shards store them")
            raise CheckpointError(
                f"{path}: the index names {len(missing)} tensor(s) its shards do not hold, first {missing[0]!r} "
                f"(expected in {weight_map[missing[0]].name})", hint=hint)

    def _index_file(self, file: Path, weight_map: dict[str, Path]) -> None:
        fd = open_regular(file, "a weights file")  # a FIFO or device is refused here, never read (it would block)
        try:
            # the numpy front end validates the same layout as torch's, without importing torch
            with safe_open(str(file), framework="numpy") as handle:
                names = list(handle.keys())
            header_len = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
            header = json.loads(os.pread(fd, header_len, 8))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except MemoryError as exc:  # safetensors maps the whole file to read its header (hp43 C51: a bare MemoryError)
            size = os.fstat(fd).st_size
            os.close(fd)
            raise OutOfMemoryError(
                f"{file}: opening it maps the whole file ({size / 2**30:,.1f} GiB) into the address space, and the "
                f"process's limit refuses that ({exc})",
                hint="raise the address-space limit (ulimit -v unlimited): the mapping reserves addresses and reads "
                     "nothing; a smaller --memory-budget cannot help") from None
        except (SafetensorError, OSError, ValueError, struct.error, RecursionError) as exc:
            foreign = _foreign_format(fd)
            hint = _metadata_hint(fd) or "the file is truncated or corrupt; download or copy it again"
            os.close(fd)
            if foreign is not None:  # another format under a .safetensors name: not "truncated" (hp85a c75)
                raise CheckpointError(f"{file}: not a safetensors file but {foreign[0]}, by its first bytes",
                                      hint=foreign[1]) from None
            raise CheckpointError(f"{file}: not a readable safetensors file ({str(exc)[:300]})", hint=hint) from None
        except BaseException:
            os.close(fd)
            raise
        self._fds[file] = fd  # closed by close(), also when a tensor below is refused
        if leases.hold(fd, file):  # another process opening it for writing now waits, and the merge stops
            self._leased.add(file)
        for name in names:
            if weight_map and weight_map.get(name) != file:
                if name not in weight_map:  # held by a shard but not listed: named if a merge misses it
                    self.unindexed.setdefault(name, file)
                else:  # the index's shard owns it; this copy must hold the same bytes (checked once all are read)
                    entry = header[name]
                    known = BY_CODE.get(entry.get("dtype")) if isinstance(entry, dict) else None
                    info = TensorInfo(tuple(entry["shape"]), known) if known is not None else None
                    self._copies.setdefault(name, []).append(
                        (file, info, 8 + header_len + entry["data_offsets"][0]))
                continue  # the index decides which shard owns a name
            entry = header[name]
            if entry["dtype"] not in BY_CODE:
                raise CheckpointError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, "
                                      "which tiesmerge cannot read",
                                      hint=f"tiesmerge reads the dtypes {', '.join(BY_CODE)}: convert the tensor to "
                                           "one of them, or leave it out of the file")
            span = math.prod(d for d in entry["shape"] if d) * BY_CODE[entry["dtype"]].itemsize
            if span >= 1 << 62:  # (0, 2**62): no bytes, but no array (numpy, torch) takes that shape (hp29 F5)
                raise CheckpointError(f"{file}: tensor {name!r} has shape {tuple(entry['shape'])}: its dimensions "
                                      "other than 0 span more bytes than any array can",
                                      hint="the file is damaged or was not written by a framework; save the model "
                                           "again")
            self._where[name] = file
            self._info[name] = TensorInfo(tuple(entry["shape"]), BY_CODE[entry["dtype"]])
            self._start[name] = 8 + header_len + entry["data_offsets"][0]

    def _refuse_copies_that_differ(self) -> None:
        """A tensor the index gives to one shard and another shard stores too, with other values: transformers loads
        every tensor of every shard, so the copy a loaded model holds is the last shard's read, not always the
        index's; merging the index's would merge another model than the one that runs (hostile pass 31, C84).
        Equal copies (a writer that stores a shared tensor in each shard) are one tensor."""
        chunk = 16 << 20
        for name, copies in self._copies.items():
            owner = self._where.get(name)
            if owner is None:
                continue  # the index's shard lacks it: said as missing below
            info, start = self._info[name], self._start[name]
            for file, other, at in copies:
                same = other == info
                done = 0
                while same and done < info.nbytes:
                    size = min(chunk, info.nbytes - done)
                    same = os.pread(self._fds[owner], size, start + done) == os.pread(self._fds[file], size, at + done)
                    done += size
                if not same:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is stored in two shards with different values: {owner.name} "
                        f"(where the index puts it) and {file.name}; transformers loads every tensor of every shard, "
                        "so which copy a loaded model holds depends on the order it reads them",
                        hint=f"remove the stray copy from {file.name} (or fix the index): the model's files disagree "
                             "with each other")

    def names(self) -> list[str]:
        return list(self._info)

    def first_file_names(self) -> list[str]:
        """The tensors of the first weights file (by name: the shard transformers opens first), sorted as
        safetensors lists them: where transformers finds the dtype it loads a model in when none is asked for."""
        first = self._files[0] if self._files else None
        return sorted(name for name, file in self._where.items() if file == first)

    def info(self, name: str) -> TensorInfo:
        return self._info[name]

    def location(self, name: str) -> str:
        return str(self._where.get(name, self.path))

    def _span(self, name: str, rows: slice | None) -> tuple[list[int], int, int]:
        """(shape, file offset, bytes) of ``rows`` of tensor ``name``."""
        info = self._info[name]
        shape = list(info.shape)
        row_bytes = info.itemsize * (info.numel // shape[0] if shape and shape[0] else 0)
        offset = self._start[name]
        if rows is not None and shape:
            first, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError("row slices must be contiguous")
            shape[0] = max(0, stop - first)
            offset += first * row_bytes
        return shape, offset, info.itemsize * math.prod(shape)

    def _pread(self, name: str, offset: int, view: memoryview) -> None:
        done, nbytes = 0, len(view)
        try:
            while done < nbytes:  # pread may return less than asked (2 GiB cap, signals)
                got = os.preadv(self._fds[self._where[name]], [view[done:]], offset + done)
                if got == 0:
                    raise OSError(f"unexpected end of file after {done} of {nbytes} bytes")
                done += got
        except OSError as exc:
            if is_out_of_memory(exc):  # the kernel had no memory for the read: not the file's fault (hp40b C60)
                raise _no_memory(self.location(name), "read", name, exc) from None
            raise CheckpointError(f"{self.location(name)}: cannot read tensor {name!r} ({exc})",
                                  hint="the file changed or was truncated while tiesmerge read it") from None

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """``rows`` of ``name`` as a torch tensor in its stored dtype (imports torch)."""
        import torch

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

    def map_rows(self, name: str, rows: slice | None, *, populate: bool = True) -> np.ndarray:
        """``rows`` of ``name`` as stored, mapped from the file, not copied: a uint8 array over
        the page cache. The mapping lives as long as the array (and views of it) do; the
        engine drops it after the chunk, so mapped pages never pile up in RSS."""
        _, offset, nbytes = self._span(name, rows)
        if not nbytes:
            return np.empty(0, np.uint8)
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        try:
            # private and writable (copy-on-write, never written): numpy and torch see an
            # ordinary array, while the pages stay the page cache's until someone writes
            mapping = mmap.mmap(self._fds[self._where[name]], offset + nbytes - start, flags=mmap.MAP_PRIVATE,
                                prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError) as exc:
            if is_out_of_memory(exc):  # ENOMEM: the address-space limit (ulimit -v) refused the mapping (hp40b C60)
                raise _no_memory(self.location(name), "map", name, exc) from None
            raise CheckpointError(f"{self.location(name)}: cannot map tensor {name!r} ({exc})",
                                  hint="the file changed or was truncated while tiesmerge read it") from None
        global _POPULATE
        if populate and _POPULATE is not None:
            try:
                mapping.madvise(_POPULATE)  # fault the pages in now, on the reading thread
            except OSError:  # an older kernel: the kernels fault them in as they read
                _POPULATE = None
        return np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset - start)

    def files(self) -> list[Path]:
        return list(self._files)

    def directory(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    def shards_left_out(self) -> list[str]:
        """The ``*.safetensors`` files in a sharded model's folder that its index never names: a tensor missing from
        the merge may sit there (hp47 c54: blamed on the architecture). Names only; nothing is opened."""
        folder = self.directory()
        if folder is None or len(self._files) < 1 or not (folder / "model.safetensors.index.json").exists():
            return []
        listed = {f.name for f in self._files}
        try:
            with os.scandir(folder) as entries:
                return sorted(e.name for e in entries
                              if e.name.endswith(".safetensors") and e.name not in listed)[:1000]
        except OSError:
            return []

    def mappable(self, name: str) -> bool:
        """Whether ``name`` may be read through a file mapping: its file is leased (leases.py), so it cannot be
        truncated under the mapping (a lost page would be a SIGBUS, no error); else it is read with pread."""
        return self._where[name] in self._leased

    def close(self) -> None:
        for fd in self._fds.values():
            leases.release(fd)
            os.close(fd)
        self._fds.clear()
        self._leased.clear()


def _foreign_format(fd: int) -> tuple[str, str] | None:
    """(format, hint) of a file whose first bytes are another weights format's magic (a file renamed by mistake), or
    None."""
    try:
        head = os.pread(fd, 4, 0)
    except OSError:
        return None
    from ..limits import weights_magic

    magic = weights_magic(head)
    if magic == "gguf":
        return "GGUF (llama.cpp's format)", GGUF_HINT
    if magic == "zip":  # torch.save's zip archive: a pickle, never opened by default
        return ("a PyTorch checkpoint (torch.save's zip archive, a pickle)",
                "name it .bin or .pt and pass --allow-pickle (allow_pickle=True) to load it with weights_only=True, "
                "or convert it to safetensors")
    return None


def _metadata_hint(fd: int) -> str | None:
    """Why a complete file was refused, where the cause is its ``__metadata__`` (safetensors allows only string
    values there; a writer that puts numbers in it makes files no safetensors loader reads), else None."""
    try:
        size = os.fstat(fd).st_size
        header_len = struct.unpack("<Q", os.pread(fd, 8, 0))[0]
        if header_len > min(size - 8, 100 * 2**20):
            return None  # truncated, or a claim no real header makes: the generic hint holds
        metadata = json.loads(os.pread(fd, header_len, 8)).get("__metadata__")
    except (OSError, ValueError, AttributeError, struct.error, RecursionError):
        return None
    if metadata is None:
        return None
    odd = [key for key, value in metadata.items() if not isinstance(value, str)] if isinstance(metadata, dict) else []
    if isinstance(metadata, dict) and not odd:
        return None
    what = f"non-string value(s) ({', '.join(map(repr, odd[:3]))})" if odd else "something other than a JSON object"
    return (f"the file looks complete, but its __metadata__ holds {what}, which safetensors does not allow; re-save "
            "it with metadata={name: str(value)} (or no metadata)")


def _no_memory(where: str, verb: str, name: str, exc: OSError) -> OutOfMemoryError:
    """ENOMEM while reading a tensor: memory (or the address space ``ulimit -v`` allows) ran out; the file
    is fine, so the hint says what needs less memory, not that the file changed (hp40b C60)."""
    return OutOfMemoryError(f"{where}: ran out of memory to {verb} tensor {name!r} ({exc.strerror or exc})",
                            hint=memory_hint())  # the API's entry points name the budget in use
