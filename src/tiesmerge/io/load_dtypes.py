"""The dtype each weight of a base model has once transformers loads it as mergekit does (no dtype asked), which
PEFT folds an adapter into for a mergekit MODEL+ADAPTER entry: the config's dtype, else the first floating tensor's of
the first weights file for the whole model, then float32 for the modules the model's class keeps so."""

from __future__ import annotations

import re
from typing import Any

from ..errors import CheckpointError
from .protocol import Checkpoint

__all__ = ["LoadDtypes", "float32_modules", "fold_overflow"]

_UNREAD = object()  # not looked up yet


def _config_dtype(base: Checkpoint) -> Any:
    """The floating dtype a base's config.json names (transformers 5's "dtype", or the older "torch_dtype"), which
    transformers loads the whole model in when asked for no dtype; None where it names none."""
    import torch

    from .align import read_model_config  # align imports this module

    config = read_model_config(base)
    for key in ("dtype", "torch_dtype"):
        named = config.get(key)
        if isinstance(named, str) and named.removeprefix("torch.") in ("float32", "float16", "bfloat16", "float64"):
            return getattr(torch, named.removeprefix("torch."))
    return None


def float32_modules(base: Checkpoint, dtype: Any) -> re.Pattern | None:
    """The modules transformers keeps in float32 when it loads ``base`` in ``dtype``, as one pattern, from its
    config's architecture class (looked up by name in transformers, never a model's own code); None where there are
    none, or transformers or the class is not there."""
    import torch

    from .align import read_model_config  # align imports this module

    try:
        architectures = read_model_config(base).get("architectures")
    except CheckpointError:
        return None
    if not (isinstance(architectures, list) and architectures and isinstance(architectures[0], str)
            and re.fullmatch(r"[A-Z][A-Za-z0-9_]{0,200}", architectures[0])):
        return None
    try:
        import transformers

        cls = getattr(transformers, architectures[0], None)
    except Exception:  # noqa: BLE001 - transformers missing or failing to import a model: no modules kept
        return None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        return None
    loose = getattr(cls, "_keep_in_fp32_modules", None) or () if dtype == torch.float16 else ()
    strict = getattr(cls, "_keep_in_fp32_modules_strict", None) or ()
    kept = [k for k in (*loose, *strict) if isinstance(k, str) and k]
    try:  # transformers' own reading: each a regex with '*' for '.*', searched in the name
        return re.compile("|".join(f"(?:{k.replace('*', '.*')})" for k in kept)) if kept else None
    except re.error:
        return None


class LoadDtypes:
    """Each tensor's dtype as transformers loads ``base`` with no dtype asked (mergekit's MODEL+ADAPTER: transformers
    5 takes the config's dtype, else the first floating tensor's of the first weights file, hp49 c11, c56, hp56 c104),
    then float32 for the model class's modules kept so (``_keep_in_fp32_modules`` in a float16 model,
    ``..._strict`` in bfloat16 too, each searched in the tensor's name: hp49 c54, T5's wo). A base of other files:
    each tensor's own. Read once per base, lazily."""

    def __init__(self, base: Checkpoint) -> None:
        self._base = base
        self._model: Any = _UNREAD  # the whole model's dtype (None: each tensor's own)
        self._float32_kept: dict[Any, Any] = {}  # a half dtype -> the pattern of the modules kept in float32

    def of(self, name: str, stored_dtype: Any) -> Any:
        import torch

        if not stored_dtype.is_floating_point:
            return stored_dtype
        if self._model is _UNREAD:
            self._model = _config_dtype(self._base)  # transformers' dtype="auto": the config's dtype first (hp56
            if self._model is None:  # c104, c105: bfloat16 weights under a float32 config load in float32)
                firsts = getattr(self._base, "first_file_names", None)
                names = firsts() if callable(firsts) else []
                floating = next((n for n in names if self._base.info(n).is_floating
                                 and self._base.info(n).itemsize >= 2), None)
                self._model = None if floating is None else self._base.info(floating).dtype
        model = self._model or stored_dtype
        if model in (torch.float16, torch.bfloat16):
            if model not in self._float32_kept:
                self._float32_kept[model] = float32_modules(self._base, model)
            pattern = self._float32_kept[model]
            if pattern is not None and pattern.search(name) is not None:
                return torch.float32
        return model


def fold_overflow(where: str, what: str, name: str, stored: Any, loaded: Any, entry: str, alone: str) -> Exception:
    """The error for a mergekit MODEL+ADAPTER fold (``what``: "folding the update s·B·A of 'q_proj'") that overflowed
    the dtype ``name`` is loaded in, said with that dtype and where it comes from, and remedies that work there:
    a config's half dtype over float32 weights is the config's to change (hp59a c46, c47: "overflows float32" of a
    float16 fold, "give the base in float32" of float32 weights); past float32, no base can hold it (c68: "damaged").
    ``alone``: how the command line merges the adapter instead."""
    import torch

    from ..errors import InvalidTensorError

    load, kept = str(loaded).removeprefix("torch."), str(stored).removeprefix("torch.")
    if loaded not in (torch.float16, torch.bfloat16):  # float32 or wider: beyond any dtype a model is loaded in
        return InvalidTensorError(f"{where}: {what} into the base's {load} weight {name!r} overflows {load}: the "
                                  "folded weights are past 3.4e38, which no model holds",
                                  hint="the adapter scales this weight beyond any trained model; check how it was "
                                       "saved, or merge another one")
    source = "" if loaded == stored else f" (stored {kept}; transformers loads it in {load}, the dtype the base's " \
                                         "config.json names)"
    remedy = "give the base in float32 (its weights converted)" if loaded == stored else \
        "set \"dtype\" (or \"torch_dtype\") in the base's config.json to float32, so that it loads in float32"
    return InvalidTensorError(
        f"{where}: {what} into the base's {load} weight {name!r}{source} overflows {load}, as mergekit's fold of "
        f"this {entry} entry does (PEFT folds in the weight's dtype; mergekit writes Inf there)",
        hint=f"{remedy}, or merge the adapter with the command line (--base BASE --model ADAPTER), {alone}; and write "
             f"the output wider than {load} (dtype: float32), which cannot hold the folded values either")
