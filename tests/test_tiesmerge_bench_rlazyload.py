"""tiesmerge_bench.rlazyload: R lazy-load databases (.rdx index + .rdb blobs) read without R."""

from __future__ import annotations

import bz2
import lzma
import struct
import zlib
from pathlib import Path

import pytest

from tiesmerge_bench import (
    DataSourceError,
    decode_lazyload_blob,
    foods_examples,
    read_lazyload_index,
    read_lazyload_object,
)

PAYLOAD = b"X\n" + bytes(range(256)) * 8


def _r_blob(data: bytes, kind: bytes | None) -> bytes:
    header = struct.pack(">I", len(data))
    if kind is None:  # compress = TRUE: zlib stream straight after the length
        return header + zlib.compress(data)
    body = {
        b"Z": lambda d: lzma.compress(
            d, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2, "preset": 6 | lzma.PRESET_EXTREME}]
        ),
        b"2": bz2.compress,
        b"1": zlib.compress,
        b"0": lambda d: d,
    }[kind](data)
    return header + kind + body


@pytest.mark.parametrize(("compression", "kind"), [(1, None), (3, b"Z"), (3, b"2"), (2, b"2"), (2, b"0"), (3, b"1")])
def test_decode_lazyload_blob(compression: int, kind: bytes | None) -> None:
    assert decode_lazyload_blob(_r_blob(PAYLOAD, kind), compression) == PAYLOAD


def test_decode_lazyload_blob_errors() -> None:
    assert decode_lazyload_blob(PAYLOAD, 0) == PAYLOAD
    bad_len = struct.pack(">I", 5) + zlib.compress(PAYLOAD)
    with pytest.raises(DataSourceError, match="header says 5"):
        decode_lazyload_blob(bad_len, 1, where="x.rdb[obj]")
    with pytest.raises(DataSourceError, match="compression byte"):
        decode_lazyload_blob(struct.pack(">I", 1) + b"Q" + b"zz", 3)
    with pytest.raises(DataSourceError, match="cannot decompress"):
        decode_lazyload_blob(struct.pack(">I", 9) + b"not zlib", 1)


def _write_lazyload_db(rdata: object, folder: Path, objects: dict[str, object], compression: int) -> Path:
    """A lazy-load DB as R writes it: serialized objects, compressed, concatenated, indexed."""
    import numpy as np

    blobs: list[bytes] = []
    spans: dict[str, object] = {}
    offset = 0
    for i, (name, obj) in enumerate(objects.items()):
        rds = folder / f"obj{i}.rds"
        rdata.write_rds(rds, obj, compression=None)  # type: ignore[attr-defined]
        raw = rds.read_bytes()
        blob = _r_blob(raw, None if compression == 1 else b"Z")
        spans[name] = np.array([offset, len(blob)], dtype=np.int32)
        blobs.append(blob)
        offset += len(blob)
    (folder / "Rdata.rdb").write_bytes(b"".join(blobs))
    index = {"variables": spans, "references": {},
             "compressed": True if compression == 1 else np.array([3], dtype=np.int32)}
    rdata.write_rds(folder / "Rdata.rdx", index)  # type: ignore[attr-defined]
    return folder / "Rdata.rdx"


@pytest.mark.parametrize("compression", [1, 3])
def test_read_lazyload_object_roundtrip(tmp_path: Path, compression: int) -> None:
    rdata = pytest.importorskip("rdata")
    pd = pytest.importorskip("pandas")
    if not hasattr(rdata, "write_rds"):
        pytest.skip("this rdata cannot write the fixture (write_rds needs rdata>=0.12)")

    frame = pd.DataFrame(
        {"product": ["a", "b", "c"], "review": ["Tasty!", "Stale.", "Fine"],
         "score": pd.Categorical(["great", "other", "other"])}
    )
    rdx = _write_lazyload_db(rdata, tmp_path, {"training_data": frame, "emma": ["CHAPTER I", "Emma was here."]},
                             compression)
    index = read_lazyload_index(rdx)
    assert set(index.variables) == {"training_data", "emma"} and index.compression == compression
    assert foods_examples(read_lazyload_object(rdx, "training_data")) == [
        ("Tasty!", "great"), ("Stale.", "other"), ("Fine", "other"),
    ]  # fmt: skip
    assert list(read_lazyload_object(rdx, "emma")) == ["CHAPTER I", "Emma was here."]
    with pytest.raises(DataSourceError, match="no object 'nope'.*emma"):
        read_lazyload_object(rdx, "nope")
