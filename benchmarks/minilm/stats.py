"""Fisher and Gram statistics of the benchmark's task encoders, cached like the fine-tuned models.

Each task's statistics come from its own fine-tuned encoder on the first ``examples`` of its
validation split: the exact diagonal Fisher of p(y|x) = softmax(head(encoder(x))) over the
task's classes, and the Gram matrices of every Linear layer's inputs over the real (unpadded)
tokens. Both are computed by tiesmerge.stats and written as statistics directories.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from common import CACHE, MAX_LENGTH, load_encoder

from tiesmerge.evaluation.encoder import CosineHead, SentenceEncoder, mean_pool
from tiesmerge.stats import fisher_information, gram_matrices, save_stats

BATCH = 8  # examples per batch (padding is per batch; the Fisher is computed one example at a time)


def _batches(encoder: SentenceEncoder, examples: Sequence[tuple[str, int]]) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches, sorted by length so padding stays small; labels ride along."""
    ordered = sorted(examples, key=lambda e: len(e[0]))
    out = []
    for i in range(0, len(ordered), BATCH):
        chunk = ordered[i:i + BATCH]
        batch = encoder.tokenize([t for t, _ in chunk])
        batch["labels"] = torch.tensor([y for _, y in chunk], device=batch["input_ids"].device)
        out.append(batch)
    return out


def _logits_fn(head: CosineHead) -> Callable:
    """(bert, batch) -> (B, C) logits through the frozen head, runnable under torch.func.vmap.

    transformers builds its attention mask with a data-dependent branch (`mask.all()`), which
    vmap refuses; an additive (B, 1, T, T) float mask is used as given, with no branch."""
    def logits(bert: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        mask = batch["attention_mask"]  # (B, T)
        length = mask.shape[-1]
        additive = (1.0 - mask.float()) * torch.finfo(torch.float32).min  # (B, T): 0 or -inf-ish
        additive = additive[:, None, None, :].expand(-1, 1, length, length)  # (B, 1, T, T)
        hidden = bert(input_ids=batch["input_ids"], attention_mask=additive).last_hidden_state  # (B, T, D)
        embedding = torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)  # (B, D)
        return head.logits(embedding)  # (B, C)
    return logits


def stats_dir(kind: str, task: str, model_dir: Path, head: CosineHead, examples: Sequence[tuple[str, int]],
              device: str, log=print) -> Path:
    """Compute (or reuse) one task model's statistics directory."""
    key = hashlib.sha256(json.dumps([kind, str(model_dir), MAX_LENGTH, list(examples),
                                     head.class_embeddings.tolist()[:1]]).encode()).hexdigest()[:12]
    out = CACHE / "stats" / f"{kind}-{task}-{key}"
    if (out / "tiesmerge_stats.json").is_file():
        return out
    encoder = load_encoder(model_dir, device)
    batches = _batches(encoder, examples)
    if kind == "fisher":
        # per_example="loop": on the CPU, torch has no vmap batching rule for SDPA attention, so a
        # loop with batched per-class backward passes is faster here; both give the same numbers.
        # embedding_rows: BertModel uses its embeddings only through nn.Embedding (no tied head)
        stats = fisher_information(encoder.model, batches, _logits_fn(head), kind="exact", per_example="loop",
                                   embedding_rows=True, model=model_dir, progress=True)
    else:
        def forward(bert: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
            bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

        stats = gram_matrices(encoder.model, batches, forward, token_mask=lambda b: b["attention_mask"].bool(),
                              model=model_dir, progress=True)
    save_stats(out, stats, force=True)
    log(f"  {kind} statistics of {task}: {stats.manifest.examples} examples -> {out}")
    return out
