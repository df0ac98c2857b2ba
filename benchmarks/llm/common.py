"""Prompts, examples, perplexity and the paths shared by the causal-LM benchmark's scripts."""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass

import torch

from tiesmerge.evaluation.rank_classification import ChoiceExample
from tiesmerge_bench import load_suite

TEXT_WORDS = 32  # words of each text kept in a prompt: short sequences keep CPU steps cheap
TEXT_CHARS = 200  # and at most this many characters (e-mails hold long URLs and headers)
SPLIT_SIZES = (2000, 500, 1000)  # the MiniLM benchmark's splits (train, validation, test), data seed 0


@dataclass(frozen=True)
class Prompt:
    """A task as prompted classification: the text in a template, one answer word per class."""

    template: str  # with {text}
    answers: dict[str, str]  # class name -> the answer's text (a leading space: it follows "Answer:")


PROMPTS = {
    "spam": Prompt("Email: {text}\nQuestion: is this email spam or ham (a normal email)?\nAnswer:",
                   {"ham": " ham", "spam": " spam"}),
    "foods": Prompt("Food review: {text}\nQuestion: is this a great (five-star) review or other?\nAnswer:",
                    {"great": " great", "other": " other"}),
    "opinion": Prompt("Word: {text}\nQuestion: is the feeling of this word positive or negative?\nAnswer:",
                      {"positive": " positive", "negative": " negative"}),
    "sotu": Prompt("State of the Union address: {text}\nQuestion: in which era was this given: early, civil war, "
                   "modern or recent?\nAnswer:", {}),  # filled below from the task's class names
}
TASKS = ("spam", "foods", "opinion")


def _short(text: str) -> str:
    words = text.split()
    short = " ".join(words[:TEXT_WORDS])[:TEXT_CHARS]
    return short + (" ..." if len(short) < len(" ".join(words)) else "")


def load_tasks(tasks=TASKS, seed: int = 0):
    return load_suite(list(tasks), seed=seed, sizes=SPLIT_SIZES)


def choice_examples(task, split: str, limit: int | None) -> list[ChoiceExample]:
    """The first ``limit`` examples of a split as rank-classification examples."""
    prompt = PROMPTS[task.name]
    answers = tuple(prompt.answers[c] for c in task.classes)
    rows = task.split(split)[:limit]
    return [ChoiceExample(prompt.template.format(text=_short(text)), answers, label) for text, label in rows]


def austen_passages(count: int, seed: int = 0) -> list[str]:
    """Held-out English prose: the first ``count`` passages of the austen task's test split (~60 words each
    from the six novels in the Debian package r-cran-janeaustenr); no model here is trained on them."""
    task = load_suite(["austen"], seed=seed, sizes=SPLIT_SIZES)["austen"]
    return [text for text, _ in task.test[:count]]


@torch.no_grad()
def perplexity(model, tokenizer, passages: list[str], batch_size: int = 16) -> float:
    """exp(mean negative log-likelihood per predicted token) over the passages, each scored alone."""
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    total, count = 0.0, 0
    for i in range(0, len(passages), batch_size):
        rows = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in passages[i:i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])  # (B, T)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])  # (B, T)
        logp = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)  # (B, T, V)
        token = logp[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)  # (B, T-1): token t given < t
        real = mask[:, 1:].bool()
        total -= float(token[real].sum())
        count += int(real.sum())
    return math.exp(total / count)


def hardware() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}
