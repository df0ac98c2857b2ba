"""Read objects out of an R package's lazy-load database (``data/Rdata.rdb`` + ``.rdx``).

Installed R packages keep their data sets not as ``.rda`` files but in a lazy-load DB:

* ``Rdata.rdx`` is an ordinary RDS file (gzip, XDR) holding a named list with
  ``variables`` (name -> integer ``c(offset, length)`` into the ``.rdb``),
  ``references`` (environments; unused by plain data frames) and ``compressed``
  (``TRUE``/1 = zlib, 2 = bzip2, 3 = xz).
* ``Rdata.rdb`` is the concatenation of the compressed blobs. Each blob starts with the
  uncompressed length as a 4-byte big-endian integer. For zlib the compressed stream
  follows directly; for types 2 and 3 one byte says how the rest is stored
  (``'Z'`` raw LZMA2 as R's ``R_compress3`` writes it, ``'2'`` bzip2, ``'1'`` zlib,
  ``'0'`` stored) because R falls back when compressing does not help.
* The decompressed bytes are an R serialization stream (``X\\n`` + XDR), i.e. an RDS
  file without its outer compression, which ``rdata`` parses.

``rdata`` is imported lazily so the rest of the data layer works without it.
"""

from __future__ import annotations

import bz2
import lzma
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .types import DataSourceError

__all__ = ["LazyLoadIndex", "decode_lazyload_blob", "parse_r_serialized", "read_lazyload_index", "read_lazyload_object"]

_INSTALL_HINT = "install the benchmark extras: pip install 'tiesmerge[bench]' (needs rdata>=0.11)"

# R_compress3 uses xz preset 6 | EXTREME with a raw LZMA2 filter (no .xz container);
# the decoder only needs the dictionary size, which the preset fixes.
_R_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6 | lzma.PRESET_EXTREME}]


@dataclass(frozen=True)
class LazyLoadIndex:
    """The parsed ``.rdx`` of a lazy-load DB."""

    variables: dict[str, tuple[int, int]]
    compression: int


def _rdata() -> Any:
    try:
        import rdata
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataSourceError("reading R data needs the 'rdata' package", hint=_INSTALL_HINT) from exc
    return rdata


def decode_lazyload_blob(blob: bytes, compression: int, *, where: str = "<blob>") -> bytes:
    """Decompress one ``.rdb`` entry written with ``compress = compression``; checks the length."""
    if compression == 0:
        return bytes(blob)
    if len(blob) < 5:
        raise DataSourceError(f"{where}: lazy-load entry is only {len(blob)} bytes; the .rdb looks truncated")
    (expected,) = struct.unpack(">I", blob[:4])
    try:
        if compression == 1:
            out = zlib.decompress(blob[4:])
        elif compression in (2, 3):
            kind, payload = blob[4:5], blob[5:]
            if kind == b"Z":
                out = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_R_LZMA_FILTERS).decompress(payload)
            elif kind == b"2":
                out = bz2.decompress(payload)
            elif kind == b"1":
                out = zlib.decompress(payload)
            elif kind == b"0":
                out = bytes(payload)
            else:
                raise DataSourceError(
                    f"{where}: unknown lazy-load compression byte {kind!r}",
                    hint="the R package format changed; update tiesmerge_bench.rlazyload",
                )
        else:
            raise DataSourceError(f"{where}: unknown lazy-load compression type {compression}")
    except (zlib.error, lzma.LZMAError, OSError, ValueError) as exc:
        if isinstance(exc, DataSourceError):
            raise
        raise DataSourceError(f"{where}: cannot decompress lazy-load entry ({exc})") from exc
    if len(out) != expected:
        raise DataSourceError(f"{where}: entry decompressed to {len(out)} bytes, header says {expected}")
    return out


def _constructor_map(rdata: Any) -> dict[str, Any]:
    # Tibbles are data frames with extra class tags; without these entries rdata warns
    # and falls back to data.frame anyway. Saying so explicitly keeps the output quiet.
    base = dict(rdata.conversion.DEFAULT_CLASS_MAP)
    frame = base["data.frame"]
    base.setdefault("tbl_df", frame)
    base.setdefault("tbl", frame)
    return base


def parse_r_serialized(data: bytes, *, where: str = "<bytes>") -> Any:
    """Convert an uncompressed R serialization stream (RDS payload) to Python objects via rdata."""
    rdata = _rdata()
    try:
        parsed = rdata.parser.parse_data(data, extension=".rds")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return rdata.conversion.convert(parsed, constructor_dict=_constructor_map(rdata))
    except Exception as exc:  # rdata raises many kinds; all mean "cannot read this object"
        raise DataSourceError(f"{where}: rdata cannot parse the R object ({type(exc).__name__}: {exc})") from exc


def _scalar_int(value: Any) -> int:
    # rdata gives R vectors as numpy arrays (``compressed`` is TRUE or 3 as a length-1 vector).
    flat = np.asarray(value).ravel()
    if flat.size != 1:
        raise ValueError(f"expected one value, got {flat.size}")
    return int(flat[0])


def read_lazyload_index(rdx_path: str | Path) -> LazyLoadIndex:
    """Parse a ``.rdx`` file into variable offsets and the compression type."""
    rdx_path = Path(rdx_path)
    if not rdx_path.is_file():
        raise DataSourceError(f"{rdx_path}: lazy-load index not found", hint="the R package layout changed?")
    rdata = _rdata()
    try:
        index = rdata.read_rds(rdx_path)
    except Exception as exc:
        raise DataSourceError(f"{rdx_path}: cannot read lazy-load index ({type(exc).__name__}: {exc})") from exc
    if not isinstance(index, dict) or "variables" not in index or "compressed" not in index:
        raise DataSourceError(f"{rdx_path}: not a lazy-load index (no 'variables'/'compressed' entries)")
    variables: dict[str, tuple[int, int]] = {}
    for name, span in index["variables"].items():
        flat = [int(v) for v in np.asarray(span).ravel()]
        if len(flat) != 2:
            raise DataSourceError(f"{rdx_path}: variable {name!r} has span {flat}, expected (offset, length)")
        variables[str(name)] = (flat[0], flat[1])
    try:
        compression = _scalar_int(index["compressed"])
    except (TypeError, ValueError) as exc:
        raise DataSourceError(f"{rdx_path}: unreadable 'compressed' entry ({exc})") from exc
    return LazyLoadIndex(variables=variables, compression=compression)


def read_lazyload_object(rdx_path: str | Path, name: str) -> Any:
    """Load the object ``name`` from the lazy-load DB whose index is ``rdx_path`` (``.rdb`` beside it)."""
    rdx_path = Path(rdx_path)
    rdb_path = rdx_path.with_suffix(".rdb")
    index = read_lazyload_index(rdx_path)
    if name not in index.variables:
        known = ", ".join(sorted(index.variables)) or "(none)"
        raise DataSourceError(f"{rdx_path}: no object {name!r} in the lazy-load DB; it has: {known}")
    offset, length = index.variables[name]
    try:
        with open(rdb_path, "rb") as f:
            f.seek(offset)
            blob = f.read(length)
    except OSError as exc:
        raise DataSourceError(f"{rdb_path}: cannot read lazy-load data ({exc})") from exc
    if len(blob) != length:
        raise DataSourceError(f"{rdb_path}: wanted {length} bytes at {offset}, got {len(blob)}; file truncated?")
    where = f"{rdb_path}[{name}]"
    return parse_r_serialized(decode_lazyload_blob(blob, index.compression, where=where), where=where)
