"""Per-tensor values of an option: mergekit's filters and gradients, as one line of text.

mergekit lets a parameter vary by tensor: ``t: [{filter: self_attn, value: [0, 0.5, 1]},
{value: 0.5}]`` takes the first rule whose filter is a substring of the tensor's name (no filter,
or ``*``, matches every tensor), and a list value is a gradient over the layers, interpolated
linearly at the layer's position. tiesmerge writes the same thing as

    ``self_attn=0,0.5,1;*=0.5``

(rules separated by ``;``, each ``FILTER=VALUE[,VALUE...]``), read with the model's number of
layers. Positions follow mergekit 0.1.5 (``plan.py``): layer i of L sits at i / (L - 1) (1 when
L is 1); tensors outside the layers (embeddings, the final norm, the head) sit at 0. A tensor's
layer is the number after ``.layers.``, ``.h.``, ``.layer.`` or ``.blocks.`` in its name (HF's
names for Llama, Mistral, Qwen, GPT-2, BERT, ViT); mergekit reads it from its architecture files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Schedule", "parse_schedule", "schedule_problem", "layer_index"]

# a layer index of ASCII digits, at most 9 (int() of a 5000-digit "index" raised: hostile pass 25, F4)
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.([0-9]{1,9})\.")


@dataclass(frozen=True)
class Schedule:
    """Rules in order: (filter or None for every tensor, the values; one value, or a gradient)."""

    rules: tuple[tuple[str | None, tuple[float, ...]], ...]

    def value(self, name: str, layers: int, default: float) -> float:
        """The value for tensor ``name`` of a model with ``layers`` layers (``default`` where no
        rule matches, as mergekit falls back to the parameter's other settings)."""
        for pattern, values in self.rules:
            if pattern is None or pattern in name:
                return gradient_value(values, position(name, layers))
        return default


def layer_index(name: str) -> int | None:
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def position(name: str, layers: int) -> float:
    """Where tensor ``name`` sits along a gradient: mergekit's t of its layer, 0 outside the layers. A layer past
    the ``layers`` given (a config that under-reports them, a second stack of layers) sits at the end, 1: it takes
    the gradient's last value (the method warns), as every layer does with ``layers`` 1."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return min(1.0, index / (layers - 1)) if layers > 1 else 1.0


def gradient_value(values: tuple[float, ...], t: float) -> float:
    """mergekit's ``evaluate_setting``: linear between the two nearest of the evenly spaced values."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def parse_schedule(text: str) -> Schedule:
    """``"self_attn=0,0.5,1;*=0.5"`` -> a Schedule; ValueError says what is malformed."""
    rules = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        pattern, eq, values = part.rpartition("=")
        if not eq:
            pattern, values = "*", part  # a bare value list: every tensor
        pattern = pattern.strip()
        if "=" in pattern:  # 'mlp=0.5,self_attn=0.3': two rules joined by ',' read as one filter (pass 24, N3)
            raise ValueError(f"{part!r}: the filter {pattern!r} holds '=', which no tensor name does; rules are "
                             "separated by ';' (e.g. 'mlp=0.5;self_attn=0.3'), values by ','")
        try:
            numbers = tuple(float(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"{part!r}: values must be numbers separated by commas") from None
        rules.append((None if pattern in ("", "*") else pattern, numbers))
    if not rules:
        raise ValueError("no rule (write FILTER=VALUE[,VALUE...] separated by ';', e.g. 'self_attn=0,1;*=0.5')")
    return Schedule(tuple(rules))


def schedule_problem(text: object) -> str | None:
    """An option check: None, or what is wrong with a schedule's text."""
    if not isinstance(text, str):
        return "must be a schedule such as 'self_attn=0,0.5,1;*=0.5'"
    try:
        parse_schedule(text)
    except ValueError as exc:
        return f"is not a schedule: {exc}"
    return None
