"""Batches as nested tensors: a tensor, or a mapping / tuple / list of them, batch dimension first."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from ..errors import ConfigError

__all__ = ["map_tensors", "batch_size", "example", "check_collection"]


def check_collection(module: Any, batches: Any, fn: Any, fn_name: str, model: Any, **flags: Any) -> Any:
    """The arguments every statistics collector takes, checked before any work (hp59b c49, c50: a module of None,
    batches of None, a bytes model path failed as AttributeError/TypeError inside torch or tqdm): ``module`` a torch
    module, ``batches`` an iterable, ``fn`` a function, ``model`` a path (bytes as merge takes them) or None, each of
    ``flags`` True or False. Returns ``model`` as a text path."""
    from ..inputs import check_booleans
    from ..paths import fs_text

    if not isinstance(module, torch.nn.Module):
        raise ConfigError(f"module is a {type(module).__name__}, not a torch.nn.Module",
                          hint="pass the loaded model (e.g. AutoModelForSequenceClassification.from_pretrained(...))")
    if isinstance(batches, (str, bytes, Mapping)) or not isinstance(batches, Iterable):
        raise ConfigError(f"batches is a {type(batches).__name__}, not an iterable of batches (a DataLoader, a list)")
    if not callable(fn):
        raise ConfigError(f"{fn_name} is a {type(fn).__name__}, not a function of (module, batch)")
    check_booleans(**flags)
    model = fs_text(model)
    if model is not None and not isinstance(model, (str, os.PathLike)):
        raise ConfigError(f"model is a {type(model).__name__}, not the path of the folder the module was loaded from")
    return model


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``batch`` with ``fn`` applied to every tensor inside it (other values kept)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def batch_size(batch: Any) -> int:
    """The leading dimension shared by every tensor of ``batch``."""
    sizes: set[int] = set()
    map_tensors(batch, lambda t: sizes.add(int(t.shape[0])) if t.dim() else None)
    if len(sizes) != 1:  # a typed error: the API's callers' input (hp65b c09: a bare ValueError)
        raise ConfigError(f"a batch holds tensors with batch dimensions {sorted(sizes) or 'none'}; "
                          "every tensor needs the same leading (batch) dimension")
    return sizes.pop()


def example(batch: Any, i: int) -> Any:
    """Example ``i`` of ``batch`` as a batch of one (the leading dimension kept)."""
    return map_tensors(batch, lambda t: t[i:i + 1] if t.dim() else t)
