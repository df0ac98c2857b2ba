"""tiesmerge_bench.fetch: packages fetched once with their clients, unpacked, cached, verified."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers_bench import write_script, write_tgz
from tiesmerge_bench import DataSourceError, SourceSpec, default_cache_dir, ensure_source, load_suite


def test_apt_flow_with_fake_clients(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Fake apt-get writes a "deb" (a tarball here) into its cwd; fake dpkg-deb -x untars it.
    fixture = tmp_path / "fixture.tar.gz"
    topics = {"computers": "Bugs.\n%\nMore bugs.\n", "law": "Sue them.\n%\n", "work": "Work.\n%\nMore work.\n"}
    topics |= {t: f"{t} entry\n" for t in ("definitions", "men-women", "politics", "science", "songs-poems")}
    write_tgz(fixture, {f"usr/share/games/fortunes/{name}": text for name, text in topics.items()})
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    write_script(bin_dir / "apt-get", f'echo "apt-get $*" >> {log}\ncp {fixture} "./$2_9.9_all.deb"\n')
    write_script(bin_dir / "dpkg-deb", f'echo "dpkg-deb $*" >> {log}\ntar -xzf "$2" -C "$3"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    cache = tmp_path / "cache"

    first = load_suite(["fortune"], cache_dir=cache, sizes=(6, 2, 2))["fortune"]
    assert first.pool_size == 10 and len(first.train) == 6
    assert (cache / "downloads" / "fortunes_9.9_all.deb").is_file()
    again = load_suite(["fortune"], cache_dir=cache, sizes=(6, 2, 2))["fortune"]
    assert again == first
    calls = log.read_text().splitlines()
    assert len(calls) == 2  # fetched and unpacked once, then served from the cache
    assert calls[0] == "apt-get download fortunes" and calls[1].startswith("dpkg-deb -x ")


def test_missing_client_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tiesmerge_bench.fetch.shutil.which", lambda name: None)
    with pytest.raises(DataSourceError, match="apt-get not found") as info:
        ensure_source(SourceSpec("apt", "wordnet-base"), tmp_path)
    assert "downloads" in str(info.value)


def test_default_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIESMERGE_BENCH_DATA", str(tmp_path / "data"))
    assert default_cache_dir() == tmp_path / "data"
    monkeypatch.delenv("TIESMERGE_BENCH_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "tiesmerge" / "bench-data"
