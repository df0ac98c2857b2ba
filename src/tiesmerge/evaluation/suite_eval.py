"""Accuracy of an encoder on a task suite, and accuracy normalized by the fine-tuned models'."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import MergeWarning
from .encoder import CosineHead, SentenceEncoder

__all__ = ["SuiteResult", "task_accuracy", "evaluate_encoder"]


@dataclass(frozen=True)
class SuiteResult:
    """Per-task accuracy (fractions in [0, 1]) of one model on one split."""

    accuracy: Mapping[str, float]

    @property
    def mean(self) -> float:
        return sum(self.accuracy.values()) / len(self.accuracy)

    def normalized(self, reference: SuiteResult) -> dict[str, float]:
        """Accuracy / the reference's (the task's own fine-tuned model), per task."""
        return {t: a / reference.accuracy[t] if reference.accuracy[t] else float("nan")
                for t, a in self.accuracy.items()}

    def normalized_mean(self, reference: SuiteResult) -> float:
        values = self.normalized(reference)
        return sum(values.values()) / len(values)


def task_accuracy(encoder: SentenceEncoder, head: CosineHead, examples: Sequence[tuple[str, int]], *,
                  batch_size: int = 64) -> float:
    if not examples:
        raise ValueError("no examples to evaluate")
    embeddings = encoder.encode([text for text, _ in examples], batch_size=batch_size)  # (N, D)
    logits = head.logits(embeddings)  # (N, C)
    labels = torch.tensor([label for _, label in examples])
    # an example whose logits are not finite (a diverged merge's embeddings) is wrong, not argmax's class 0 (hp43 c08)
    finite = torch.isfinite(logits).all(-1)  # (N,)
    broken = int((~finite).sum())
    if broken:  # said: a 0 then means a broken forward, not a worse model (hp44 c15)
        share = "every one" if broken == len(examples) else f"{broken:,}"
        warnings.warn(MergeWarning(f"encoder accuracy: {share} of a task's {len(examples):,} examples had non-finite "
                                   "logits (Inf or NaN) and were counted wrong: the weights overflow the encoder's "
                                   "forward (a scaling far past the models', or huge values in an input)"),
                      stacklevel=2)
    return float(((logits.argmax(-1) == labels) & finite).float().mean())


def evaluate_encoder(encoder: SentenceEncoder, splits: Mapping[str, Sequence[tuple[str, int]]],
                     heads: Mapping[str, CosineHead], *, batch_size: int = 64) -> SuiteResult:
    """Accuracy on every task of ``splits`` (task -> examples), each with its own frozen head."""
    return SuiteResult({task: task_accuracy(encoder, heads[task], examples, batch_size=batch_size)
                        for task, examples in splits.items()})
