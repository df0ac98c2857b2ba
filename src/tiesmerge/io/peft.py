"""What LoRA and (IA)³ adapters share: PEFT's file names and key layout, and binding keys to the
base model's tensor names. Pure metadata: nothing here reads a tensor or imports torch."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import CheckpointError, IncompatibleCheckpointsError
from ..limits import read_json
from ..paths import inside
from .protocol import Checkpoint
from .safetensors_reader import SafetensorsCheckpoint

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "PEFT_PREFIX", "yields_task_vector", "adapter_kind", "strip_key",
           "resolve_name", "read_adapter_dir"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def yields_task_vector(ckpt: Checkpoint) -> bool:
    return bool(getattr(ckpt, "yields_task_vector", False))


def adapter_kind(models: list[Checkpoint]) -> str | None:
    """"lora", "ia3" or None (no adapters); mixing (IA)³ with anything else is an error."""
    kinds = {getattr(m, "adapter_kind", None) for m in models}
    if "ia3" in kinds and len(kinds) > 1:
        raise IncompatibleCheckpointsError(
            "(IA)³ adapters merge only with other (IA)³ adapters: their task vectors are scaling vectors, "
            "not weight changes",
            hint="merge the (IA)³ adapters on their own, or fold each into its base model first")
    return "ia3" if "ia3" in kinds else "lora" if "lora" in kinds else None


def strip_key(key: str, suffix: str) -> str:
    """The module path of an adapter key: ``suffix`` and PEFT's ``base_model.model.`` removed."""
    module = key[: -len(suffix)] if suffix and key.endswith(suffix) else key
    return module[len(PEFT_PREFIX):] if module.startswith(PEFT_PREFIX) else module


def resolve_name(module: str, suffix: str, base: Checkpoint, label: str, key: str) -> str:
    """The base tensor name of ``module + suffix``: exact, else with leading module components
    dropped (an adapter trained on a task head wrapper, e.g. ``bert.``), else the one base name
    ending with it (a base saved under a wrapper prefix)."""
    names = set(base.names())
    parts = module.split(".")
    for start in range(len(parts)):
        candidate = ".".join(parts[start:]) + suffix
        if candidate in names:
            return candidate
    ending = [n for n in names if n.endswith("." + module + suffix)]
    if len(ending) == 1:
        return ending[0]
    raise IncompatibleCheckpointsError(
        f"{label}: adapter tensor {key!r} targets module {module!r}, but the base ({base.label}) has "
        + (f"{len(ending)} tensors ending in {module + suffix!r}" if ending else f"no tensor {module + suffix!r}"),
        hint="the adapter was trained on another base model; pass the base it was trained from")


# the adapter config's flags that change what an adapter's weights mean (PEFT LoRA and (IA)³)
_FLAGS = ("use_rslora", "fan_in_fan_out", "use_dora", "use_qalora", "inference_mode", "lora_bias")


def read_adapter_dir(path: Path, label: str) -> tuple[dict, SafetensorsCheckpoint]:
    """An adapter directory's config and its (opened, validated) weights file."""
    # the adapter's files must resolve inside its directory, as a model's weights must (paths.inside):
    # a link to ~/secret.safetensors is refused, not read
    inside(path / ADAPTER_CONFIG, path, "the adapter config")
    config = read_json(path / ADAPTER_CONFIG, "the adapter config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: holds a {type(config).__name__}, not a mapping")
    for key in _FLAGS:  # read as truth values: bool("no") and bool("false") would be True
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise CheckpointError(f"{path / ADAPTER_CONFIG}: {key} is {str(config[key])[:80]!r} "
                                  f"({type(config[key]).__name__}), not true or false",
                                  hint="fix the adapter config (PEFT writes its flags as JSON true/false)")
    weights = path / ADAPTER_WEIGHTS
    if not os.path.lexists(weights):
        pickled = path / "adapter_model.bin"
        raise CheckpointError(
            f"{path}: no {ADAPTER_WEIGHTS}" + (" (only adapter_model.bin, a pickle)" if pickled.is_file() else ""),
            hint="save the adapter with safe_serialization=True (PEFT's default) or convert it to safetensors")
    inside(weights, path, "the adapter's weights")
    return config, SafetensorsCheckpoint(weights, [weights], {}, label)
