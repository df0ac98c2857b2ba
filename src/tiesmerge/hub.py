"""Models by name: ``org/name`` or ``org/name@revision`` resolved from the local Hugging Face cache.

Never a network call: the cache's own layout is read (no huggingface_hub import, nothing that
could download). The cache is ``$HF_HUB_CACHE``, else ``$HUGGINGFACE_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; a repository lives in
``models--org--name`` with ``refs/<branch or tag>`` (a file holding a commit hash) and
``snapshots/<commit>/`` (files that link into ``blobs/``; tiesmerge.paths lets a snapshot's
files resolve there). The revision is a branch or tag (default ``main``), or a commit hash or
a prefix of at least 7 of its hex digits that names one snapshot.

A local path of the same name always wins: ``./org/name`` existing beside you is read as a
directory, never looked up in the cache.

>>> split_repo_id("org/name@v1.0")
('org', 'name', 'v1.0')
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

from .errors import CheckpointError, MergeWarning
from .paths import inside, read_regular

__all__ = ["HubPath", "hub_cache", "split_repo_id", "resolve_repo", "resolve_source"]

_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"  # the Hub's names: no "..", no leading "-"
_REPO = re.compile(rf"^({_PART})/({_PART})(?:@([A-Za-z0-9._/-]{{1,200}}))?$")
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")


class HubPath(str):
    """A snapshot folder of the cache (the string is its path), remembering the id it was named by."""

    repo_id: str
    revision: str | None
    commit: str

    def __new__(cls, path: str, repo_id: str, revision: str | None, commit: str) -> HubPath:
        self = super().__new__(cls, path)
        self.repo_id, self.revision, self.commit = repo_id, revision, commit
        return self

    @property
    def label(self) -> str:
        """How the model is named in labels, manifests and the card: ``org/name`` or ``org/name@rev``."""
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def hub_cache() -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.path.expanduser(os.environ[var]))
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(os.path.expanduser(home)) / "hub"


def split_repo_id(text: str) -> tuple[str, str, str | None] | None:
    """(org, name, revision or None) when ``text`` is written as a repo id, else None.

    A repo id whose revision could walk out of the cache (``org/name@../..``, ``org/name@/etc``)
    is an error naming the revision, not a path: read as a path, ``org/n@../../..`` would be the
    working folder itself, and the user would be told about the output instead of the model."""
    match = _REPO.match(text)
    if match is None:
        empty = _REPO.match(text[:-1]) if text.endswith("@") else None
        if empty is not None and empty.group(3) is None:  # "org/name@": an '@' with nothing after it
            raise CheckpointError(f"{text}: no revision after '@'",
                                  hint=f"name a branch, tag or commit ({text}main), or leave the '@' out")
        return None
    revision = match.group(3)
    # git's rules for ref names (git check-ref-format): no component is empty or starts with ".", none holds ".."
    if revision is not None and (".." in revision or any(not c or c.startswith(".") for c in revision.split("/"))):
        raise CheckpointError(f"{text}: {revision!r} is not a revision (a branch, tag or commit hash "
                              "holds no '..', no part starting with '.', no leading or trailing '/', and no '//')",
                              hint=f"name a branch, tag or commit of {match.group(1)}/{match.group(2)}, "
                                   "or give the model's local folder")
    return match.group(1), match.group(2), revision


def _fetch_hint(repo_id: str, revision: str | None) -> str:
    command = f"hf download {repo_id} --revision {revision}" if revision else f"hf download {repo_id}"
    return (f"fetch it once with network: {command} (or huggingface-cli download), or point "
            "HF_HUB_CACHE / HF_HOME at the cache that holds it; tiesmerge itself never downloads")


def resolve_repo(repo_id: str, revision: str | None = None, cache: Path | None = None) -> HubPath:
    """The snapshot folder of ``repo_id`` at ``revision`` in the cache, or a typed error naming the
    cache path and the command that fetches it."""
    cache = cache or hub_cache()
    org, name = repo_id.split("/")
    repo = _repo_dir(cache, org, name)
    wanted = revision or "main"
    if not repo.is_dir():
        raise CheckpointError(f"{repo_id}: not a local path, and the Hugging Face cache {cache} does not hold it "
                              f"(no {repo.name})", hint=_fetch_hint(repo_id, revision))
    snapshots = repo / "snapshots"
    commit = None
    ref = repo / "refs" / wanted
    if os.path.lexists(ref):  # a FIFO or folder there is named by read_regular, not taken for a missing ref
        # a ref linked out of the repository folder (to a token file, say) is refused before it is read
        inside(ref, repo, f"the cache's ref {wanted} of {repo_id}")
        raw = read_regular(ref, f"the cache's ref {wanted} of {repo_id}", max_bytes=256)
        commit = raw.decode("ascii", "replace").strip()
        if not re.fullmatch(r"[0-9a-f]{40}", commit):  # its content is not shown: it may be anything
            raise CheckpointError(f"{ref}: holds {len(raw)} bytes that are not a commit hash (40 hex digits)",
                                  hint="the cache is damaged; " + _fetch_hint(repo_id, revision))
    elif _COMMIT.match(wanted):
        found = sorted(p.name for p in snapshots.iterdir() if p.name.startswith(wanted)) if snapshots.is_dir() else []
        if len(found) > 1:
            shown = _distinct_prefixes(found[:10])
            raise CheckpointError(f"{repo_id}@{wanted}: the commit prefix names {len(found)} snapshots in {snapshots} "
                                  f"({', '.join(shown)}{', ...' if len(found) > 10 else ''})",
                                  hint="give more digits of the commit: as many as shown above tell them apart")
        commit = found[0] if found else None
    if commit is not None and os.path.lexists(snapshots / commit) and not (snapshots / commit).is_dir():
        what = "a dangling link" if os.path.islink(snapshots / commit) and not os.path.exists(snapshots / commit) \
            else "not a folder"
        raise CheckpointError(f"{repo_id}@{wanted}: the cache's snapshot {commit[:12]} of {repo_id} "
                              f"({snapshots / commit}) is {what}: the cache is damaged",
                              hint=_fetch_hint(repo_id, revision))
    if commit is None or not (snapshots / commit).is_dir():
        have = sorted(p.name for p in (repo / "refs").iterdir()) if (repo / "refs").is_dir() else []
        snaps = sorted(p.name[:12] for p in snapshots.iterdir()) if snapshots.is_dir() else []
        if re.fullmatch(r"[0-9a-f]{1,6}", wanted) and any(s.startswith(wanted) for s in snaps):
            raise CheckpointError(f"{repo_id}@{wanted}: a commit prefix needs at least 7 hex digits (as git's short "
                                  f"hashes); snapshot {next(s for s in snaps if s.startswith(wanted))} starts with it",
                                  hint="give 7 or more digits of the commit")
        raise CheckpointError(
            f"{repo_id}@{wanted}: the Hugging Face cache {cache} holds {repo.name} but not this revision "
            f"(refs: {', '.join(have) or 'none'}; snapshots: {', '.join(snaps) or 'none'})",
            hint=_fetch_hint(repo_id, revision))
    # the snapshot folder itself must lie in the cache's repository folder: a snapshot that is a link
    # to ~/elsewhere would make a repo id read whatever folder it names (its files are checked apart)
    inside(snapshots / commit, repo, f"the snapshot {commit[:12]} of {repo_id}")
    return HubPath(str(snapshots / commit), repo_id, revision, commit)


def resolve_source(source: Any) -> Any:
    """``source`` itself, unless it is a string written as a repo id that is not a local path:
    then its snapshot in the cache (a :class:`HubPath`)."""
    if not isinstance(source, str) or isinstance(source, HubPath):
        return source
    if os.path.lexists(source):
        _note_shadowed(source)
        return source
    parts = split_repo_id(source)
    if parts is None:
        return source
    org, name, revision = parts
    # "rdir/base" where a folder rdir exists here and no such repo is cached: a path that is missing, no repo id
    if os.path.isdir(org) and not _repo_dir(hub_cache(), org, name).is_dir():
        raise CheckpointError(f"{source}: no such file or directory (the folder {org} exists here, but holds no "
                              f"{name}; and no Hugging Face repo {org}/{name} is cached)",
                              hint="check the path (paths in a tiesmerge recipe are relative to the recipe's folder)")
    return resolve_repo(f"{org}/{name}", revision)


def _note_shadowed(source: str) -> None:
    """A local path written like a repo id (``org/name``) wins over the cached repository of that name: say so
    when both exist, so nobody merges the folder believing they merged the repository."""
    try:
        parts = split_repo_id(source)
    except CheckpointError:
        return  # "org/name@.." is a local path here, never a revision: nothing is shadowed
    if parts is None or not _repo_dir(hub_cache(), parts[0], parts[1]).is_dir():
        return
    warnings.warn(MergeWarning(f"{source} is read from the local folder of that name, not from the Hugging Face "
                               f"cache's repository {parts[0]}/{parts[1]} (a local path wins; write ./{source} to "
                               "say it is a path, or move the folder to read the repository)"), stacklevel=3)


def _repo_dir(cache: Path, org: str, name: str) -> Path:
    """A repository's folder in the Hugging Face cache (which may not exist)."""
    return cache / f"models--{org}--{name}"


def _distinct_prefixes(names: list[str]) -> list[str]:
    """``names`` (sorted) cut to the shortest common length, at least 12, that still tells each apart."""
    def shared(a: str, b: str) -> int:
        return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))

    width = max([12, *(shared(a, b) + 1 for a, b in zip(names, names[1:]))])
    return [n[:width] for n in names]
