"""The model card (README.md with YAML front matter) and the tiesmerge.json manifest."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import tempfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from ..errors import MergeWarning
from ..paths import undecodable_as_bytes

__all__ = ["model_card", "hash_files"]


def _sha256(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)  # hashlib releases the GIL on large blocks
    return {"path": str(path), "sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _cache_file() -> Path | None:
    """Where file digests are remembered (see :func:`cache_folder`), or None when TIESMERGE_DIGEST_CACHE=0."""
    if not caches_enabled():
        return None
    folder = cache_folder()
    return folder / "digests.json" if folder is not None else None


_OFF, _ON = ("0", "false", "no", "off"), ("1", "true", "yes", "on", "")


def caches_enabled() -> bool:
    """TIESMERGE_DIGEST_CACHE: 0 (false, no, off) writes no cache file (digests, the numerics verdict); 1 (the
    default; true, yes, on) does. Another value is said once and read as off, the side that writes nothing."""
    value = os.environ.get("TIESMERGE_DIGEST_CACHE", "1").strip().lower()
    if value in _ON:
        return True
    if value not in _OFF and not _SAID_ODD:
        _SAID_ODD.append(value)
        warnings.warn(MergeWarning(f"TIESMERGE_DIGEST_CACHE={value!r} is neither 0 nor 1: read as 0 (no cache files "
                                   "written)"), stacklevel=3)
    return False


_SAID_ODD: list[str] = []


def cache_folder() -> Path | None:
    """tiesmerge's cache folder: ``$TIESMERGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/tiesmerge``, else
    ``~/.cache/tiesmerge``; None without a usable home (HOME=/nonexistent: no cache, no folders)."""
    chosen = os.environ.get("TIESMERGE_CACHE_DIR", "")
    if os.path.isabs(chosen):
        return Path(chosen)
    if chosen:  # relative: it would put a cache folder in whatever folder the command runs from
        # Python's warning filter shows it once per place, and the CLI prints each warning once
        warnings.warn(f"TIESMERGE_CACHE_DIR={chosen!r} is not an absolute path: ignored (file digests are remembered "
                      "in the default cache folder; give an absolute path to move it)", MergeWarning, stacklevel=2)
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):  # the XDG spec: a relative path is invalid and ignored (it would write into the cwd)
        return Path(xdg) / "tiesmerge"
    home = os.path.expanduser("~")
    if not os.path.isabs(home) or not os.path.isdir(home):
        return None
    return Path(home) / ".cache" / "tiesmerge"


_MAX_CACHE_BYTES = 16 << 20  # a larger file is no cache of tiesmerge's (its writer trims): no cache costs more
# than hashing
_MAX_ENTRIES = 20_000  # remembered files kept, the most recent: a cache file stays ~4 MB, parsed in ~40 ms
# a cache file's path -> (its identity when parsed, its entries; None: a file that is not one of tiesmerge's caches)
_PARSED: dict[str, tuple[tuple[int, ...], dict | None]] = {}
_PARSED_LOCK = threading.Lock()


def _stamp(path: Path) -> list[int]:
    """What must not change for a remembered digest to hold: device, inode, size, mtime, ctime."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def load_cache(file: Path) -> dict:
    """The remembered digests, or {} when the cache is missing, damaged, too large, or not a regular
    file: a link (never followed) or a FIFO (opened non-blocking, refused by fstat) is ignored."""
    return _read_cache(file) or {}


def _read_cache(file: Path) -> dict | None:
    """The cache file's entries; {} where nothing of tiesmerge's lies there (no file, an empty one, a link or a FIFO:
    replaced when written, never followed); None where a regular file there is not one of its caches (larger than
    any it writes, unreadable, or not a JSON object: tiesmerge writes its caches whole, by rename, so a file of its
    own is never half written), which is left alone."""
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        return {} if exc.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR) else None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size == 0:
            return {}
        if st.st_size > _MAX_CACHE_BYTES:  # one of ours from before this bound (its writer now trims): begun afresh
            return {} if _looks_like_a_cache(os.pread(fd, 4096, 0)) else None
        # parsed once while the file is the same: every input file asks (a cache of 10^5 entries re-parsed for each
        # of 42 shards took a minute); the entries returned are shared, read them only (remember() copies)
        identity = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        with _PARSED_LOCK:
            known = _PARSED.get(str(file))
        if known is not None and known[0] == identity:
            return known[1]
        try:
            data = json.loads(os.pread(fd, st.st_size, 0))
        except (ValueError, RecursionError):
            data = None
        data = data if isinstance(data, dict) else None
        with _PARSED_LOCK:
            _PARSED[str(file)] = (identity, data)
        return data
    except OSError:
        return None
    finally:
        os.close(fd)


def _looks_like_a_cache(head: bytes) -> bool:
    """The first bytes of a digest cache tiesmerge wrote: a JSON object keyed by absolute paths, of stamps and
    digests (hostile pass 26, N7: a cache grown past the size bound was taken for a file of the user's, for good)."""
    return head.startswith(b'{"/') and b'"stamp": [' in head and b'"sha256": "' in head


def _cache_dir(cache: Path) -> bool:
    """Create the cache's folder; whether it is a real directory (a link there is never written through)."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        return stat.S_ISDIR(os.lstat(cache.parent).st_mode)
    except OSError:
        return False


# folders the digest cache must not be written into while a merge runs: its inputs and its output
# (a TIESMERGE_CACHE_DIR or XDG_CACHE_HOME pointed into one of them would change an input, or leave a
# file at the output). Hashing runs on a worker thread, so this is shared, not a context variable.
_KEPT_OUT: list[Path] = []


@contextmanager
def digest_cache_kept_out_of(paths: Iterable[str | os.PathLike]) -> Iterator[None]:
    """While inside, no digest is remembered where the cache file would lie in one of ``paths``."""
    roots = [Path(os.path.realpath(p)) for p in paths]
    _KEPT_OUT.extend(roots)
    try:
        yield
    finally:
        for root in roots:
            _KEPT_OUT.remove(root)


def kept_out(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` (links resolved) is or lies inside a path the running command reads or writes
    (:func:`digest_cache_kept_out_of`): no cache of tiesmerge's may be written there."""
    from ..paths import identities, identity

    real = Path(os.path.realpath(folder))
    roots = list(_KEPT_OUT)
    if any(real == root or root in real.parents for root in roots):
        return True
    chain = identities(real)  # the same folder reached another way (a second mount of an input)
    return any(identity(root) in chain for root in roots)


# digests worked out by this process, written to the cache in one go (flush_digests): one write per input file
# rewrote the whole cache each time (84 shards hashed: 6 s of rewriting a 20,000-entry cache)
_PENDING: dict[Path, dict[str, Any]] = {}
_PENDING_LOCK = threading.Lock()


def _remember(cache: Path, key: str, stamp: list[int], sha256: str) -> None:
    """Note one digest, to be written by :func:`flush_digests`."""
    with _PENDING_LOCK:
        _PENDING.setdefault(cache, {})[key] = {"stamp": stamp, "sha256": sha256}


def flush_digests() -> None:
    """Write the digests worked out since the last flush to their cache (where allowed: :func:`remember`)."""
    with _PENDING_LOCK:
        pending = dict(_PENDING)
        _PENDING.clear()
    for cache, items in pending.items():
        remember_many(cache, items)


def remember(cache: Path, key: str, value: Any) -> None:
    """Add one entry to the JSON cache file ``cache`` (:func:`remember_many`)."""
    remember_many(cache, {key: value})


def remember_many(cache: Path, items: dict[str, Any]) -> None:
    """Add entries to the JSON cache file ``cache``: the whole file is written to a fresh temporary
    file in the cache's own folder and renamed over the old one (a link or FIFO at the cache's path is
    replaced, never followed), so readers see the old or the new file, never half of one. Nothing is
    written where the folder lies in an input or the output of the running merge (:func:`kept_out`)."""
    if kept_out(cache.parent):
        return  # working it out again next time costs less than writing into an input or the output
    if not _cache_dir(cache):
        return
    entries = _read_cache(cache)
    if entries is None:  # a file of the user's at that name (a cache folder named by mistake): never replaced
        if str(cache) not in _SAID_FOREIGN:
            _SAID_FOREIGN.append(str(cache))
            warnings.warn(MergeWarning(f"{cache} is not a cache file tiesmerge wrote (not a JSON object of its "
                                       f"entries, or larger than the {_MAX_CACHE_BYTES >> 20} MiB it writes at most): "
                                       "left as it is, and nothing is remembered there (TIESMERGE_CACHE_DIR names "
                                       "tiesmerge's own cache folder)"), stacklevel=3)
        return
    entries = dict(entries)  # the parsed entries are shared (load_cache): changed on a copy
    for key, value in items.items():
        entries.pop(key, None)  # re-added last: the most recent entries are the ones kept
        entries[key] = value
    for old in list(entries)[:max(0, len(entries) - _MAX_ENTRIES)]:
        del entries[old]
    text = json.dumps(entries)
    while len(text) > _MAX_CACHE_BYTES and entries:  # long paths: the oldest go, so the file is never one it refuses
        for old in list(entries)[:max(1, len(entries) // 10)]:
            del entries[old]
        text = json.dumps(entries)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{cache.name}.", suffix=".tmp", dir=cache.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, cache)
        st = os.lstat(cache)  # what was just written is what the next lookup reads: not parsed again
        with _PARSED_LOCK:
            _PARSED[str(cache)] = ((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns), entries)
    except OSError:  # a full or read-only cache folder only costs hashing again next time
        if os.path.lexists(tmp):
            os.unlink(tmp)


_SAID_FOREIGN: list[str] = []


def _digest(path: Path) -> dict:
    """The file's sha256, remembered by (device, inode, size, mtime, ctime) like git's index:
    merging the same inputs again (tuning, recipe edits) does not hash gigabytes again."""
    cache = _cache_file()
    if cache is None:
        return _sha256(path)
    key = str(path.resolve())
    stamp = _stamp(path)
    known = load_cache(cache).get(key)
    if isinstance(known, dict) and known.get("stamp") == stamp and _is_sha256(known.get("sha256")):
        return {"path": str(path), "sha256": known["sha256"], "bytes": stamp[2], "remembered": True}
    result = _sha256(path)
    if _stamp(path) == stamp:  # unchanged while hashed: safe to remember
        _remember(cache, key, stamp, result["sha256"])
    return result


def _is_sha256(value: object) -> bool:
    """A sha256 as hashlib writes it (64 lowercase hex digits): a cache entry edited to "" or to markup would be
    recorded in the manifest and the card as the file's digest (hp56 c83); anything else is hashed again."""
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def hash_files(paths: Iterable[Path], pool: ThreadPoolExecutor) -> list[Future]:
    """Start hashing every input file on ``pool``, beside the merge."""
    return [pool.submit(_digest, p) for p in paths]


def _code(text: str) -> str:
    """``text`` as a Markdown code span that no backtick, newline or HTML inside it can end early (a path is a
    stranger's text: "x`<img onerror=...>`" would otherwise be raw HTML in the card)."""
    text = undecodable_as_bytes(str(text)).replace("\r", "\\r").replace("\n", "\\n")
    ticks = "`" * (max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _twin_note(label: str, labels: list[str]) -> str:
    """The code points of a label printed like another one (another Unicode normalization, an invisible character:
    hp76a c23, two folders 'café' listed alike), so a reader can tell the two inputs apart."""
    from ..unicode_names import code_points, look_alike_twin

    return f" ({code_points(label)})" if look_alike_twin(label, labels) is not None else ""


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in ``text``."""
    return "`" * max(3, max((len(r) for r in re.findall(r"`+", text)), default=0) + 1)


def _rerun(method_name: str, in_memory: Sequence[str] = ()) -> str:
    """How the recipe below is run again. An AdaMerging merge is learned by ``tiesmerge adapt``, which no recipe
    runs: "Re-run with tiesmerge merge recipe.yaml" failed as "unknown method 'adamerging'" (hp36 C45). Inputs
    that were state dicts in memory have no path a recipe can name: said, not offered as paths (hp72a c37)."""
    if method_name == "adamerging":
        return ("Learned by `tiesmerge adapt` (the coefficients are in `adamerging_coefficients.json` beside this "
                "card). The record below is not a recipe `tiesmerge merge` runs: `tiesmerge adapt` with the same "
                "models, data and options (in `tiesmerge.json`) learns the merge again:")
    if in_memory:
        return (f"Merged from Python (`tiesmerge.merge`) with inputs held in memory ({', '.join(in_memory)}), which "
                "no file names: the record below is a recipe only once each of them is saved "
                "(`safetensors.torch.save_file`, or `tiesmerge.save_stats` for statistics) and its label is "
                "replaced by that path; then `tiesmerge merge recipe.yaml -o OUT` runs it:")
    return ("Re-run with `tiesmerge merge recipe.yaml -o OUT` (its paths are as they were typed: save it in the "
            "folder the merge ran from):")


_ADAPTER_NAMES = {"lora": "LoRA", "ia3": "(IA)³"}


def model_card(*, base_label: str, model_labels: list[str], recipe_yaml: str, method_name: str, paper: str,
               summary: str, version: str, base_revision: str | None = None, base_commit: str | None = None,
               adapter: bool | str = False, in_memory: Sequence[str] = ()) -> str:
    """``base_label``: the base's path, or its Hugging Face repo id (then ``base_revision`` as asked
    and the ``base_commit`` read from the local cache, when it was named by id). ``adapter``: the output is a merged
    PEFT adapter (``--output-format adapter``), its kind ("lora", "ia3"; True: LoRA), which PEFT loads on the base,
    not transformers alone (hp36 C57; hp57 c80: an (IA)³ one was titled and tagged LoRA). ``in_memory``: the labels
    of inputs given as state dicts or statistics in memory (no path; a base among them gets no base_model)."""
    kind = ("lora" if adapter is True else adapter) if adapter else None
    named = {} if base_label in in_memory else {"base_model": base_label}  # "base state dict" is no model id
    front = yaml.safe_dump({**named, "tags": ["merge", "tiesmerge", method_name,
                                                               *([kind] if kind else [])],
                            "library_name": "peft" if adapter else "transformers"}, sort_keys=False)
    title = f"{_ADAPTER_NAMES.get(kind, str(kind))} adapter (load it on the base with PEFT)" if kind else "model"
    at = ""
    if base_commit:
        at = f" at revision {_code(base_revision or 'main')} (commit {_code(base_commit)})"
    models = "\n".join(f"- {_code(m)}{_twin_note(str(m), [str(x) for x in (base_label, *model_labels)])}"
                       for m in model_labels)
    fence = _fence(recipe_yaml)
    return f"""---
{front}---
# Merged {title}

Made with [tiesmerge](https://pypi.org/project/tiesmerge/) {version} using **{method_name}** ({summary};
paper: {paper}).

Base model: {_code(base_label)}{at}

Models merged:
{models}

## {"How it was made" if method_name == "adamerging" else "Recipe"}

{_rerun(method_name, in_memory)}

{fence}yaml
{recipe_yaml.rstrip()}
{fence}

`tiesmerge.json` beside this card records the sha256 of every input file, the options, and the
time each phase took.
"""
