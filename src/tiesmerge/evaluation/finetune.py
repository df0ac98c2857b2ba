"""Fine-tune a sentence encoder against frozen cosine heads (the benchmark's task models).

Only the encoder trains; each task's head stays the base encoder's embedding of its class
descriptions, so every fine-tuned encoder remains compatible with every head, as CLIP's
text-derived heads are in the paper's vision experiments. Multitask training mixes
single-task batches from every task.

With a ``validate`` callable, every epoch ends with a validation score; the encoder keeps the
weights of its best-scoring epoch (early stopping: training stops once ``patience`` epochs in a
row fail to beat the best), and the log carries the per-epoch curve (mean train loss, score).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, EvaluatorError, TrainingError
from .encoder import CosineHead, SentenceEncoder
from .loading import warn_unknown
from .train_checkpoint import (
    check_checkpoint_path,
    check_training_state,
    load_training_state,
    remove_dead_partials,
    run_fingerprint,
    save_training_state,
)

__all__ = ["TrainConfig", "TrainLog", "EpochRecord", "finetune"]


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2  # the most epochs; early stopping may end sooner
    lr: float = 3e-5
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1  # linear warm-up, then linear decay to 0 over all ``epochs``
    seed: int = 0
    patience: int = 0  # with ``validate``: stop after this many epochs without a new best (0: never stop early)


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # 1-based
    train_loss: float  # mean over the epoch's batches
    validation: float | None  # the ``validate`` score after this epoch (None without ``validate``)
    seconds: float  # training + validation time of this epoch


@dataclass(frozen=True)
class TrainLog:
    steps: int
    seconds: float
    examples: int
    final_loss: float
    curve: tuple[EpochRecord, ...] = ()
    best_epoch: int | None = None  # the epoch whose weights the encoder holds (None: the last, no validation)
    best_validation: float | None = None


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


MAX_EPOCHS = 100_000  # the batches of every epoch are drawn up front
_SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: no tokenizer takes it


def _check_training(encoder: SentenceEncoder, heads: Mapping[str, CosineHead],
                    examples: Mapping[str, Sequence[tuple[str, int]]], config: TrainConfig) -> None:
    """The settings, and every example against its task's head, before any step (hp64b c25: a task without a head
    was a bare KeyError, a label past the classes torch's IndexError, batch_size 0 a ValueError of range(), an lr of
    NaN torch's own words; a warm-up fraction of 5 and no examples at all ran silently)."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    problems = []
    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not whole(config.epochs) or not 1 <= config.epochs <= MAX_EPOCHS:  # every epoch's order is drawn up front
        # (hp66b c14: 10**8 epochs drew for minutes, then a MemoryError)
        problems.append(f"TrainConfig.epochs must be a whole number from 1 to {MAX_EPOCHS:,}, got {config.epochs!r}")
    if not whole(config.patience) or config.patience < 0:
        problems.append(f"TrainConfig.patience must be a whole number >= 0, got {config.patience!r}")
    if not whole(config.seed) or not 0 <= config.seed < 2**63:  # (hp66b c11-c13: torch.manual_seed's bare errors)
        problems.append(f"TrainConfig.seed must be a whole number from 0 to 2**63 - 1, got {str(config.seed)[:40]!r}")
    if not isinstance(config.batch_size, int) or isinstance(config.batch_size, bool) or config.batch_size < 1:
        problems.append(f"TrainConfig.batch_size must be a whole number >= 1, got {config.batch_size!r}")
    if not number(config.lr) or config.lr <= 0:
        problems.append(f"TrainConfig.lr must be a finite number > 0, got {config.lr!r}")
    if not number(config.weight_decay) or config.weight_decay < 0:
        problems.append(f"TrainConfig.weight_decay must be a finite number >= 0, got {config.weight_decay!r}")
    if not number(config.warmup_fraction) or not 0 <= config.warmup_fraction <= 1:
        problems.append(f"TrainConfig.warmup_fraction must be a fraction in [0, 1], got {config.warmup_fraction!r}")
    if problems:
        raise ConfigError(problems)
    for task, rows in examples.items():
        if not isinstance(rows, Sequence) or isinstance(rows, (str, bytes)):  # an iterator is read once (hp66b c16)
            raise ConfigError(f"examples[{task!r}] is a {type(rows).__name__}, not a list of (text, label) pairs")
    if not any(len(rows) for rows in examples.values()):
        raise ConfigError("there are no examples to train on")
    width = getattr(getattr(getattr(encoder, "model", None), "config", None), "hidden_size", None)
    for task, rows in examples.items():
        if task not in heads:
            raise ConfigError(f"task {task!r} has no head (the heads are for {', '.join(map(repr, heads)) or 'none'})")
        head = heads[task].class_embeddings
        if isinstance(width, int) and (head.dim() != 2 or head.shape[1] != width):  # (hp66b c30: mat1 and mat2)
            raise ConfigError(f"task {task!r}: its head is {tuple(head.shape)}, but the encoder's embeddings have "
                              f"{width} dimensions", hint="build the heads from this encoder (build_head)")
        if not bool(torch.isfinite(head).all()) or not math.isfinite(float(heads[task].scale)):
            raise ConfigError(f"task {task!r}: its head holds values that are not finite")
        classes = int(heads[task].class_embeddings.shape[0])
        for k, row in enumerate(rows):
            where = f"task {task!r}, example {k + 1}"
            if not isinstance(row, (tuple, list)) or len(row) != 2:
                raise ConfigError(f"{where} is {str(row)[:60]!r}, not a (text, label) pair")
            text, label = row
            if not isinstance(text, str) or not text or _SURROGATE.search(text):  # (hp66b c15, c17: bare errors, or
                # "the model fails in its forward pass" blamed on its config)
                raise ConfigError(f"{where}: the text is {str(text)[:40]!r}, not a non-empty text of UTF-8 characters")
            if not isinstance(label, int) or isinstance(label, bool):
                raise ConfigError(f"{where}: label {label!r} is a {type(label).__name__}, not a Python int "
                                  "(a numpy integer: int(label))")  # (hp66b c18: "not a class index" of 0)
            if not 0 <= label < classes:
                raise ConfigError(f"{where}: label {label!r} is not a class index of its head (0 to {classes - 1})")


def finetune(encoder: SentenceEncoder, heads: Mapping[str, CosineHead],
             examples: Mapping[str, Sequence[tuple[str, int]]], config: TrainConfig = TrainConfig(), *,
             on_step: Callable[[int, int, float], None] | None = None,
             validate: Callable[[SentenceEncoder], float] | None = None,
             on_epoch: Callable[[EpochRecord], None] | None = None,
             checkpoint: str | os.PathLike | None = None, checkpoint_seconds: float = 300.0) -> TrainLog:
    """Train ``encoder`` in place with AdamW on cross-entropy through the frozen heads.

    ``validate(encoder)`` (higher is better, e.g. validation accuracy) runs after every epoch in
    eval mode; the encoder ends with its best epoch's weights. Without it, it ends with the last.

    ``checkpoint``: a file the training state is saved to every ``checkpoint_seconds`` (weights, AdamW's
    and the schedule's state, torch's random state, the epoch curve and the best epoch's weights), and
    resumed from when it exists: a run killed part-way (an hour-long multitask model on a CPU) goes on
    from its last save and ends with the weights an unbroken run ends with. The caller removes it
    once the model is saved. Read with ``weights_only`` (no code runs).
    """
    _check_training(encoder, heads, examples, config)
    tokenizer = getattr(encoder, "tokenizer", None)
    for task, rows in examples.items() if tokenizer is not None else ():  # as tune, stats and adapt say it (hp65b
        # c27), task by task: a whole task of unknown words after a larger one was not in the sample (hp66b c35)
        warn_unknown(tokenizer, [t for t, _ in rows], max_length=int(getattr(encoder, "max_length", 128)),
                     where=f"the training examples of task {task!r}",
                     effect="the encoder learns to read that token, not the texts")
    fingerprint = ""
    if checkpoint is not None:  # checked before any training, not at its first save
        checkpoint = check_checkpoint_path(checkpoint, checkpoint_seconds)
        remove_dead_partials(checkpoint)  # a killed save's staged file, beside it
        fingerprint = run_fingerprint(config, examples, {t: int(h.class_embeddings.shape[0]) for t, h in
                                                          heads.items() if t in examples},
                                      shapes={k: tuple(v.shape) for k, v in encoder.state_dict().items()},
                                      validated=validate is not None,
                                      tensors=[*(v for _, v in sorted(encoder.state_dict().items())),
                                               *(heads[t].class_embeddings for t in sorted(examples))])
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    # every epoch's order is drawn up front, so a run stopped early saw the same batches as the
    # first epochs of a longer run with the same seed
    epochs = [_batches(examples, config.batch_size, rng) for _ in range(config.epochs)]
    total = sum(len(e) for e in epochs)
    params = [p for p in encoder.parameters() if p.requires_grad]
    if not params:  # (hp66b c43: autograd's bare "does not require grad" at the first backward)
        raise ConfigError("the encoder has no trainable parameter (every one has requires_grad False)",
                          hint="unfreeze the layers to fine-tune (param.requires_grad_(True))")
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on biases and norms
    rest = [p for p in params if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=config.lr)
    warmup = max(1, int(total * config.warmup_fraction))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup))))
    device = next(encoder.parameters()).device
    encoder.train()
    started = time.perf_counter()
    step, loss_value, seen = 0, float("nan"), 0
    curve: list[EpochRecord] = []
    best_epoch, best_score, best_state, stale = None, None, None, 0
    resumed: dict | None = None
    if checkpoint is not None and os.path.exists(checkpoint):
        resumed = load_training_state(checkpoint, fingerprint)
        check_training_state(resumed, checkpoint, epochs=[len(e) for e in epochs], expected=encoder.state_dict(),
                             fresh={"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
                             validated=validate is not None, max_batch=config.batch_size)
        encoder.load_state_dict(resumed["encoder"])
        try:  # their own contents: torch checks them as it loads them
            optimizer.load_state_dict(resumed["optimizer"])
            schedule.load_state_dict(resumed["schedule"])
            torch.set_rng_state(resumed["rng"])  # (hp66b c09: "Invalid mt19937 state", bare)
            if device.type == "cuda" and resumed.get("cuda_rng") is not None:  # dropout on CUDA draws from the
                # device's own generator, which torch.manual_seed re-seeded (hp67b c34)
                torch.cuda.set_rng_state(resumed["cuda_rng"], device)
            elif device.type == "cuda":
                import warnings

                from ..errors import MergeWarning

                warnings.warn(MergeWarning(f"{checkpoint}: saved by a run on the CPU, resumed on {device}: the "
                                           "remaining steps' dropout draws differ from an unbroken run's"),
                              stacklevel=2)
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise ConfigError(f"{checkpoint}: the training checkpoint is damaged (the optimizer's, the schedule's "
                              f"or the random state: {type(exc).__name__}: {str(exc)[:120]})",
                              hint="remove it (or name another checkpoint) to train from the start") from None
        step, loss_value, seen = resumed["step"], resumed["loss_value"], resumed["seen"]
        curve = [EpochRecord(*r) for r in resumed["curve"]]
        best_epoch, best_score, stale = resumed["best_epoch"], resumed["best_score"], resumed["stale"]
        best_state = resumed["best_state"]
        started -= resumed["seconds"]
    saved_at = time.perf_counter()

    def save(index: int, done: int, losses: list[float], epoch_seconds: float) -> None:
        state = {"fingerprint": fingerprint, "encoder": encoder.state_dict(),
                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(), "rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                 "step": step, "loss_value": loss_value, "seen": seen, "epoch": index, "done": done,
                 "losses": losses, "epoch_seconds": epoch_seconds,
                 "curve": [dataclasses.astuple(r) for r in curve], "best_epoch": best_epoch,
                 "best_score": best_score, "stale": stale, "best_state": best_state,
                 "seconds": time.perf_counter() - started}
        save_training_state(checkpoint, state)

    for index, batches in enumerate(epochs, start=1):
        if index <= len(curve):  # an epoch the resumed run finished
            continue
        epoch_started, losses = time.perf_counter(), []
        skip = 0
        if resumed is not None and resumed["epoch"] == index:  # part-way through this epoch
            skip, losses = resumed["done"], list(resumed["losses"])
            epoch_started -= resumed["epoch_seconds"]
        for done, (task, batch) in enumerate(batches):
            if done < skip:
                continue
            texts = [t for t, _ in batch]
            labels = torch.tensor([y for _, y in batch], device=device)
            logits = heads[task].logits(encoder(encoder.tokenize(texts)))  # (B, C)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            if not bool(torch.isfinite(loss)):  # NaN heads, an infinite scale, a huge lr, float16 weights: the
                # weights would end NaN without a word (hp66b c27-c29, c44)
                raise TrainingError(f"the training loss is {float(loss)} at step {step + 1} (task {task!r}): the "
                                    "encoder's weights or the heads overflowed",
                                    hint="lower the learning rate, check the heads' values, and train a float16 "
                                         "encoder in float32")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            step += 1
            seen += len(batch)
            loss_value = float(loss.detach())
            losses.append(loss_value)
            if on_step is not None:
                on_step(step, total, loss_value)
            due = checkpoint is not None and time.perf_counter() - saved_at >= checkpoint_seconds
            if due and done + 1 < len(batches):  # (the epoch's last batch: saved after its validation, below)
                save(index, done + 1, losses, time.perf_counter() - epoch_started)
                saved_at = time.perf_counter()
        score = None
        if validate is not None:
            encoder.eval()
            from ..tuning.evaluator import read_score  # (here: the tuning package imports its search and reports)

            try:  # numpy and torch scalars, Decimal too, as tune's evaluators return them (hp68b c16); a NaN
                # never loses "score > best" and never wins it: epoch 1 kept for good (hp65b c06, c07)
                score = read_score(validate(encoder), f"validate (after epoch {index})", finite=True)
            except EvaluatorError as exc:
                raise ConfigError(exc.message, hint="return a score (higher is better), e.g. the validation accuracy"
                                  ) from None
            encoder.train()
        record = EpochRecord(index, sum(losses) / max(1, len(losses)), score, time.perf_counter() - epoch_started)
        curve.append(record)
        if on_epoch is not None:
            on_epoch(record)
        if score is None:
            continue
        if best_score is None or score > best_score:
            best_epoch, best_score, stale = index, score, 0
            # a CPU copy: the best weights must survive the epochs that follow
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in encoder.state_dict().items()}
        else:
            stale += 1
            if config.patience and stale >= config.patience:
                break
        if checkpoint is not None and index < len(epochs):  # the epoch's end, its validation done: a safe point
            save(index + 1, 0, [], 0.0)
            saved_at = time.perf_counter()
    if best_state is not None and best_epoch != len(curve):
        encoder.load_state_dict(best_state)
    encoder.eval()
    return TrainLog(step, time.perf_counter() - started, seen, loss_value, tuple(curve), best_epoch, best_score)
