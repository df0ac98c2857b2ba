"""Shared by the method and engine tests: merge copies of state dicts through the public API."""

from __future__ import annotations

from typing import Any

import torch

import tiesmerge

State = dict[str, torch.Tensor]


def clone_state(sd: State) -> State:
    return {k: v.clone() for k, v in sd.items()}


def run(base: State, models: list[State], method: Any, **opts: Any) -> State:
    """The public API, returning a state dict. Inputs are cloned so no test sees another's writes."""
    out = tiesmerge.merge(clone_state(base), [clone_state(m) for m in models], method, **opts)
    assert isinstance(out, dict)
    return out
