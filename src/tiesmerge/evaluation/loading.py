"""transformers' loaders with typed errors: a model directory whose config or tokenizer files
transformers cannot make sense of is the user's input to fix, named as such, not "a bug"."""

from __future__ import annotations

import os
from typing import Any

from ..errors import CheckpointError

__all__ = ["from_pretrained"]


def from_pretrained(loader: Any, directory: str | os.PathLike, role: str = "the model", **kwargs: Any) -> Any:
    """``loader.from_pretrained(directory, **kwargs)`` (an Auto class, or a function taking a
    directory); transformers' own errors for unusable files become a CheckpointError naming them."""
    load = getattr(loader, "from_pretrained", loader)
    try:
        return load(directory, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        what = getattr(loader, "__name__", "transformers")
        first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{directory}: {what} cannot load {role} ({type(exc).__name__}: {first})",
                              hint="check its config.json and tokenizer files (a tokenizer_config.json naming a "
                                   "file that is not there, a config of another architecture)") from None
