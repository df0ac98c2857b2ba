"""The model card (README.md with YAML front matter) and the tiesmerge.json manifest."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import yaml

__all__ = ["model_card", "hash_files"]


def _sha256(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            digest.update(block)  # hashlib releases the GIL on large blocks
    return {"path": str(path), "sha256": digest.hexdigest(), "bytes": path.stat().st_size}


def _cache_file() -> Path | None:
    """Where file digests are remembered, or None when TIESMERGE_DIGEST_CACHE=0."""
    if os.environ.get("TIESMERGE_DIGEST_CACHE", "1") == "0":
        return None
    root = os.environ.get("TIESMERGE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tiesmerge")
    return Path(root) / "digests.json"


def _stamp(path: Path) -> list[int]:
    """What must not change for a remembered digest to hold: device, inode, size, mtime, ctime."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _load_cache(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _digest(path: Path) -> dict:
    """The file's sha256, remembered by (device, inode, size, mtime, ctime) like git's index:
    merging the same inputs again (tuning, recipe edits) does not hash gigabytes again."""
    cache = _cache_file()
    if cache is None:
        return _sha256(path)
    key = str(path.resolve())
    stamp = _stamp(path)
    known = _load_cache(cache).get(key)
    if isinstance(known, dict) and known.get("stamp") == stamp and isinstance(known.get("sha256"), str):
        return {"path": str(path), "sha256": known["sha256"], "bytes": stamp[2], "remembered": True}
    result = _sha256(path)
    if _stamp(path) == stamp:  # unchanged while hashed: safe to remember
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            entries = _load_cache(cache)
            entries[key] = {"stamp": stamp, "sha256": result["sha256"]}
            tmp = cache.with_name(f".{cache.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, cache)  # readers see the old or the new file, never half of one
        except OSError:
            pass  # a read-only cache directory only costs hashing again next time
    return result


def hash_files(paths: Iterable[Path], pool: ThreadPoolExecutor) -> list[Future]:
    """Start hashing every input file on ``pool``, beside the merge."""
    return [pool.submit(_digest, p) for p in paths]


def model_card(*, base_label: str, model_labels: list[str], recipe_yaml: str, method_name: str, paper: str,
               summary: str, version: str, base_revision: str | None = None, base_commit: str | None = None) -> str:
    """``base_label``: the base's path, or its Hugging Face repo id (then ``base_revision`` as asked
    and the ``base_commit`` read from the local cache, when it was named by id)."""
    front = yaml.safe_dump({"base_model": base_label, "tags": ["merge", "tiesmerge", method_name],
                            "library_name": "transformers"}, sort_keys=False)
    at = ""
    if base_commit:
        at = f" at revision `{base_revision or 'main'}` (commit `{base_commit}`)"
    models = "\n".join(f"- `{m}`" for m in model_labels)
    return f"""---
{front}---
# Merged model

Made with [tiesmerge](https://pypi.org/project/tiesmerge/) {version} using **{method_name}** ({summary};
paper: {paper}).

Base model: `{base_label}`{at}

Models merged:
{models}

## Recipe

Re-run with `tiesmerge merge recipe.yaml -o OUT`:

```yaml
{recipe_yaml.rstrip()}
```

`tiesmerge.json` beside this card records the sha256 of every input file, the options, and the
time each phase took.
"""
