"""transformers' loaders with typed errors: a model directory whose config or tokenizer files
transformers cannot make sense of is the user's input to fix, named as such, not "a bug"."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..limits import read_json

__all__ = ["from_pretrained"]


def _check_config(directory: Path) -> None:
    """What transformers would fetch or need beyond the folder, refused before it is asked to: an attention
    implementation named as a Hub repo (``kernels-community/...``: code downloaded and run), and a quantized
    checkpoint (its weights are not the model's values; bitsandbytes/GPTQ packages would be needed)."""
    path = directory / "config.json"
    if not path.is_file():
        return
    config = read_json(path, "the model's config")
    if not isinstance(config, dict):
        return  # transformers' own message names it
    for key in ("_attn_implementation", "attn_implementation"):
        value = config.get(key)
        if isinstance(value, str) and "/" in value:
            raise CheckpointError(f"{path}: {key} = {value!r} names a kernel on the Hugging Face Hub; tiesmerge never "
                                  f"downloads or runs a model's code",
                                  hint=f"remove {key} from config.json (transformers then picks a built-in one)")
    if config.get("quantization_config") is not None:
        method = config["quantization_config"].get("quant_method", "?") \
            if isinstance(config["quantization_config"], dict) else "?"
        raise CheckpointError(f"{path}: the model is quantized ({method}); its stored weights are not the values "
                              f"statistics and evaluation need",
                              hint="use the unquantized model (merging quantized checkpoints is not supported)")


def from_pretrained(loader: Any, directory: str | os.PathLike, role: str = "the model", **kwargs: Any) -> Any:
    """``loader.from_pretrained(directory, trust_remote_code=False, **kwargs)`` (an Auto class, or a function
    taking a directory and keywords); transformers' own errors for unusable files become a CheckpointError naming
    them."""
    _check_config(Path(directory))
    load = getattr(loader, "from_pretrained", loader)
    # never a model's own code: a config or tokenizer_config whose auto_map names a .py file beside the weights
    # would make transformers ask "run the custom code? [y/N]" on the terminal (and run it on "y"); False refuses
    kwargs["trust_remote_code"] = False
    try:
        return load(directory, **kwargs)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, ImportError) as exc:
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
