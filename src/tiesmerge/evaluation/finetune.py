"""Fine-tune a sentence encoder against frozen cosine heads (the benchmark's task models).

Only the encoder trains; each task's head stays the base encoder's embedding of its class
descriptions, so every fine-tuned encoder remains compatible with every head, as CLIP's
text-derived heads are in the paper's vision experiments. Multitask training mixes
single-task batches from every task.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .encoder import CosineHead, SentenceEncoder

__all__ = ["TrainConfig", "TrainLog", "finetune"]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    lr: float = 3e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1  # linear warm-up, then linear decay to 0
    seed: int = 0


@dataclass(frozen=True)
class TrainLog:
    steps: int
    seconds: float
    examples: int
    final_loss: float


def _batches(examples: Mapping[str, Sequence[tuple[str, int]]], batch_size: int, rng: random.Random
             ) -> list[tuple[str, list[tuple[str, int]]]]:
    """One epoch of single-task batches, shuffled within and across tasks."""
    batches = []
    for task, rows in examples.items():
        order = list(rows)
        rng.shuffle(order)
        batches += [(task, order[i:i + batch_size]) for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def finetune(encoder: SentenceEncoder, heads: Mapping[str, CosineHead],
             examples: Mapping[str, Sequence[tuple[str, int]]], config: TrainConfig = TrainConfig(), *,
             on_step: Callable[[int, int, float], None] | None = None) -> TrainLog:
    """Train ``encoder`` in place with AdamW on cross-entropy through the frozen heads."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    epochs = [_batches(examples, config.batch_size, rng) for _ in range(config.epochs)]
    total = sum(len(e) for e in epochs)
    params = [p for p in encoder.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on biases and norms
    rest = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    warmup = max(1, int(total * config.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    encoder.train()
    started = time.perf_counter()
    step, loss_value, seen = 0, float("nan"), 0
    for batches in epochs:
        for task, batch in batches:
            texts = [t for t, _ in batch]
            labels = torch.tensor([y for _, y in batch], device=next(encoder.parameters()).device)
            logits = heads[task].logits(encoder(encoder.tokenize(texts)))  # (B, C)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            seen += len(batch)
            loss_value = float(loss.detach())
            if on_step is not None:
                on_step(step, total, loss_value)
    encoder.eval()
    return TrainLog(step, time.perf_counter() - started, seen, loss_value)
