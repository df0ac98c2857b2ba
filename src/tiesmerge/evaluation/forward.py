"""Logits of a batch of inputs: the one forward that evaluation and AdaMerging share.

A *task forward* is a ``torch.nn.Module`` whose ``forward(batch, task)`` returns the logits
``(B, C)`` of a batch for one task, with two more members:

- ``prefix``: its parameter holding checkpoint tensor ``name`` is called ``prefix + name``, so
  merged weights (keyed like the checkpoint) can be swapped in with
  :func:`torch.func.functional_call` (:func:`logits` with ``params``);
- ``encode(rows, task)``: a batch from examples, each ``{"text": ...}`` as ``tiesmerge stats``
  reads them from JSON lines (``text_pair`` for sentence pairs, ``choices`` for choice scoring).

Four kinds:

- :class:`ClassifierLogits`: a Hugging Face ``*ForSequenceClassification`` model; its logits.
- :class:`EncoderHeadLogits`: the benchmark's :class:`SentenceEncoder` with one frozen
  :class:`CosineHead` per task (the heads are not parameters: they are never merged).
- :class:`ChoiceLogits`: a causal LM scoring each answer choice by the summed log-probability of
  its tokens after the prompt, as rank classification does; the C scores are the logits, so the
  softmax over them is the distribution over the choices.
- :class:`FunctionLogits`: any ``torch.nn.Module`` with a function ``fn(module, batch, task)``
  that returns logits.

:func:`load_forward` builds the first three from a model directory (what ``tiesmerge adapt
--forward`` names).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import CheckpointError, ConfigError
from ..paths import check_model_dir
from .encoder import CosineHead, SentenceEncoder, build_head
from .loading import (
    align_pad_token,
    architectures,
    check_vocabulary,
    clipped,
    clipped_tail,
    count_cut,
    encode,
    fitted_length,
    forward_checked,
    from_pretrained,
    input_rows,
    is_encoder_decoder,
    refuse_alike,
    refuse_converted,
    refuse_multi_label,
    warn_unknown,
)
from .rank_classification import check_choice_count, fit_choice

__all__ = ["FORWARD_KINDS", "TaskForward", "ClassifierLogits", "EncoderHeadLogits", "ChoiceLogits",
           "FunctionLogits", "Row", "as_rows", "checkpoint_names", "load_forward", "logits", "entropy"]

FORWARD_KINDS = ("classifier", "encoder", "choice")  # what load_forward (and --forward) builds from a directory
_PAD_SCORE = -1e9  # the score of a padded (absent) choice: softmax gives it 0, and log_softmax stays finite

Row = Mapping[str, Any]  # {"text": str, "text_pair"?: str, "choices"?: [str, ...], "label"?: int}


@runtime_checkable
class TaskForward(Protocol):
    """``forward(batch, task) -> (B, C)`` logits; ``prefix``; ``encode(rows, task) -> batch``."""

    prefix: str

    def encode(self, rows: Sequence[Row], task: str) -> Any: ...

    def forward(self, batch: Any, task: str) -> torch.Tensor: ...

    def __call__(self, batch: Any, task: str) -> torch.Tensor: ...


def as_rows(examples: Sequence[Row | str], where: str = "") -> list[dict[str, Any]]:
    """Examples as rows: a plain string is ``{"text": string}``; anything else but a mapping is refused, naming it
    (hp77b c26: an int or None among in-memory rows was a TypeError traceback) and counting from 1, as the checks of
    the rows' texts do; ``where``: whose examples (e.g. "task 'a'")."""
    rows = []
    for k, e in enumerate(examples):
        if isinstance(e, str):
            rows.append({"text": e})
        elif isinstance(e, Mapping):
            rows.append(dict(e))
        else:
            whose = f"{where}: " if where else ""
            raise ConfigError(f"{whose}example {k + 1} is {type(e).__name__} {str(e)[:40]!r}, not a row (a mapping "
                              "such as {'text': ...}) or a text", hint="give each task's examples as texts or rows")
    return rows


def logits(forward: TaskForward, batch: Any, task: str,
           params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
    """(B, C) logits of ``batch`` for ``task``; with ``params`` (keyed like the checkpoint), the
    module's own weights are replaced by them for this call only (``torch.func.functional_call``:
    gradients flow into ``params``, and weights not in ``params`` stay the module's)."""
    if params is None:
        return forward(batch, task)
    named = {forward.prefix + name: value for name, value in params.items()}
    return torch.func.functional_call(forward, named, (batch, task), strict=False, tie_weights=True)


def checkpoint_names(forward: TaskForward) -> set[str]:
    """The checkpoint names of the forward's weights (parameters and buffers): what ``params`` may
    replace. A merged tensor outside this set would be ignored by ``functional_call``, so callers
    check their names against it."""
    module: torch.nn.Module = forward  # type: ignore[assignment]
    names = [n for n, _ in module.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in module.named_buffers(remove_duplicate=False)]
    return {n[len(forward.prefix):] for n in names if n.startswith(forward.prefix)}


def entropy(logits_: torch.Tensor) -> torch.Tensor:
    """(B, C) logits -> (B,) Shannon entropy (nats) of their softmax. Computed from log_softmax, so
    a zero probability contributes 0 with a finite gradient (p log p with p = 0, log p finite)."""
    x = logits_ if logits_.dtype == torch.float64 else logits_.float()  # half precision is upcast, double kept
    logp = torch.log_softmax(x, dim=-1)  # (B, C)
    return -(logp.exp() * logp).sum(-1)


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def _device_of_buffers(module: torch.nn.Module) -> torch.device:
    try:
        return _device(module)
    except StopIteration:
        return torch.device("cpu")


def _texts(rows: Sequence[Row], key: str = "text") -> list[str]:
    return [str(r[key]) for r in rows]


def _pairs(rows: Sequence[Row], task: str) -> list[str] | None:
    """The rows' ``text_pair``s, or None where none has one. Some with and some without is refused: a batch holding
    one row without a pair was encoded without any, so the result depended on the batch size (hp42 D55)."""
    paired = [r for r in rows if "text_pair" in r]
    if not paired:
        return None
    if len(paired) != len(rows):
        raise ConfigError(f"task {task!r}: {len(paired):,} of {len(rows):,} examples have a 'text_pair' and the others "
                          "none; a classifier of sentence pairs needs both texts of every example",
                          hint="give every example its text_pair, or none of them")
    return _texts(rows, "text_pair")


class ClassifierLogits(torch.nn.Module):
    """A Hugging Face sequence classifier: logits ``(B, num_labels)``, the same for every task."""

    prefix = "model."

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, max_length: int = 128) -> None:
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, fitted_length(model, max_length)

    def encode(self, rows: Sequence[Row], task: str) -> dict[str, torch.Tensor]:
        pairs = _pairs(rows, task)
        batch = encode(self.tokenizer, _texts(rows), pairs, max_length=self.max_length)
        device = _device_of_buffers(self.model)
        return {k: v.to(device) for k, v in batch.items()}

    def count_cut(self, rows: Sequence[Row], task: str) -> int:
        """How many of ``rows`` :meth:`encode` cuts to ``max_length`` tokens (their last tokens are lost)."""
        return count_cut(self.tokenizer, _texts(rows), _pairs(rows, task), max_length=self.max_length)

    def forward(self, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
        with forward_checked(None):
            return self.model(**batch).logits  # (B, C)


class EncoderHeadLogits(torch.nn.Module):
    """A sentence encoder with one frozen cosine head per task: ``(B, C_task)``."""

    prefix = "encoder.model."
    unused_prefixes = ("pooler.",)  # mean pooling: a BertModel checkpoint's pooler is loaded by nothing here

    def __init__(self, encoder: SentenceEncoder, heads: Mapping[str, CosineHead]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = dict(heads)  # plain tensors, not parameters: never merged, never trained

    def encode(self, rows: Sequence[Row], task: str) -> dict[str, torch.Tensor]:
        self._head(task)  # an unknown task fails here, before a forward
        return self.encoder.tokenize(_texts(rows))

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    def count_cut(self, rows: Sequence[Row], task: str) -> int:
        """How many of ``rows`` :meth:`encode` cuts to ``max_length`` tokens (their last tokens are lost)."""
        return count_cut(self.encoder.tokenizer, _texts(rows), max_length=self.encoder.max_length)

    def _head(self, task: str) -> CosineHead:
        if task not in self.heads:
            raise ConfigError(f"no head for task {task!r}; the heads are for {', '.join(sorted(self.heads))}",
                              hint="give one head (class descriptions) per task, named like the data files")
        return self.heads[task]

    def forward(self, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
        return self._head(task).logits(self.encoder(batch))  # (B, D) unit vectors -> (B, C)


class ChoiceLogits(torch.nn.Module):
    """A causal LM scoring answer choices: logits ``(B, C)`` = each choice's summed token
    log-probability given the prompt (rank classification's score). A row's ``choices`` are its
    own, else the task's from ``choices``; rows with fewer choices than the batch's widest are
    padded with choices of probability 0. Choices are tokenized without special tokens and
    appended to the prompt as they are (give them their leading space where the tokenizer needs
    one); a prompt too long for ``max_length`` loses its first tokens."""

    prefix = "model."

    def __init__(self, model: torch.nn.Module, tokenizer: Any, *, choices: Mapping[str, Sequence[str]] | None = None,
                 max_length: int = 512) -> None:
        super().__init__()
        self.model, self.tokenizer, self.max_length = model, tokenizer, fitted_length(model, max_length)
        self.choices = {t: tuple(c) for t, c in (choices or {}).items()}

    def _row_choices(self, row: Row, task: str) -> tuple[str, ...]:
        own = row.get("choices")
        if own is not None:
            if not isinstance(own, (list, tuple)) or not own or not all(isinstance(c, str) for c in own):
                raise ConfigError(f"task {task!r}: a row's 'choices' must be a non-empty list of strings, got "
                                  f"{str(own)[:80]}")
            check_choice_count(len(own), f"task {task!r}: a row")
            return tuple(own)
        if task not in self.choices:
            raise ConfigError(f"task {task!r}: no answer choices (rows carry no 'choices' and none were given "
                              "for the task)", hint='add "choices": [...] to each row, or pass choices per task')
        return self.choices[task]

    def encode(self, rows: Sequence[Row], task: str) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        seqs, spans, width = [], [], 0
        per_row = [self._row_choices(r, task) for r in rows]
        width = max(len(c) for c in per_row)
        present = torch.zeros(len(rows), width, dtype=torch.bool)  # (B, C)
        for b, (row, choices) in enumerate(zip(rows, per_row)):
            # the prompt keeps its last tokens (fit_choice): its text cut to what they can cover before tokenizing
            prompt = self.tokenizer(clipped_tail(str(row["text"]), self.max_length),
                                    add_special_tokens=True)["input_ids"]
            for c in range(width):
                present[b, c] = c < len(choices)
                tokens = self.tokenizer(clipped(choices[min(c, len(choices) - 1)], self.max_length),
                                        add_special_tokens=False)["input_ids"]
                if not tokens:
                    raise ConfigError(f"task {task!r}: choice {choices[min(c, len(choices) - 1)]!r} has no tokens")
                if not prompt:  # the first choice token needs a position that predicts it
                    raise ConfigError(f"task {task!r}: prompt {row['text']!r} has no tokens, so its choices cannot "
                                      "be scored", hint="give a non-empty prompt or a tokenizer that adds a BOS token")
                p = fit_choice(prompt, tokens, self.max_length, choices[min(c, len(choices) - 1)])
                seqs.append(p + tokens)
                spans.append((len(p), len(p) + len(tokens)))
        longest = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), longest), pad, dtype=torch.long)  # (B*C, T), right-padded
        mask = torch.zeros_like(ids)
        scored = torch.zeros(len(seqs), longest - 1, dtype=torch.bool)  # (B*C, T-1): position t-1 predicts token t
        for i, (s, (start, end)) in enumerate(zip(seqs, spans)):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
            scored[i, start - 1:end - 1] = True
        device = _device_of_buffers(self.model)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "scored": scored.to(device),
                "present": present.to(device)}

    def check_rows(self, rows: Sequence[Row], task: str) -> None:
        """Each row's own choices tell apart, before the first step: ["good", "good"] or two unknown words steered
        nothing, the task's entropy log 2 at every step (hp42 D59)."""
        for k, row in enumerate(rows):
            own = row.get("choices") if isinstance(row, Mapping) else None
            if isinstance(own, (list, tuple)) and all(isinstance(c, str) for c in own):
                refuse_alike(self.tokenizer, list(own), where=f"task {task!r}, example {k + 1}", what="choice",
                             directory=None, max_length=self.max_length, special_tokens=False, truncate=False)
        warn_unknown(self.tokenizer, [tuple(r["choices"]) for r in rows if isinstance(r, Mapping)  # (hp69b c10)
                                      and isinstance(r.get("choices"), (list, tuple))],
                     max_length=self.max_length, where=f"task {task!r}'s answer choices", stacklevel=4,
                     effect="the learned coefficients follow how the model reads that token")

    def count_cut(self, rows: Sequence[Row], task: str) -> int:
        """How many of ``rows`` lose their prompt's first tokens: the prompt and its longest choice are past
        ``max_length`` tokens."""
        cut = 0
        for row in rows:
            prompt = self.tokenizer(clipped_tail(str(row["text"]), self.max_length), add_special_tokens=True,
                                    truncation=True, max_length=self.max_length + 1)["input_ids"]
            longest = max(len(self.tokenizer(clipped(c, self.max_length), add_special_tokens=False, truncation=True,
                                             max_length=self.max_length + 1)["input_ids"])
                          for c in self._row_choices(row, task))
            cut += len(prompt) + longest > self.max_length
        return cut

    def forward(self, batch: Mapping[str, torch.Tensor], task: str) -> torch.Tensor:
        ids = batch["input_ids"]  # (B*C, T)
        with forward_checked(None):
            out = self.model(input_ids=ids, attention_mask=batch["attention_mask"]).logits  # (B*C, T, V)
        logp = torch.log_softmax(out[:, :-1].float(), dim=-1)  # (B*C, T-1, V)
        token = logp.gather(2, ids[:, 1:, None]).squeeze(2)  # (B*C, T-1)
        scores = (token * batch["scored"]).sum(1)  # (B*C,)
        present = batch["present"]  # (B, C)
        scores = scores.view(present.shape)
        return scores.masked_fill(~present, _PAD_SCORE)  # (B, C)


class FunctionLogits(torch.nn.Module):
    """Any module with ``fn(module, batch, task) -> (B, C)``; ``encode(rows, task)`` (default: the
    rows themselves) turns examples into the batch ``fn`` takes."""

    prefix = "module."

    def __init__(self, module: torch.nn.Module, fn: Callable[[torch.nn.Module, Any, str], torch.Tensor],
                 encode: Callable[[Sequence[Row], str], Any] | None = None) -> None:
        super().__init__()
        self.module, self.fn, self._encode = module, fn, encode

    def encode(self, rows: Sequence[Row], task: str) -> Any:
        return self._encode(rows, task) if self._encode is not None else list(rows)

    def forward(self, batch: Any, task: str) -> torch.Tensor:
        return self.fn(self.module, batch, task)


def _check_causal_lm(model_dir: Path) -> None:
    """The choice forward scores answers with a causal LM: a model whose config names only other architectures
    (e.g. a ``BertForSequenceClassification``) is refused, saying which forward fits it (no architectures: let
    transformers decide)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = architectures(model_dir)
    causal = {name for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for name in ((v,) if isinstance(v, str) else v)}
    if not archs or any(a in causal or a.endswith("ForCausalLM") for a in archs):
        return
    fits = ("--forward classifier fits it" if any(a.endswith("ForSequenceClassification") for a in archs)
            else "tune or search with --evaluator choice-accuracy:FILE scores encoder-decoder LMs"
            if is_encoder_decoder(model_dir) else "--forward encoder (with --heads) may fit it")
    raise ConfigError(f"{model_dir}: the choice forward needs a causal language model, and this model is a "
                      f"{', '.join(archs)}", hint=f"{fits}; --forward choice is for models such as *ForCausalLM")


def _check_bare_encoder(model_dir: Path) -> None:
    """The encoder forward embeds texts with a bare encoder (its mean pooling): a base whose config names a
    classifier or a causal LM is refused, saying which forward fits it (hp34 D82: "25 merged tensors are not weights
    of the forward's model" and Python-API advice, after the model was built), and so is an encoder-decoder, whose
    model needs decoder inputs too (hp35 E10: "unexpected ValueError … a bug")."""
    archs = architectures(model_dir)
    if is_encoder_decoder(model_dir):
        raise ConfigError(f"{model_dir}: the encoder forward takes a bare encoder, and this is an encoder-decoder "
                          f"model ({', '.join(archs) or 'T5-like'}), which needs decoder inputs too",
                          hint="--forward classifier fits an encoder-decoder classifier (*ForSequenceClassification); "
                               "tune or search with --evaluator choice-accuracy:FILE scores encoder-decoder LMs")
    if any(a.endswith("ForSequenceClassification") for a in archs):
        fits = "--forward classifier fits it (its own head)"
    elif any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        fits = "--forward choice fits it (with answer choices)"
    else:
        return
    raise ConfigError(f"{model_dir}: the encoder forward takes a bare encoder (a *Model whose mean-pooled outputs are "
                      f"sentence embeddings), and this model is a {', '.join(archs)}", hint=fits)


def load_forward(kind: str, model_dir: str | os.PathLike, *, heads: Mapping[str, Sequence[str]] | None = None,
                 choices: Mapping[str, Sequence[str]] | None = None, max_length: int = 128,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """The task forward ``kind`` (one of :data:`FORWARD_KINDS`) of the model in ``model_dir``, on
    ``device``, in eval mode (dropout off).

    - ``classifier``: ``AutoModelForSequenceClassification``;
    - ``encoder``: a :class:`SentenceEncoder` with one frozen head per task, built (as the
      benchmark does) from this model's embeddings of each task's class descriptions ``heads``;
    - ``choice``: ``AutoModelForCausalLM`` scoring answer ``choices`` (per task, or per row).

    >>> fwd = load_forward("encoder", "base", heads={"sentiment": ["negative", "positive"]})  # doctest: +SKIP
    >>> logits(fwd, fwd.encode([{"text": "great"}], "sentiment"), "sentiment").shape           # doctest: +SKIP
    torch.Size([1, 2])
    """
    if kind not in FORWARD_KINDS:
        raise ConfigError(f"unknown forward kind {kind!r}; known: {', '.join(FORWARD_KINDS)}",
                          hint="any other torch module goes through the Python API with FunctionLogits")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a model directory", hint="the forward is built from an HF directory")
    check_model_dir(model_dir, "the base")  # transformers follows links: every file it opens checked first
    refuse_converted(model_dir, "adapt (a coefficient per checkpoint tensor, set in the forward's model by name)")
    forward: torch.nn.Module
    if kind == "classifier":
        archs = architectures(model_dir)
        if not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ConfigError(f"{model_dir}: not a sequence classifier (architectures: {', '.join(archs) or 'none'})",
                              hint="--forward encoder (with --heads) or choice (with answer choices) may fit")
        refuse_multi_label(model_dir, "adapt's classifier forward (its entropy and cross-entropy)")
        model = from_pretrained(AutoModelForSequenceClassification, model_dir).to(device)
        if int(getattr(model.config, "num_labels", 2)) < 2:  # hp35 E38: entropy 0 -> 0, nothing learned
            raise ConfigError(f"{model_dir}: a head of 1 output (num_labels 1: a regression head) gives no "
                              "distribution over classes, so adapt's objectives are 0 whatever the coefficients",
                              hint="adapt needs a classifier of 2 or more classes (or --forward encoder with "
                                   "--heads of class descriptions)")
        tokenizer = from_pretrained(AutoTokenizer, model_dir, "its tokenizer")
        check_vocabulary(tokenizer, input_rows(model), model_dir)  # hp40 V1: before a forward's IndexError
        align_pad_token(model, tokenizer, model_dir)
        forward = ClassifierLogits(model, tokenizer, max_length=max_length)
    elif kind == "encoder":
        if not heads:
            raise ConfigError("the encoder forward needs class descriptions per task (heads)",
                              hint='--heads FILE with {"task": ["description of class 0", ...], ...}')
        _check_bare_encoder(model_dir)
        encoder = SentenceEncoder.from_pretrained(model_dir, max_length=max_length, device=device)
        for task, desc in heads.items():  # as the encoder reads them (hp42 D3, D27: a task whose entropy never moved)
            refuse_alike(encoder.tokenizer, list(desc), where=f"--heads, task {task!r}", what="class",
                         directory=model_dir, max_length=encoder.max_length, special_tokens=True, truncate=True)
        for task, desc in heads.items():  # task by task: one task's unknown words hid behind another's (hp70b c24)
            warn_unknown(encoder.tokenizer, list(desc), what="class descriptions",  # (hp69b c10)
                         max_length=encoder.max_length, where=f"--heads, task {task!r}", stacklevel=4,
                         effect="the heads tell classes apart by how the encoder reads that token")
        built = {task: build_head(encoder, list(desc)) for task, desc in heads.items()}
        forward = EncoderHeadLogits(encoder, built)
    else:
        _check_causal_lm(model_dir)  # before loading: transformers would build a causal LM of a classifier's body
        tokenizer = from_pretrained(AutoTokenizer, model_dir, "its tokenizer")
        model = from_pretrained(AutoModelForCausalLM, model_dir).to(device)
        check_vocabulary(tokenizer, input_rows(model), model_dir)  # hp40 V1
        for task, texts in (choices or {}).items():  # hp42 D3: ["zzz", "qqq"], both <unk>, steered nothing
            refuse_alike(tokenizer, list(texts), where=f"--choices, task {task!r}", what="choice",
                         directory=model_dir, max_length=max_length, special_tokens=False, truncate=False)
        for task, texts in (choices or {}).items():  # (hp69b c10; task by task: hp70b c24)
            warn_unknown(tokenizer, list(texts), what="choices", max_length=max_length,
                         where=f"--choices, task {task!r}", stacklevel=4,
                         effect="the learned coefficients follow how the model reads that token")
        forward = ChoiceLogits(model, tokenizer, choices=choices, max_length=max_length)
    return forward.eval()
