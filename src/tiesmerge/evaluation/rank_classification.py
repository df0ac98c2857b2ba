"""Rank classification for language models: the paper's text-task protocol.

Every answer choice is scored by the sum of its tokens' log-probabilities given the prompt;
the prediction is the highest-scoring choice. Works for causal LMs (prompt and choice are one
sequence; only the choice's tokens are scored) and for encoder-decoder LMs (the prompt is the
encoder input, the choice the decoder target).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .loading import CHARS_PER_TOKEN_BOUND, clipped, clipped_tail, fitted_length

__all__ = ["ChoiceExample", "MAX_CHOICES", "check_choice_count", "choice_hits", "fit_choice",
           "rank_classification_accuracy", "score_choices"]

# answer choices one prompt may have: every choice is a sequence through the model at every step, so 20,000 of them
# took a minute and 5 GB on a tiny model (hostile pass 34, D44); multiple-choice tasks have a handful
MAX_CHOICES = 1000
NO_LIMIT = 1 << 30  # a model that declares no position count: only max_length bounds the sequences


def check_choice_count(count: int, where: str) -> None:
    if count > MAX_CHOICES:
        raise ConfigError(f"{where}: {count:,} answer choices; rank classification scores each as a sequence through "
                          f"the model, and at most {MAX_CHOICES:,} are taken",
                          hint="a task with that many classes fits a classifier or an encoder with class "
                               "descriptions better than answer choices")


def fit_choice(prompt: list[int], choice: list[int], limit: int, shown: str, *, decoder: bool = False) -> list[int]:
    """The prompt's tokens kept before ``choice`` in a sequence of at most ``limit`` tokens (its first tokens go; at
    least one stays, to predict the choice's first token). A choice that leaves no room is an error naming it: it
    would be scored past the model's positions, or cut into another answer (a 20,000-token choice made the forward
    ask for 12.8 GB, D45). ``decoder``: an encoder-decoder's target, alone in the decoder's ``limit`` positions (the
    prompt is the encoder's input, no token of it precedes the choice: hp40 L7)."""
    if len(choice) > limit if decoder else len(choice) >= limit:
        # a long choice was cut to what `limit` tokens can cover before tokenizing: its count is then a lower bound
        count = f"at least {len(choice):,}" if len(shown) > limit * CHARS_PER_TOKEN_BOUND else f"{len(choice):,}"
        why = f"counted with its special tokens, that passes the {limit:,} positions of the decoder" if decoder else \
            f"with a prompt token before it that passes the {limit:,} tokens a sequence may have"
        raise ConfigError(f"answer choice {shown[:60]!r} is {count} tokens; {why} (max_length, or the model's "
                          "positions)",
                          hint="shorten the choice: rank classification scores the whole choice, so it is not cut")
    return [] if decoder else prompt[-(limit - len(choice)):]


@dataclass(frozen=True)
class ChoiceExample:
    prompt: str
    choices: tuple[str, ...]
    label: int  # index of the correct choice


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


@torch.no_grad()
def _score_causal(model, tokenizer, pairs: list[tuple[str, str]], device: torch.device, limit: int) -> list[float]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows, starts = [], []
    for prompt, choice in pairs:
        # tokenized after a cut to what `limit` tokens can cover: a fast tokenizer encodes a whole text first
        p = tokenizer(clipped_tail(prompt, limit), add_special_tokens=True)["input_ids"]
        c = tokenizer(clipped(choice, limit), add_special_tokens=False)["input_ids"]
        if not p:  # the first choice token would have no position predicting it (the slice below wraps to -1)
            raise ValueError(f"prompt {prompt!r} has no tokens, so the choice {choice!r} cannot be scored; "
                             "give a non-empty prompt or a tokenizer that adds a BOS token")
        p = fit_choice(p, c, limit, choice)
        rows.append(p + c)
        starts.append(len(p))
    ids = _pad(rows, pad).to(device)  # (B, T)
    mask = _pad([[1] * len(r) for r in rows], 0).to(device)
    logprobs = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # (B, T, V)
    # token t is predicted by position t-1
    token_lp = logprobs[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)  # (B, T-1)
    scores = []
    for b, (row, start) in enumerate(zip(rows, starts)):
        scores.append(float(token_lp[b, start - 1:len(row) - 1].sum()))
    return scores


@torch.no_grad()
def _score_seq2seq(model, tokenizer, pairs: list[tuple[str, str]], device: torch.device, limit: int) -> list[float]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    enc = tokenizer([clipped(p, limit) for p, _ in pairs], return_tensors="pt", padding=True, truncation=True,
                    max_length=limit).to(device)  # the prompt is the encoder's input: its end may go
    targets = [tokenizer(clipped(c, limit + 1), add_special_tokens=True)["input_ids"] for _, c in pairs]
    for (_, choice), target in zip(pairs, targets):
        fit_choice([], target, limit, choice, decoder=True)  # the decoder's target, whole
    labels = _pad(targets, -100).to(device)  # (B, L), -100 ignored
    logits = model(**enc, labels=labels).logits.float()  # (B, L, V)
    logprobs = logits.log_softmax(-1)
    safe = labels.clamp_min(0)
    token_lp = logprobs.gather(2, safe[:, :, None]).squeeze(2) * (labels != -100)  # (B, L)
    del pad
    return token_lp.sum(1).tolist()


def score_choices(model, tokenizer, examples: Sequence[ChoiceExample], *, batch_size: int = 16,
                  device: str | torch.device | None = None, max_length: int | None = None) -> list[list[float]]:
    """Per example, the summed log-probability of each choice. A sequence holds at most ``max_length`` tokens and
    never more than the model's positions: a long prompt loses its first tokens, a choice is never cut."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    scorer = _score_seq2seq if seq2seq else _score_causal
    limit = fitted_length(model, max_length if max_length is not None else NO_LIMIT)
    for k, ex in enumerate(examples):
        check_choice_count(len(ex.choices), f"example {k + 1}")
    pairs = [(ex.prompt, choice) for ex in examples for choice in ex.choices]
    flat: list[float] = []
    model.eval()
    for i in range(0, len(pairs), batch_size):
        flat += scorer(model, tokenizer, pairs[i:i + batch_size], device, limit)
    out, k = [], 0
    for ex in examples:
        out.append(flat[k:k + len(ex.choices)])
        k += len(ex.choices)
    return out


def rank_classification_accuracy(model, tokenizer, examples: Sequence[ChoiceExample], **kwargs) -> float:
    """Share of examples whose correct choice has the highest summed log-probability."""
    if not examples:
        raise ValueError("no examples to evaluate")
    hits, _ = choice_hits(score_choices(model, tokenizer, examples, **kwargs), examples)
    return hits / len(examples)


def choice_hits(scores: Sequence[Sequence[float]], examples: Sequence[ChoiceExample]) -> tuple[int, int]:
    """(examples whose correct choice scores highest, examples with a NaN score). A NaN score (a diverged merge's
    logits) makes its example wrong, not a win of its first choice (hp43 c08)."""
    broken = [any(math.isnan(x) for x in s) for s in scores]
    hits = sum(int(max(range(len(s)), key=s.__getitem__) == ex.label and not bad)
               for s, ex, bad in zip(scores, examples, broken))
    return hits, sum(broken)
