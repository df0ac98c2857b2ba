"""Gram matrices of the inputs of every ``nn.Linear``, for RegMean, collected with forward hooks.

For a Linear layer y = x W^T + b with inputs x in R^in, the statistic is the running mean
G = X^T X / N over every input row the layer sees (N rows: tokens, or examples for a layer
applied to pooled vectors). It is stored under the name of the layer's weight, shape (in, in).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..errors import ConfigError
from .batches import batch_size, check_collection
from .files import (
    Statistics,
    StatsManifest,
    check_finite_statistics,
    config_digest,
    model_digest,
    recorded_place,
    tokenizer_digest,
)

__all__ = ["gram_matrices"]

ForwardFn = Callable[[torch.nn.Module, Any], Any]  # runs the model on a batch; the output is ignored
TokenMaskFn = Callable[[Any], torch.Tensor]  # batch -> (B, T) bool: which positions are real tokens


@torch.no_grad()
def gram_matrices(module: torch.nn.Module, batches: Iterable[Any], forward_fn: ForwardFn, *,
                  token_mask: TokenMaskFn | None = None, progress: bool = False,
                  model: str | os.PathLike | None = None) -> Statistics:
    """X^T X / N of the inputs of every ``nn.Linear`` inside ``module``, keyed ``<layer>.weight``.

    ``token_mask(batch)`` (e.g. the attention mask) drops padding: it applies to every layer
    input whose leading dimensions equal the mask's shape (B, T); inputs of another shape
    (a head on pooled vectors, one row per example) count every row. Sums run in float64.

    >>> stats = gram_matrices(model, loader, lambda m, b: m(**b),                # doctest: +SKIP
    ...                       token_mask=lambda b: b["attention_mask"].bool())
    """
    model = check_collection(module, batches, forward_fn, "forward_fn", model, progress=progress)
    if token_mask is not None and not callable(token_mask):
        raise ConfigError(f"token_mask is a {type(token_mask).__name__}, not a function of a batch")
    # a Linear whose weight is another parameter (a head tied to the embedding) has no tensor of its own
    # in the checkpoint, and RegMean's closed form is for a Linear's own weight: it is left out
    own = {id(p): n for n, p in module.named_parameters()}  # shared parameters listed once, by their first name
    linears = {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)
               and own.get(id(m.weight)) == (f"{name}.weight" if name else "weight")}
    if not linears:
        raise ConfigError("the module has no nn.Linear layers: RegMean has nothing to collect")
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    current_mask: list[torch.Tensor | None] = [None]
    masked = [False]  # whether the mask fitted any Linear's input (hp67b c29: one that fits none was ignored)

    def hook(name: str) -> Callable:
        def collect(layer: torch.nn.Module, inputs: tuple, kwargs: dict, output: Any) -> None:
            # a Linear called by keyword (self.l(input=x), legal PyTorch) has no positional input (hp64b c18: a bare
            # IndexError of inputs[0])
            x = (inputs[0] if inputs else kwargs.get("input", next(iter(kwargs.values()), None)))
            if not isinstance(x, torch.Tensor):
                raise ConfigError(f"the Linear layer {name or 'module'!r} was called without a tensor input",
                                  hint="call nn.Linear layers with their input tensor")
            x = x.detach()  # (*lead, in)
            mask = current_mask[0]
            if mask is not None and tuple(x.shape[:-1]) == tuple(mask.shape):
                x = x[mask.to(x.device)]  # (real rows, in)
                masked[0] = True
            x = x.reshape(-1, x.shape[-1]).double()
            if name not in sums:
                sums[name] = torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=x.device)
                rows[name] = 0
            sums[name].addmm_(x.T, x)
            rows[name] += x.shape[0]
        return collect

    handles = [layer.register_forward_hook(hook(name), with_kwargs=True) for name, layer in linears.items()]
    was_training = module.training
    module.eval()
    examples = 0
    try:
        for batch in tqdm(batches, desc="gram", unit="batch", disable=not progress):
            mask = token_mask(batch) if token_mask is not None else None
            if mask is not None and not isinstance(mask, torch.Tensor):  # (hp65b c08: a list, an AttributeError)
                raise ConfigError(f"token_mask(batch) returned a {type(mask).__name__}, not a (B, T) tensor",
                                  hint="return a tensor, e.g. lambda b: b['attention_mask'].bool()")
            if mask is not None and mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
                # a float mask of NaN (or 0.5) read as True by .bool(): every row kept (hp67b c30)
                bad = mask[(mask != 0) & (mask != 1)].flatten()[0].item()
                raise ConfigError(f"token_mask(batch) returned a {str(mask.dtype).removeprefix('torch.')} mask holding "
                                  f"{bad!r}: a mask holds True/False (or 1/0) per row",
                                  hint="return a boolean tensor, e.g. lambda b: b['attention_mask'].bool()")
            current_mask[0] = mask.bool() if mask is not None else None
            forward_fn(module, batch)
            examples += batch_size(batch)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    if not examples:
        raise ConfigError("no examples: the batches were empty")
    if token_mask is not None and not masked[0]:
        raise ConfigError("token_mask(batch) fits no Linear layer's input: its shape is none of the inputs' leading "
                          "dimensions (B, T), so every padding row would count",
                          hint="return a (B, T) mask, e.g. lambda b: b['attention_mask'].bool()")

    def key(name: str) -> str:  # the module itself a Linear: its weight is "weight", not ".weight" (hp64b c20)
        return f"{name}.weight" if name else "weight"

    tensors = {key(name): (sums[name] / max(rows[name], 1)).float() for name in sums if rows[name]}
    if not tensors:  # every row masked out: statistics of nothing, written as a folder of a manifest (hp56 c51)
        raise ConfigError(f"no input rows reached any Linear layer over {examples:,} examples"
                          + (": token_mask kept none" if token_mask is not None else ""),
                          hint="check token_mask (True keeps a row), or that the model has Linear layers the "
                               "batches run through")
    empty = [key(n) for n in sums if not rows[n]]
    if empty:  # (hp68b c23: a layer whose every input row was masked was left out without a word)
        import warnings

        from ..errors import MergeWarning

        warnings.warn(MergeWarning(
            f"{len(empty)} Linear layer(s) saw no input row over {examples:,} examples"
            + (" (token_mask kept none of theirs)" if token_mask is not None else "")
            + f", so the statistics hold no Gram matrix for them: {', '.join(empty[:5])}"
            + (f", ... ({len(empty) - 5} more)" if len(empty) > 5 else "")), stacklevel=2)
    options = {"token_mask": token_mask is not None, "rows": {key(n): rows[n] for n in sums}}
    manifest = StatsManifest("gram", examples, options, model_digest=model_digest(module, model),
                             model=recorded_place(model), tokenizer_digest=tokenizer_digest(model),
                             config_digest=config_digest(model))
    check_finite_statistics("gram", tensors)
    return Statistics(manifest, tensors)
