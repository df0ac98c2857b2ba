"""Built-in evaluators for ``tune`` and ``search``: a validation file in, a score out (higher is better).

``--evaluator NAME:FILE`` picks one; the model they score is the base's architecture, loaded once
per process from the base directory, with each candidate's merged state dict loaded into it:

=======================  ===================================================================
``classifier-accuracy``  a sequence classifier's accuracy; JSONL lines ``{"text", "label"}``
                         (``text_pair`` for sentence pairs), as ``tiesmerge stats`` reads them
``choice-accuracy``      a language model's rank classification accuracy (causal or
                         encoder-decoder); JSONL lines ``{"prompt", "choices": [...], "label"}``
``encoder-accuracy``     a sentence encoder with frozen zero-shot cosine heads, mean accuracy
                         over tasks; JSONL lines ``{"task", "classes": [descriptions]}`` (one
                         per task, the head) and ``{"task", "text", "label"}`` (the examples);
                         ``python -m tiesmerge_bench export`` writes the benchmark's tasks so
``lm-perplexity``        minus the perplexity of a causal LM on a UTF-8 text file: language
                         ability kept (higher, i.e. a lower perplexity, is better)
=======================  ===================================================================

The names hold a hyphen, so none can be a Python module's: ``module:function`` still names a
user's own evaluator. The evaluators are plain classes that pickle (search's Ray workers build
their model once per worker process), read and check their file when they are made (a bad file
fails before the search, not after it; so do a base's tokenizer that is not its model's and a head
they cannot score), and run on CUDA when it is there (``device="auto"``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, MergeWarning
from ..limits import check_text_pairs, not_utf8_hint, not_utf8_kind, read_json_lines, warn_unread_keys
from ..paths import check_model_dir, read_regular
from .loading import (
    align_pad_token,
    architectures,
    check_kind,
    check_vocabulary,
    clipped,
    clipped_tail,
    config_num_labels,
    config_vocab_size,
    count_cut,
    fitted_length_of,
    forward_checked,
    from_pretrained,
    input_rows,
    is_encoder_decoder,
    refuse_alike,
    refuse_converted,
    refuse_multi_label,
    warn_unknown,
)
from .rank_classification import ChoiceExample, check_choice_count, choice_hits, fit_choice, score_choices

__all__ = ["BUILTIN_EVALUATORS", "builtin_evaluator", "ClassifierAccuracy", "ChoiceAccuracy", "EncoderAccuracy",
           "LMPerplexity", "builtin_names"]

_MAX_DATA_BYTES = 1 << 30  # a validation file, read whole
_MODELS: dict[tuple, Any] = {}  # (kind, model dir, device) -> the model this process loaded once


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _lines(path: Path, what: str) -> list[tuple[int, dict]]:
    """(line number, object) of every non-empty line of a JSON-lines file."""
    return read_json_lines(path, what, max_bytes=_MAX_DATA_BYTES, error=ConfigError)


def _int_label(row: dict, where: str, classes: int | None = None, of: str = "") -> int:
    """The line's label, an index below ``classes`` (``of``: what they are, for the hint). A data error's hint is
    about the data file, not the command's options (hp40 B3)."""
    if "label" not in row:  # said as absent, not as "got None" (hp62b v3)
        keys = ", ".join(repr(k)[:40] for k in list(row)[:6])
        raise ConfigError(f"{where}: the line has no 'label' (its keys: {keys or 'none'})",
                          hint=f"give every line a 'label': the index of the right answer{f' ({of})' if of else ''}")
    label = row.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or label < 0 or (classes is not None and label >= classes):
        # "an integer": 1.0 and true were told they must be 0..1 (hp41 C23), a range they are in
        allowed = f"an integer from 0 to {classes - 1}" if classes is not None else "an integer >= 0"
        raise ConfigError(f"{where}: 'label' must be {allowed}, got {label!r}"
                          + (f" ({type(label).__name__}, not an integer)" if isinstance(label, (bool, float, str))
                             else ""),
                          hint=f"fix that line of the data file: 'label' is the index of the right answer"
                               f"{f' ({of})' if of else ''}")
    return label


def _model_dir(base: Any) -> Path:
    if isinstance(base, Mapping) or base is None:
        raise ConfigError("a built-in evaluator builds its model from the base's directory, and the base is "
                          "a state dict", hint="give the base as a Hugging Face model directory, or write your "
                          "own evaluator (module:function)")
    path = Path(base)
    if path.is_dir():  # its files are read by transformers, which follows links: each checked first
        check_model_dir(path, "the base", ConfigError, tokenizer=False)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: a built-in evaluator needs the base as a Hugging Face model directory "
                          "(with config.json), to build the model it scores",
                          hint="give the base's directory, or write your own evaluator (module:function)")
    check_model_dir(path, "the base", ConfigError)  # and a tokenizer: its data is text
    refuse_converted(path, "a built-in evaluator (the merged tensors loaded into the model by name)")
    return path


def _load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], where: Path) -> None:
    """The candidate's weights into ``model``: every tensor of ``state`` must land on a parameter or buffer
    (missing ones are tied weights and non-persistent buffers, which keep the base's values)."""
    result = model.load_state_dict(dict(state), strict=False)
    if unexpected := result.unexpected_keys:
        raise ConfigError(f"{where}: the merged model has tensors the model built from the base does not "
                          f"({', '.join(unexpected[:3])}{' ...' if len(unexpected) > 3 else ''})",
                          hint="the base directory's config must describe the merged models")


def _window(model: torch.nn.Module, max_length: int) -> int:
    """``max_length`` capped at the positions the model's learned position table holds (GPT-2's wpe, OPT's
    embed_positions): a longer window indexes past it. Its rows less the offset its positions start at: the module's
    own ``offset`` (OPT, BART and BioGPT add 2: hp40 L1, BioGPT's was not known), else its padding row's next
    (RoBERTa-like tables count from padding_idx + 1). Rotary models have no table and take longer windows (their
    max_position_embeddings is the length they were trained at, not a limit of the forward)."""
    import re

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if re.search(r"(^|\.)(wpe|position_embeddings|embed_positions)$", name) and \
                isinstance(weight, torch.Tensor) and weight.dim() == 2:
            offset = getattr(module, "offset", None)
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
                padding = getattr(module, "padding_idx", None)
                offset = padding + 1 if isinstance(padding, int) and padding >= 0 else 0
            return max(2, min(max_length, weight.shape[0] - offset))
    return max_length


# scores of diverging candidates: -exp(mean NLL) stays finite and ordered up to this; past it, one worst score
_MAX_LOG_PERPLEXITY = 690.0  # exp(690) ~ 1e299, under MAX_SCORE (the reports plot scores up to +-1e300)
_WORST_PERPLEXITY = math.exp(_MAX_LOG_PERPLEXITY)


@dataclass
class _Scorer:
    """What every built-in shares: the base directory, the device, and the model cache. The base's path is made
    absolute when the scorer is made: a search's Ray worker builds the model in a folder of its own (hp34 D68)."""

    model_dir: Path
    data: Path
    device: str = "auto"
    batch_size: int = 32
    limit: int | None = None  # the first examples of the file (encoder-accuracy: of each task)

    def check_models(self, models: Sequence[Any]) -> None:
        """Refuse fine-tunes this evaluator cannot score as it scores the base (tune and search call it)."""

    def _tokenizer(self) -> Any:
        """The base's tokenizer, its ids checked against the embedding rows config.json declares when the evaluator
        is made (hp40 V1: a tokenizer of 17 tokens over 8 rows failed after the first merge, as "fix the
        evaluator" or a config.json blamed that was right)."""
        from transformers import AutoTokenizer

        tokenizer = from_pretrained(AutoTokenizer, self.model_dir, "its tokenizer")
        check_vocabulary(tokenizer, config_vocab_size(self.model_dir), self.model_dir)
        return tokenizer

    def _model(self, kind: str, build) -> tuple[torch.nn.Module, Any]:
        key = (kind, str(self.model_dir), str(_device(self.device)))
        if key not in _MODELS:
            from transformers import AutoTokenizer

            name = next((n for n, cls in BUILTIN_EVALUATORS.items() if cls is type(self)), type(self).__name__)
            check_kind(self.model_dir, kind, name)
            model = from_pretrained(build, self.model_dir, "the base").to(_device(self.device)).eval()
            tokenizer = from_pretrained(AutoTokenizer, self.model_dir, "its tokenizer")
            check_vocabulary(tokenizer, input_rows(model), self.model_dir)  # the built embedding's rows (hp40 V1)
            align_pad_token(model, tokenizer, self.model_dir)
            _MODELS[key] = (model, tokenizer)
        return _MODELS[key]


@dataclass
class ClassifierAccuracy(_Scorer):
    """Accuracy of ``AutoModelForSequenceClassification`` (the base's) on labeled JSONL."""

    max_length: int = 128

    def check_models(self, models: Sequence[Any]) -> None:
        """The fine-tunes' heads are softmax classifiers too (tune and search call this with their models: hp73b
        c05, c06, multi-label fine-tunes beside a base that says nothing, scored through the API silently)."""
        refuse_multi_label(self.model_dir, "classifier-accuracy", models)

    def __post_init__(self) -> None:
        self.model_dir, self.data = Path(self.model_dir).absolute(), Path(self.data)  # absolute: see _Scorer
        check_kind(self.model_dir, "seq-cls", "classifier-accuracy")  # from config.json: before any merge
        refuse_multi_label(self.model_dir, "classifier-accuracy")
        classes = config_num_labels(self.model_dir)  # as transformers reads it: id2label's size, else num_labels
        if classes < 2:  # hp40 V2: the argmax of one logit is class 0 whatever the weights: every candidate 1.0
            raise ConfigError(f"{self.model_dir}: a head of 1 output (num_labels 1: a regression head) gives no "
                              "distribution over classes, so classifier-accuracy's argmax is class 0 whatever the "
                              "weights", hint="classifier-accuracy needs a classifier of 2 or more classes; score a "
                                              "regression model with an evaluator of your own (module:function)")
        rows = _lines(self.data, "the validation file")[:self.limit]
        self.examples: list[tuple[str, str | None, int]] = []
        for number, row in rows:
            where = f"{self.data}:{number}"
            if not isinstance(row.get("text"), str) or not isinstance(row.get("text_pair", ""), str):
                raise ConfigError(f"{where}: each line needs a string 'text' (and optionally 'text_pair')",
                                  hint='e.g. {"text": "a review", "label": 1}')
            if not row["text"].strip():  # nothing to classify: refused now, not after the first merge
                raise ConfigError(f"{where}: empty or missing 'text'", hint="remove the line, or give it a text")
            # the label checked against the model's classes here, naming its line (hp40 B3: "a label is >= the
            # model's 2 classes", after the first merge, with neither line nor value)
            self.examples.append((row["text"], row.get("text_pair"),
                                  _int_label(row, where, classes, f"the base has {classes} classes, by its "
                                                                  "config.json's id2label or num_labels")))
        paired = check_text_pairs(rows, self.data)  # all or none, after each line's own checks (hp42 D55)
        warn_unread_keys(rows, self.data, ("text", "text_pair", "label"), "classifier-accuracy")
        tokenizer = self._tokenizer()
        pairs = [p for _, p, _ in self.examples] if paired else None
        _warn_cut(self.data, tokenizer, [t for t, _, _ in self.examples], pairs, self.model_dir, self.max_length)

    @torch.no_grad()
    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        from transformers import AutoModelForSequenceClassification

        from .forward import ClassifierLogits

        model, tokenizer = self._model("seq-cls", AutoModelForSequenceClassification.from_pretrained)
        _load_state(model, state, self.model_dir)
        forward = ClassifierLogits(model, tokenizer, max_length=self.max_length)  # the same forward adapt uses
        hits = broken = 0
        for i in range(0, len(self.examples), self.batch_size):
            chunk = self.examples[i:i + self.batch_size]
            rows = [{"text": t, **({"text_pair": p} if p is not None else {})} for t, p, _ in chunk]
            out = forward(forward.encode(rows, "validation"), "validation").cpu()  # (B, C)
            # a row whose logits are not finite (a merge far past the models) is wrong, never argmax's class 0: an
            # all-NaN model scored as well as a sane one, and ties went to it (hp43 c08)
            finite = torch.isfinite(out).all(-1)  # (B,)
            hits += int(((out.argmax(-1) == torch.tensor([y for *_, y in chunk])) & finite).sum())
            broken += int((~finite).sum())
        _warn_broken("classifier-accuracy", broken, len(self.examples))
        return hits / len(self.examples)


@dataclass
class ChoiceAccuracy(_Scorer):
    """Rank classification accuracy of a causal or encoder-decoder LM (the paper's text protocol). A prompt longer
    than ``max_length`` tokens (or the model's positions) with its choice loses its first tokens."""

    max_length: int = 512

    def __post_init__(self) -> None:
        self.model_dir, self.data = Path(self.model_dir).absolute(), Path(self.data)  # absolute: see _Scorer
        self.examples: list[ChoiceExample] = []
        lines: list[str] = []  # each example's file:line
        rows = _lines(self.data, "the validation file")[:self.limit]
        warn_unread_keys(rows, self.data, ("prompt", "choices", "label"), "choice-accuracy")
        for number, row in rows:
            where = f"{self.data}:{number}"
            choices = row.get("choices")
            if not isinstance(row.get("prompt"), str) or not isinstance(choices, list) or len(choices) < 2 \
                    or not all(isinstance(c, str) and c for c in choices):
                raise ConfigError(f"{where}: each line needs a string 'prompt' and 'choices', a list of at least "
                                  "two non-empty strings", hint='e.g. {"prompt": "Is it spam? ", '
                                  '"choices": ["yes", "no"], "label": 1}')
            check_choice_count(len(choices), where)  # before the search: every choice is a sequence per example
            stripped = [c.strip() for c in choices]
            if len(set(stripped)) < len(stripped):  # hp40 V3: two choices always tie, the tie goes to the first
                same = next(c for c in stripped if stripped.count(c) > 1)
                written = [c for c in choices if c.strip() == same]
                how = "is listed twice" if len(set(written)) == 1 else \
                    f"is listed twice ({' and '.join(repr(c[:60]) for c in written[:2])} differ only in spaces)"
                raise ConfigError(f"{where}: the choice {same[:60]!r} {how}, so the model could never tell those "
                                  "choices apart", hint="give each choice its own text")
            self.examples.append(ChoiceExample(row["prompt"], tuple(choices),
                                               _int_label(row, where, len(choices), "of 'choices', from 0")))
            lines.append(where)
        self._check_tokens(lines)

    def _check_tokens(self, lines: list[str]) -> None:
        """For a causal LM, every prompt and choice has tokens, checked before the first merge (hp40 L3: an empty
        prompt failed after it, as "fix the evaluator"): a choice's first token needs a prompt token before it, and a
        choice of no tokens would score 0, above every real choice's log-probability. (An encoder-decoder's prompt is
        the encoder's input and its choices end with EOS: never empty.)"""
        tokenizer = self._tokenizer()  # its ids against the embedding's rows, for either kind (hp40 V1)
        for where, example in zip(lines, self.examples):
            refuse_alike(tokenizer, example.choices, where=where, what="choice", directory=self.model_dir,
                         max_length=self.max_length, special_tokens=False, truncate=False)
        if is_encoder_decoder(self.model_dir):
            return
        limit = fitted_length_of(self.model_dir, self.max_length)  # a sequence's tokens, the model's positions too
        warn_unknown(tokenizer, [(e.prompt, *e.choices) for e in self.examples],
                     max_length=limit, where=str(self.data), stacklevel=5,
                     effect="the scores rank merges on how they read that token")
        # the choices on their own: what is scored, which long known prompts hid (hp69b c09)
        warn_unknown(tokenizer, [tuple(e.choices) for e in self.examples], max_length=limit,
                     where=f"{self.data}'s answer choices", stacklevel=5,
                     effect="the scores rank merges on how they read that token")
        cut = 0  # examples whose prompt loses its first tokens to fit its longest choice: said, as the other
        # evaluators say theirs (hp63b c15: a 90-token prompt on a 32-position model scored without a word)
        for where, example in zip(lines, self.examples):
            with forward_checked(self.model_dir, "the base"):
                prompt = tokenizer(clipped_tail(example.prompt, self.max_length), add_special_tokens=True)["input_ids"]
                tokens = [tokenizer(clipped(c, self.max_length), add_special_tokens=False)["input_ids"]
                          for c in example.choices]
                empty = [c for c, ids in zip(example.choices, tokens) if not ids]
            try:  # a choice that leaves no room for a prompt token: said with its line, before the first merge (D18)
                for choice, ids in zip(example.choices, tokens):
                    fit_choice(prompt or [0], ids, limit, choice)
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
            if not prompt:
                raise ConfigError(f"{where}: the prompt {example.prompt[:60]!r} has no tokens, so the first token of a "
                                  "choice has no position that predicts it",
                                  hint="give the line a prompt (its tokenizer adds no BOS token to an empty one)")
            if empty:
                raise ConfigError(f"{where}: the choice {empty[0][:60]!r} has no tokens, so it would score 0, above "
                                  "every other choice", hint="give every choice some text")
            cut += len(prompt) + max(len(ids) for ids in tokens) > limit
        if cut:
            why = "the model's positions" if limit < self.max_length else "max_length"
            warnings.warn(MergeWarning(f"{self.data}: {cut:,} of the {len(self.examples):,} examples' prompts with "
                                       f"their longest choice are longer than {limit:,} tokens ({why}), so the prompts "
                                       "lose their first tokens: the scores are of what is left"), stacklevel=4)

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        model, tokenizer = self._model("lm", _lm_loader)
        _load_state(model, state, self.model_dir)
        scores = score_choices(model, tokenizer, self.examples, batch_size=self.batch_size,
                               device=_device(self.device), max_length=self.max_length)
        hits, broken = choice_hits(scores, self.examples)
        _warn_broken("choice-accuracy", broken, len(self.examples))
        return hits / len(self.examples)


def _lm_loader(model_dir: Path, **kwargs: Any) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = AutoConfig.from_pretrained(model_dir, **{k: v for k, v in kwargs.items() if k != "output_loading_info"})
    loader = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    return loader.from_pretrained(model_dir, **kwargs)


_ENCODER_DECODER = "{}: lm-perplexity scores causal LMs, and this is an encoder-decoder"
_ENCODER_DECODER_HINT = "choice-accuracy:FILE scores encoder-decoder language models (answer choices given a prompt)"


@dataclass
class LMPerplexity(_Scorer):
    """Minus the perplexity of a causal LM on a text file, in windows of ``max_length`` tokens
    (each window scored on its own: no context carried across windows, so every token is scored once)."""

    max_length: int = 256
    max_tokens: int | None = 65536  # the first tokens of the file: a validation file need not be a book

    def __post_init__(self) -> None:
        self.model_dir, self.data = Path(self.model_dir).absolute(), Path(self.data)  # absolute: see _Scorer
        raw = read_regular(self.data, "the text file", max_bytes=_MAX_DATA_BYTES, error=ConfigError)
        try:
            self.text = raw.decode("utf-8-sig")  # a byte-order mark is not text to score
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{self.data}: the text file is not UTF-8 ({exc.reason} at byte {exc.start})"
                              f"{not_utf8_kind(raw)}", hint=not_utf8_hint(raw).replace("the file", "the text")) \
                from None
        if not self.text.strip():
            raise ConfigError(f"{self.data}: the text file is empty", hint="give lm-perplexity a file of text")
        self._warn_json_lines()
        if self.max_length < 2:
            raise ConfigError(f"max_length {self.max_length}: a window needs at least 2 tokens")
        if is_encoder_decoder(self.model_dir):  # from config.json, before the first merge (hp40 L7)
            raise ConfigError(_ENCODER_DECODER.format(self.model_dir), hint=_ENCODER_DECODER_HINT)
        # the model's kind before the text's tokens: a classifier's tokenizer warned of unknown tokens, then the
        # real error followed (hp84b c48)
        check_kind(self.model_dir, "lm", "lm-perplexity")
        self._warn_unknown(self._tokenizer())

    def _warn_json_lines(self) -> None:
        """A JSON-lines file (another evaluator's data) is scored as text, braces and keys included: said (hp53
        c08), from its first lines."""
        import json

        head = self.text[:65536]
        if len(self.text) > len(head):  # whole lines only: the cut one may be half an object
            head = head[:head.rfind("\n") + 1]
        lines = [line for line in head.splitlines()[:20] if line.strip()]
        try:
            rows = [json.loads(line) for line in lines]
        except (ValueError, RecursionError):  # text, or brackets past Python's nesting limit (hp54 c11)
            return
        if rows and all(isinstance(r, dict) for r in rows):
            warnings.warn(MergeWarning(
                f"{self.data}: its lines are JSON objects (keys {', '.join(map(repr, list(rows[0])[:4]))}), which "
                "lm-perplexity scores as plain text, braces and keys included; give it the text itself (one "
                "passage per line, or prose)"), stacklevel=3)

    def _warn_unknown(self, tokenizer: Any) -> None:
        """Most of the text unknown to the tokenizer: every candidate is scored on how well it predicts <unk> after
        <unk>, which ranks merges on noise (hp41 C80: a file of words the vocabulary lacked scored without a word)."""
        unknown = getattr(tokenizer, "unk_token_id", None)
        if unknown is None:  # byte-level tokenizers (GPT-2's) know every text
            return
        ids = tokenizer(clipped(self.text, self.max_tokens), add_special_tokens=False)["input_ids"][:self.max_tokens]
        share = sum(1 for i in ids if i == unknown) / max(1, len(ids))
        if share >= 0.5:
            warnings.warn(MergeWarning(
                f"{self.data}: {share:.0%} of the text's {len(ids):,} tokens are unknown to the base's tokenizer "
                f"({tokenizer.unk_token!s}), so lm-perplexity mostly scores how well a model predicts that token: "
                "the text is not of the language or vocabulary the model was trained on"), stacklevel=3)

    @torch.no_grad()
    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        model, tokenizer = self._model("lm", _lm_loader)
        if getattr(model.config, "is_encoder_decoder", False):
            raise ConfigError(_ENCODER_DECODER.format(self.model_dir), hint=_ENCODER_DECODER_HINT)
        _load_state(model, state, self.model_dir)
        ids = tokenizer(clipped(self.text, self.max_tokens), add_special_tokens=False)["input_ids"][:self.max_tokens]
        width = _window(model, self.max_length)  # never past a position table (hp39 C38: an IndexError)
        windows = [ids[i:i + width] for i in range(0, len(ids), width)]
        windows = [w for w in windows if len(w) >= 2]
        if not windows:
            raise ConfigError(f"{self.data}: the text has fewer than 2 tokens",
                              hint="give lm-perplexity a longer text: each token is scored from the one before it")
        total, count = 0.0, 0
        for i in range(0, len(windows), self.batch_size):
            chunk = windows[i:i + self.batch_size]
            width = max(len(w) for w in chunk)
            ids_t = torch.tensor([w + [0] * (width - len(w)) for w in chunk], device=_device(self.device))  # (B, T)
            mask = torch.tensor([[1] * len(w) + [0] * (width - len(w)) for w in chunk], device=ids_t.device)
            with forward_checked(self.model_dir, "the base"):  # the model's own failure, never "fix the evaluator"
                logprobs = model(input_ids=ids_t, attention_mask=mask).logits.float().log_softmax(-1)  # (B, T, V)
            token_lp = logprobs[:, :-1].gather(2, ids_t[:, 1:, None]).squeeze(2)  # (B, T-1): token t from t-1
            scored = mask[:, 1:].bool()
            total -= float(token_lp[scored].sum())
            count += int(scored.sum())
        # a diverging candidate's perplexity passes float's range: the worst finite score, never an OverflowError that
        # ended the whole search as "fix the evaluator" (hp39 C45; a search refuses -inf scores)
        mean = total / count
        return -math.exp(mean) if math.isfinite(mean) and mean < _MAX_LOG_PERPLEXITY else -_WORST_PERPLEXITY


@dataclass
class EncoderAccuracy(_Scorer):
    """Mean accuracy over tasks of a sentence encoder (mean pooling, unit vectors) with each task's frozen
    zero-shot head: the base encoder's embeddings of the task's class descriptions (the benchmark's protocol)."""

    max_length: int = 128

    def __post_init__(self) -> None:
        self.model_dir, self.data = Path(self.model_dir).absolute(), Path(self.data)  # absolute: see _Scorer
        if is_encoder_decoder(self.model_dir):  # hp35 E70: failed after the merge, as "fix the evaluator"
            raise ConfigError(f"{self.model_dir}: encoder-accuracy embeds texts by an encoder's mean pooling, and the "
                              "base is an encoder-decoder model, which needs decoder inputs too",
                              hint="choice-accuracy:FILE scores encoder-decoder language models")
        heads = [a for a in architectures(self.model_dir) if a.endswith("ForSequenceClassification")] \
            if (self.model_dir / "config.json").is_file() else []  # (no config: the loader names it)
        if heads:  # its trained head never scores here (hp72b c28: a classifier scored 0.5 without a word)
            warnings.warn(MergeWarning(
                f"{self.model_dir}: the base is a classifier ({heads[0]}), and encoder-accuracy scores its encoder "
                "alone, with heads made from the class descriptions: the merged classification head is not "
                "used; classifier-accuracy:FILE scores the classifiers as they predict"), stacklevel=3)
        causal = [a for a in architectures(self.model_dir) if a.endswith(("ForCausalLM", "LMHeadModel"))] \
            if (self.model_dir / "config.json").is_file() else []
        if causal:  # a causal LM's states averaged: a weak embedding, its LM head unused (hp74b c19: no word)
            warnings.warn(MergeWarning(
                f"{self.model_dir}: the base is a causal language model ({causal[0]}), and encoder-accuracy scores "
                "the mean of its hidden states against the class descriptions': its language-model head is not "
                "used; choice-accuracy:FILE (or lm-perplexity:FILE) scores it as it generates"), stacklevel=3)
        self.classes: dict[str, tuple[str, ...]] = {}
        self.examples: dict[str, list[tuple[str, int]]] = {}
        pending: list[tuple[str, dict, str]] = []
        rows = _lines(self.data, "the validation file")
        warn_unread_keys(rows, self.data, ("task", "classes", "text", "label"), "encoder-accuracy")
        for number, row in rows:
            where, task = f"{self.data}:{number}", row.get("task")
            if not isinstance(task, str) or not task:
                raise ConfigError(f"{where}: each line needs a string 'task'",
                                  hint='e.g. {"task": "sentiment", "text": "a review", "label": 1}')
            if "classes" in row and ("text" in row or "label" in row):  # hp53 c19: its example dropped silently
                raise ConfigError(f"{where}: a line holds either 'classes' (a task's head) or 'text' and 'label', "
                                  "not both", hint='give the example a line of its own: {"task": "t", "text": "a '
                                                   'review", "label": 1}')
            if "classes" in row:
                classes = row["classes"]
                bad = next((k for k, c in enumerate(classes) if not (isinstance(c, str) and c.strip())), None) \
                    if isinstance(classes, list) else None
                if not isinstance(classes, list) or len(classes) < 2 or bad is not None:
                    which = (f" (class {bad}'s is " + ("empty" if isinstance(classes[bad], str) else
                                                      f"not text but {type(classes[bad]).__name__}") + ")"
                             if bad is not None else "")  # (hp68b c29: ["bad", ""] said as fewer than two)
                    raise ConfigError(f"{where}: 'classes' must list at least two class descriptions (strings)"
                                      + which,
                                      hint='e.g. {"task": "sentiment", "classes": ["negative", "positive"]}')
                if task in self.classes:
                    raise ConfigError(f"{where}: task {task!r} has its classes twice",
                                      hint="give each task one 'classes' line")
                stripped = [c.strip() for c in classes]
                if len(set(stripped)) < len(stripped):  # hp35 E62: ties in the cosine argmax, class 0 every time
                    same = next(c for c in stripped if stripped.count(c) > 1)
                    raise ConfigError(f"{where}: task {task!r} lists the class {same[:60]!r} twice, so the model could "
                                      "never tell those classes apart", hint="give each class its own description")
                self.classes[task] = tuple(classes)
            elif isinstance(row.get("text"), str):
                if not row["text"].strip():
                    raise ConfigError(f"{where}: empty or missing 'text'", hint="remove the line, or give it a text")
                pending.append((task, row, where))
            else:
                raise ConfigError(f"{where}: a line holds either 'classes' (a task's head) or 'text' and 'label'",
                                  hint='e.g. {"task": "t", "classes": ["negative", "positive"]} or '
                                       '{"task": "t", "text": "a review", "label": 1}')
        for task, row, where in pending:
            if task not in self.classes:
                raise ConfigError(f"{where}: task {task!r} has no 'classes' line",
                                  hint='add {"task": "...", "classes": ["description of class 0", ...]}')
            examples = self.examples.setdefault(task, [])
            if self.limit is None or len(examples) < self.limit:
                examples.append((row["text"], _int_label(row, where, len(self.classes[task]),
                                                         f"of task {task[:40]!r}'s 'classes', from 0")))
        if empty := [t for t in self.classes if not self.examples.get(t)]:
            raise ConfigError(f"{self.data}: task(s) {', '.join(empty)} have classes but no examples",
                              hint='add examples {"task": "...", "text": "...", "label": 0}, or remove the task')
        tokenizer = self._tokenizer()
        _warn_cut(self.data, tokenizer, [t for rows in self.examples.values() for t, _ in rows], None,
                  self.model_dir, self.max_length)
        for task, classes in self.classes.items():
            refuse_alike(tokenizer, classes, where=f"{self.data}: task {task!r}", what="class",
                         directory=self.model_dir, max_length=fitted_length_of(self.model_dir, self.max_length),
                         special_tokens=True, truncate=True)  # as the encoder reads them: cut at its positions
        for task, classes in self.classes.items():  # (hp69b c10; task by task: hp70b c24)
            warn_unknown(tokenizer, list(classes), what="class descriptions",
                         max_length=fitted_length_of(self.model_dir, self.max_length),
                         where=f"{self.data}: the class descriptions of task {task!r}", stacklevel=4,
                         effect="the heads tell classes apart by how the encoder reads that token")

    def __call__(self, state: Mapping[str, torch.Tensor]) -> float:
        from .encoder import SentenceEncoder, build_head
        from .suite_eval import evaluate_encoder

        # the heads are built from this data's classes (and the encoder cut at its max_length): another file's, in
        # the same process, is another model (hp49 c05: b.jsonl was scored with a.jsonl's heads)
        classes = tuple((t, tuple(map(str, c))) for t, c in sorted(self.classes.items()))
        key = ("encoder", str(self.model_dir), str(_device(self.device)), self.max_length, classes)
        if key not in _MODELS:
            base = SentenceEncoder.from_pretrained(self.model_dir, max_length=self.max_length,
                                                   device=_device(self.device))
            heads = {t: build_head(base, c) for t, c in self.classes.items()}  # from the base, before any state
            _MODELS[key] = (base, heads)
        encoder, heads = _MODELS[key]
        state = _encoder_part(encoder.model, state)
        # a BertModel saved by save_pretrained holds its pooler, which mean pooling never reads and the encoder is
        # built without (hp40 L5: "the merged model has tensors the model built from the base does not")
        held = {name.split(".", 1)[0] for name in encoder.model.state_dict()}
        _load_state(encoder.model, {k: v for k, v in state.items() if not (k.startswith("pooler.") and "pooler" not in
                                                                            held)}, self.model_dir)
        return evaluate_encoder(encoder, self.examples, {t: heads[t] for t in self.examples},
                                batch_size=self.batch_size).mean


def _warn_broken(name: str, broken: int, total: int) -> None:
    """Examples whose logits were not finite score as wrong: said, since a score of 0 then means a merge that breaks
    the model's forward (weights far past the models'), not a merely worse one (hp44 c15: tune wrote an all-NaN
    model as its best, both points 0.0, without a word)."""
    if broken:
        share = "every one" if broken == total else f"{broken:,}"
        warnings.warn(MergeWarning(f"{name}: {share} of the {total:,} examples had non-finite logits (Inf or NaN) "
                                   "and were counted wrong: this candidate's weights overflow the model's forward "
                                   "(a scaling far past the models', or huge values in an input)"), stacklevel=3)


def _warn_cut(data: Path, tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, model_dir: Path,
              max_length: int) -> None:
    """How many examples the evaluator cuts to the tokens the model reads, said when it is made, as adapt and stats
    say it (hp42 D19: 101-word examples on a 64-position model, their label word last, all scored 0.5 without a
    word)."""
    limit = fitted_length_of(model_dir, max_length)
    warn_unknown(tokenizer, list(texts), max_length=limit, where=str(data), stacklevel=5,
                 effect="the scores rank merges on how they read that token")
    cut = count_cut(tokenizer, list(texts), list(pairs) if pairs is not None else None, max_length=limit)
    if cut:
        why = "the model's positions" if limit < max_length else "max_length"
        warnings.warn(MergeWarning(f"{data}: {cut:,} of the {len(texts):,} examples are longer than {limit:,} tokens "
                                   f"({why}) and are cut: the scores are of their first tokens only"), stacklevel=4)


def _encoder_part(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """A task model's weights (a BertForSequenceClassification's ``bert.*`` and ``classifier.*``) as the bare
    encoder's names: the architecture's base_model_prefix stripped, as transformers loads such a checkpoint into
    AutoModel, and the task head left out, which mean pooling never reads (hp41 C49: refused after the first merge as
    "the merged model has tensors the model built from the base does not")."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or any(name.startswith(prefix + ".") for name in model.state_dict()):
        return state
    if not any(name.startswith(prefix + ".") for name in state):
        return state
    return {name[len(prefix) + 1:]: value for name, value in state.items() if name.startswith(prefix + ".")}


BUILTIN_EVALUATORS: dict[str, type[_Scorer]] = {
    "classifier-accuracy": ClassifierAccuracy,
    "choice-accuracy": ChoiceAccuracy,
    "encoder-accuracy": EncoderAccuracy,
    "lm-perplexity": LMPerplexity,
}


def builtin_evaluator(spec: str, base: str | os.PathLike | Mapping[str, torch.Tensor], *,
                      device: str = "auto", **options: Any) -> _Scorer | None:
    """The built-in evaluator ``spec`` names (``NAME:FILE``) for models of ``base``'s architecture, or None when
    ``spec`` names none (a ``module:function`` of the user's). Its file is read and checked here.

    >>> score = builtin_evaluator("classifier-accuracy:val.jsonl", "base/")   # doctest: +SKIP
    >>> tiesmerge.tune("base/", ["a/", "b/"], "ties", score)                     # doctest: +SKIP
    """
    name, _, argument = spec.partition(":")
    if name not in BUILTIN_EVALUATORS:
        return None
    if not argument:
        raise ConfigError(f"--evaluator {spec!r}: {name} needs its file, as {name}:FILE")
    return BUILTIN_EVALUATORS[name](_model_dir(base), Path(argument), device=device, **options)


def builtin_names() -> Sequence[str]:
    return tuple(BUILTIN_EVALUATORS)
