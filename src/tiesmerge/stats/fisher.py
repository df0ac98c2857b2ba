"""The diagonal Fisher information of a classifier, per parameter, as Fisher merging defines it.

    F = E_x E_{y ~ p(y|x)} (d log p(y|x) / d theta)^2

``kind="exact"`` (default) computes it per example with the expectation over y taken
exactly: a sum over the classes weighted by the model's own probabilities, so no sampling
noise (cost: one backward pass per class and example). Two common approximations are
offered under their own names:

- ``empirical``: y is the true label, F = E_x (d log p(y_true|x) / d theta)^2. It measures
  the fit to the labels, not the model's own uncertainty.
- ``batched``: the square of a batch-summed gradient, F = (1/N) sum_b (sum_{i in b} g_i)^2
  with g_i = d log p(y_i|x_i) / d theta and y_i the true label. It equals ``empirical``
  for batches of one; larger batches add the cross-example terms 2 g_i g_j.

Per-example gradients come from ``torch.func`` (``vmap`` over one ``vjp`` per example) or,
for models that cannot run under ``vmap`` (data-dependent Python control flow), from a loop
over the examples with ordinary autograd (``per_example="loop"``): the same numbers, slower.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.func import functional_call, vjp, vmap
from tqdm.auto import tqdm

from ..errors import ConfigError
from .batches import batch_size, check_collection, example, map_tensors
from .files import (
    Statistics,
    StatsManifest,
    check_finite_statistics,
    config_digest,
    model_digest,
    recorded_place,
    tokenizer_digest,
)

__all__ = ["FISHER_KINDS", "PER_EXAMPLE", "fisher_information"]

FISHER_KINDS = ("exact", "empirical", "batched")
PER_EXAMPLE = ("vmap", "loop")

# logits_fn(module, batch) -> (B, C) logits or log-probabilities (log_softmax is applied; on
# log-probabilities it changes nothing), or (B,) log-likelihoods log p(y_i|x_i) of each example's
# own target (e.g. a language model's summed token log-probabilities of a reference answer)
LogitsFn = Callable[[torch.nn.Module, Any], torch.Tensor]
TargetsFn = Callable[[Any], torch.Tensor]  # batch -> (B,) integer class labels


class _Bound(torch.nn.Module):
    """``logits_fn`` bound to its module, so functional_call can swap the module's parameters."""

    def __init__(self, module: torch.nn.Module, logits_fn: LogitsFn) -> None:
        super().__init__()
        self.module = module
        self.logits_fn = logits_fn

    def forward(self, batch: Any) -> torch.Tensor:
        out = self.logits_fn(self.module, batch)
        # what the Fisher needs, checked where it is returned (hp56 c49: a 0-d sum was an IndexError inside vjp, a list
        # an AttributeError)
        if not isinstance(out, torch.Tensor) or not (out.is_floating_point() and out.dim() in (1, 2)):
            what = (f"a {type(out).__name__}" if not isinstance(out, torch.Tensor) else
                    f"a {str(out.dtype).removeprefix('torch.')} tensor of shape {tuple(out.shape)}")
            raise ConfigError(f"logits_fn returned {what}, not (B, C) floating logits or (B,) log-likelihoods",
                              hint="return the model's logits for the batch (one row per example), computed from the "
                                   "module's parameters (not detached)")
        out = out.float()
        return out if out.dim() == 1 else torch.log_softmax(out, dim=-1)  # (B,) or (B, C)


def _directions(logp: torch.Tensor, label: torch.Tensor | None, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """For one example's log p: the cotangents (k, *logp.shape) whose gradients are squared, and
    their weights (k,). (C,) log-probabilities: exact, every class weighted by its probability;
    otherwise the true label's. A () log-likelihood: its own gradient."""
    ones = torch.ones(1, device=logp.device)
    if logp.dim() == 0:
        if kind == "exact":
            raise ConfigError("the exact Fisher needs (B, C) logits over the classes, but logits_fn returned (B,) "
                              "log-likelihoods", hint="use kind='empirical' (or 'batched') for log-likelihoods")
        return ones.to(logp.dtype), ones
    eye = torch.eye(logp.shape[0], device=logp.device, dtype=logp.dtype)  # (C, C): one class per row
    if kind == "exact":
        return eye, logp.detach().exp()  # E_y exactly: sum_c p_c (d log p_c)^2
    if label is None:
        raise ConfigError(f"the {kind} Fisher of (B, C) logits needs the true labels: pass targets=(batch -> (B,))")
    return eye[int(label)].unsqueeze(0), ones


def as_labels(labels: Any) -> torch.Tensor:
    """targets(batch) as the (B,) integer tensor every path reads: a list or a numpy array of ints too (vmap's and the
    batched path failed on them with AttributeError: hp67b c16-c18); a complex or floating one refused (c19)."""
    try:
        labels = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(f"targets(batch) must give a (B,) integer tensor of class labels, got "
                          f"{type(labels).__name__} {str(labels)[:60]}") from None
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ConfigError(f"targets(batch) must give a (B,) integer tensor of class labels, got {tuple(labels.shape)} "
                          f"{str(labels.dtype).removeprefix('torch.')}")
    return labels


def _check_labels(labels: torch.Tensor, classes: int, first: int, size: int | None = None) -> None:
    """True labels must be classes of the model, 0 .. C - 1 (C = 0: log-likelihoods, no classes):
    a label of -1 would silently pick the last class, one of C or more no class at all; one per example of the
    batch (``size``: hp65b c11, 2 labels for 6 examples were a bare error or, batched, a silently wrong Fisher).
    ``labels``: as :func:`as_labels` gives them."""
    if not classes:  # (B,) log-likelihoods: each example's own target is inside them, no label is read
        return
    if size is not None and tuple(labels.shape) not in ((size,), (size, 1)):
        raise ConfigError(f"targets(batch) gave labels of shape {tuple(labels.shape)} for a batch of {size} examples: "
                          "one class label per example, (B,)")
    labels = labels.reshape(-1)  # (as_labels made it an integer tensor)
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < classes):
        bad = next(i for i, v in enumerate(labels.tolist()) if not 0 <= v < classes)
        raise ConfigError(f"example {first + bad}: label {labels[bad].item()} is not a class of the model, which has "
                          f"{classes} (labels 0 to {classes - 1})",
                          hint="map the data's labels to the model's classes")


def fisher_information(module: torch.nn.Module, batches: Iterable[Any], logits_fn: LogitsFn, *,
                       kind: str = "exact", targets: TargetsFn | None = None, per_example: str = "vmap",
                       class_chunk: int = 8, embedding_rows: bool = False, progress: bool = False,
                       model: str | os.PathLike | None = None) -> Statistics:
    """The diagonal Fisher of every trainable parameter of ``module``, keyed by parameter name.

    ``batches`` yields inputs for ``logits_fn(module, batch)``, which returns (B, C) logits or
    (B,) log-likelihoods of each example's own target (``empirical`` and ``batched`` only);
    ``targets(batch) -> (B,)`` gives the true labels for (B, C) logits (``empirical``, ``batched``). With
    ``per_example="vmap"`` the function runs under ``torch.func.vmap`` on one example at a time (a batch of one) and
    must not branch on tensor values. The module is put in eval mode (no dropout).
    ``class_chunk``: with ``per_example="loop"``, classes whose backward passes run as one
    batched backward (memory: that many gradients of the whole module at once).
    ``embedding_rows`` (loop only): gather each ``nn.Embedding`` weight's per-example gradient
    from the module's outputs, row by row: the same numbers, much faster for a large vocabulary,
    provided the weight is used only through its Embedding modules (a weight tied to another
    registered layer is detected and handled densely; one used by plain tensor code is not).
    ``model``: the directory the module was loaded from; its files' digest goes in the manifest
    and is checked again when the statistics are merged.

    >>> stats = fisher_information(model, loader, lambda m, b: m(b["x"]))      # doctest: +SKIP
    >>> stats.save("stats/fisher-task-a")                                      # doctest: +SKIP
    """
    model = check_collection(module, batches, logits_fn, "logits_fn", model, embedding_rows=embedding_rows,
                             progress=progress)
    if targets is not None and not callable(targets):
        raise ConfigError(f"targets is a {type(targets).__name__}, not a function of a batch")
    if not isinstance(class_chunk, int) or isinstance(class_chunk, bool):
        raise ConfigError(f"class_chunk must be a whole number, got {type(class_chunk).__name__}")
    if kind not in FISHER_KINDS:
        raise ConfigError(f"fisher kind {kind!r} is not one of {', '.join(FISHER_KINDS)}")
    if per_example not in PER_EXAMPLE:
        raise ConfigError(f"per_example {per_example!r} is not one of {', '.join(PER_EXAMPLE)}")
    if embedding_rows and per_example != "loop":
        raise ConfigError("embedding_rows works with per_example='loop'")
    if class_chunk < 1:
        raise ConfigError(f"class_chunk must be at least 1, got {class_chunk}")
    if not any(p.requires_grad for p in module.parameters()):
        raise ConfigError("the module has no trainable parameters to compute a Fisher for")
    if kind == "exact" or targets is not None:  # a softmax over (B, C) logits: not a multi-label or regression head's
        # likelihood (hp76b c134: the API computed one silently where `tiesmerge stats fisher` refuses the model)
        from ..evaluation.loading import refuse_multi_label, refuse_not_softmax

        purpose = f"fisher_information (kind={kind!r}, the log-likelihood of a softmax)"
        hint = ("give single-label classifiers, or have logits_fn return each example's own log-likelihood, (B,), "
                "with kind='empirical' and no targets")
        refuse_not_softmax(getattr(getattr(module, "config", None), "problem_type", None), "the module's config: ",
                           purpose, hint)
        if model is not None:  # a folder, or a weights file (hp77b c08) or link to one (hp78b c19)
            refuse_multi_label(model, purpose, hint=hint)
    was_training = module.training
    module.eval()
    bound = _Bound(module, logits_fn)
    params = {f"module.{n}": p for n, p in module.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    examples = 0
    classes: int | None = None
    try:
        for batch in tqdm(batches, desc=f"fisher ({kind})", unit="batch", disable=not progress):
            size = batch_size(batch)
            if not size:  # an empty batch (a filtered loader's) adds nothing; vmap's path failed on it (hp64b c19)
                continue
            labels = as_labels(targets(batch)) if kind != "exact" and targets is not None else None  # exact: y ~ p
            if labels is not None:
                if classes is None:  # the number of classes, from one forward pass without gradients
                    with torch.no_grad():
                        out = bound(batch)
                    classes = int(out.shape[-1]) if out.dim() == 2 else 0
                _check_labels(labels, classes, examples, size)
            if kind == "batched":
                _add_batched(bound, params, batch, labels, total, kind)
            elif per_example == "vmap":
                try:
                    _add_vmap(bound, params, batch, labels, total, kind)
                except (RuntimeError, ValueError) as exc:  # (ValueError: a batch holding texts, hp65b c10)
                    # .tolist() / .numpy() of a batched tensor under vmap: torch's words name no vmap (hp72b c45)
                    if not any(words in str(exc) for words in ("vmap", "doesn't have storage",
                                                               "numpy() on Tensor that requires grad")):
                        raise
                    raise ConfigError(f"the model cannot run under torch.func.vmap ({str(exc).splitlines()[0][:160]})",
                                      hint="use per_example='loop' (--per-example loop): the same numbers, "
                                           "with ordinary autograd") from None
            else:
                _add_loop(bound, params, batch, labels, total, size, class_chunk, embedding_rows, kind)
            examples += size
    finally:
        module.train(was_training)
    if not examples:
        raise ConfigError("no examples: the batches were empty")
    if total and not any(bool(t.any()) for t in total.values()):  # (hp56 c50: detached logits, written as a Fisher)
        # (hp64b c21: one class, or equal logits, was said to be detached: the softmax is constant there)
        raise ConfigError(f"the Fisher is zero for every parameter over {examples:,} examples: the log-probabilities "
                          "do not change with the module's parameters: the model is certain of one class on every "
                          "example (a saturated softmax, whose gradients round to 0), or the logits are detached "
                          "(computed under no_grad, or from another module), or every class has the same logit (a "
                          "single class, or equal columns)",  # (hp71b c35: a saturated model blamed on logits_fn)
                          hint="check the model's outputs on these examples (their probabilities), and through the "
                               "API that logits_fn returns (B, C) logits of the module passed to it, with gradients")
    tensors = {n.removeprefix("module."): (t / examples) for n, t in total.items()}
    # batched runs one backward per batch: no per-example gradient, so none was used (hp69b c20: recorded as vmap)
    used = None if kind == "batched" else per_example
    manifest = StatsManifest("fisher", examples, {"kind": kind, "per_example": used, "embedding_rows": embedding_rows},
                             model_digest=model_digest(module, model), model=recorded_place(model),
                             tokenizer_digest=tokenizer_digest(model),
                             config_digest=config_digest(model))
    check_finite_statistics("fisher", tensors)
    return Statistics(manifest, tensors)


def _add_vmap(bound: _Bound, params: dict[str, torch.Tensor], batch: Any, labels: torch.Tensor | None,
              total: dict[str, torch.Tensor], kind: str) -> None:
    """Per-example squared gradients summed into ``total``: vmap over examples of one vjp each."""
    detached = {n: p.detach() for n, p in params.items()}

    def one(p: dict[str, torch.Tensor], x: Any, label: torch.Tensor) -> dict[str, torch.Tensor]:
        x1 = map_tensors(x, lambda t: t.unsqueeze(0))  # a batch of one
        logp, pullback = vjp(lambda q: functional_call(bound, q, (x1,))[0], p)  # (C,)
        if logp.dim() == 0:  # a log-likelihood: its own gradient
            _directions(logp, None, kind)  # refuses the exact kind
            (g,) = pullback(torch.ones_like(logp))
            return {n: g[n].float() ** 2 for n in g}  # squared in float32: a float16 model's 300 overflows (hp71b c36)
        classes = logp.shape[0]
        out = {n: torch.zeros_like(v, dtype=torch.float32) for n, v in p.items()}
        if kind != "exact":  # empirical: the true label's gradient only
            if labels is None:
                _directions(logp, None, kind)  # raises: no labels
            (g,) = pullback((torch.arange(classes, device=logp.device) == label).to(logp.dtype))
            return {n: g[n].float() ** 2 for n in out}
        probs = logp.detach().exp()  # (C,)
        for c in range(classes):  # E_y exactly: sum_c p_c (d log p_c)^2
            (g,) = pullback((torch.arange(classes, device=logp.device) == c).to(logp.dtype))
            for n in out:
                out[n] = out[n] + probs[c].float() * g[n].float() ** 2
        return out

    size = batch_size(batch)
    label_arg = labels if labels is not None else torch.zeros(size, dtype=torch.long)
    label_arg = label_arg.to(next(iter(detached.values())).device)
    squared = vmap(one, in_dims=(None, 0, 0))(detached, batch, label_arg)  # name -> (B, *shape)
    for n, value in squared.items():
        total[n] += value.sum(dim=0)


def _row_embeddings(bound: _Bound, params: dict[str, torch.Tensor]) -> dict[str, torch.nn.Embedding]:
    """Parameter key -> Embedding module, for the weights whose gradient can be gathered row by
    row from the module's outputs: registered once (not tied to another layer), no max_norm
    renormalisation, no scaling by frequency."""
    uses: dict[int, int] = {}
    for _, p in bound.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    found = {}
    for name, m in bound.named_modules():
        key = f"{name}.weight"
        if (isinstance(m, torch.nn.Embedding) and key in params and uses.get(id(m.weight)) == 1
                and m.max_norm is None and not m.scale_grad_by_freq):
            found[key] = m
    return found


def _no_graph(what: str) -> ConfigError:
    return ConfigError(f"{what}: logits_fn's output does not depend on the module's parameters (detached, computed "
                       "under no_grad, or from another module)",
                       hint="return logits computed by the module passed to logits_fn, with gradients")


def _check_graph(logp: torch.Tensor) -> None:
    """Logits without a graph: autograd.grad's bare RuntimeError ("element 0 of tensors does not require grad") in the
    loop and batched paths, where vmap's path gives the typed error below (hp63b c35)."""
    if not logp.requires_grad:
        raise _no_graph("the log-probabilities have no gradient")


def _add_loop(bound: _Bound, params: dict[str, torch.Tensor], batch: Any, labels: torch.Tensor | None,
              total: dict[str, torch.Tensor], size: int, class_chunk: int, embedding_rows: bool, kind: str) -> None:
    """The same per-example sums with ordinary autograd, one example at a time; the classes'
    backward passes run ``class_chunk`` at a time as one batched backward.

    ``embedding_rows``: an Embedding's weight gradient is the sum of the gradients of its
    output positions, added into the rows of their token ids, so the backward stops at the
    (T, D) outputs and only the example's own rows are squared, instead of a dense
    (vocabulary, D) gradient per class that is zero almost everywhere."""
    rowwise = _row_embeddings(bound, params) if embedding_rows else {}
    dense = [n for n in params if n not in rowwise]
    captured: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {key: [] for key in rowwise}
    hooks = [m.register_forward_hook(lambda mod, inputs, out, key=key: captured[key].append((inputs[0], out)))
             for key, m in rowwise.items()]
    try:
        for i in range(size):
            for calls in captured.values():
                calls.clear()
            logp = bound(example(batch, i))[0]  # (C,) log-probabilities, or () a log-likelihood
            _check_graph(logp)
            rows, weights = _directions(logp, labels[i] if labels is not None else None, kind)  # (k, *), (k,)
            outputs = [out for key in rowwise for _, out in captured[key]]
            for start in range(0, rows.shape[0], class_chunk):
                cotangents = rows[start:start + class_chunk]  # (k, *logp.shape)
                w = weights[start:start + class_chunk]  # (k,)
                grads = torch.autograd.grad(logp, [params[n] for n in dense] + outputs, grad_outputs=cotangents,
                                            retain_graph=True, is_grads_batched=True, allow_unused=True)
                for n, g in zip(dense, grads):
                    if g is not None:  # total += sum_k w_k g_k^2, one pass over the (k, *shape) squares
                        # squared in float32: a float16 model's gradient of 300 squares past float16 (hp71b c36)
                        total[n] += torch.tensordot(w.float(), g.float().square_(), dims=1)
                _add_embedding_rows(rowwise, captured, list(grads[len(dense):]), w, total)
    finally:
        for h in hooks:
            h.remove()


def _add_embedding_rows(rowwise: dict[str, torch.nn.Embedding], captured: dict[str, list], grads: list,
                        w: torch.Tensor, total: dict[str, torch.Tensor]) -> None:
    """total[weight][rows] += sum_k w_k (per-class gradient of those rows)^2, from output gradients."""
    for key, module in rowwise.items():
        calls = captured[key]
        mine, grads = grads[:len(calls)], grads[len(calls):]
        pairs = [(ids.reshape(-1), g.reshape(g.shape[0], -1, g.shape[-1]))  # (L,), (k, L, D)
                 for (ids, _), g in zip(calls, mine) if g is not None]
        if not pairs:
            continue
        ids = torch.cat([p[0] for p in pairs])  # (L,)
        g = torch.cat([p[1] for p in pairs], dim=1).float()  # (k, L, D)
        if module.padding_idx is not None:  # nn.Embedding never trains its padding row
            keep = ids != module.padding_idx
            ids, g = ids[keep], g[:, keep]
        unique, inverse = ids.unique(return_inverse=True)  # (U,), (L,)
        per_row = g.new_zeros(g.shape[0], unique.numel(), g.shape[-1]).index_add_(1, inverse, g)  # (k, U, D)
        total[key].index_add_(0, unique, torch.tensordot(w.float(), per_row.square_(), dims=1))


def _add_batched(bound: _Bound, params: dict[str, torch.Tensor], batch: Any, labels: torch.Tensor | None,
                 total: dict[str, torch.Tensor], kind: str) -> None:
    """The shortcut: the square of the gradient of the batch's summed log-likelihood."""
    names = list(params)
    logp = bound(batch)  # (B, C) or (B,)
    _check_graph(logp)
    if logp.dim() == 1:
        picked = logp.sum()
    else:
        if labels is None:
            _directions(logp[0], None, kind)  # raises: no labels
        picked = logp.gather(1, labels.reshape(-1, 1).to(logp.device)).sum()
    grads = torch.autograd.grad(picked, [params[n] for n in names], allow_unused=True)
    for n, g in zip(names, grads):
        if g is not None:
            total[n] += g.float() ** 2
