"""transformers' loaders with typed errors: a model directory whose config or tokenizer files
transformers cannot make sense of is the user's input to fix, named as such, not "a bug"."""

from __future__ import annotations

import os
from typing import Any

from ..errors import CheckpointError

__all__ = ["from_pretrained"]


def from_pretrained(loader: Any, directory: str | os.PathLike, role: str = "the model", **kwargs: Any) -> Any:
    """``loader.from_pretrained(directory, trust_remote_code=False, **kwargs)`` (an Auto class, or a function
    taking a directory and keywords); transformers' own errors for unusable files become a CheckpointError naming
    them."""
    load = getattr(loader, "from_pretrained", loader)
    # never a model's own code: a config or tokenizer_config whose auto_map names a .py file beside the weights
    # would make transformers ask "run the custom code? [y/N]" on the terminal (and run it on "y"); False refuses
    kwargs["trust_remote_code"] = False
    try:
        return load(directory, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as exc:
        what = getattr(loader, "__name__", "transformers")
        if "trust_remote_code" in str(exc) or "custom code" in str(exc):
            raise CheckpointError(f"{directory}: {role} needs code shipped in the model folder (an auto_map in its "
                                  f"config.json or tokenizer_config.json); tiesmerge never runs a model's own code",
                                  hint="use a model whose architecture and tokenizer transformers ships, or remove "
                                       "the auto_map entries if the standard classes fit") from None
        first = str(exc).strip().splitlines()[0][:240] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{directory}: {what} cannot load {role} ({type(exc).__name__}: {first})",
                              hint="check its config.json and tokenizer files (a tokenizer_config.json naming a "
                                   "file that is not there, a config of another architecture)") from None
