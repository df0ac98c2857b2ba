"""The model card (README.md with YAML front matter) and the tiesmerge.json manifest."""

from __future__ import annotations

import hashlib
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


def hash_files(paths: Iterable[Path], pool: ThreadPoolExecutor) -> list[Future]:
    """Start hashing every input file on ``pool``, beside the merge."""
    return [pool.submit(_sha256, p) for p in paths]


def model_card(*, base_label: str, model_labels: list[str], recipe_yaml: str, method_name: str, paper: str,
               summary: str, version: str) -> str:
    front = yaml.safe_dump({"base_model": base_label, "tags": ["merge", "tiesmerge", method_name],
                            "library_name": "transformers"}, sort_keys=False)
    models = "\n".join(f"- `{m}`" for m in model_labels)
    return f"""---
{front}---
# Merged model

Made with [tiesmerge](https://pypi.org/project/tiesmerge/) {version} using **{method_name}** ({summary};
paper: {paper}).

Base model: `{base_label}`

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
