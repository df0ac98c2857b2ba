"""Statistics of Hugging Face models from a JSON-lines file: what ``tiesmerge stats`` runs.

The data file holds one example per line: ``{"text": "...", "label": 2}`` (``text_pair`` for
sentence pairs; ``label`` is needed by the empirical and batched Fisher only). The Fisher
needs p(y|x), so it takes sequence classifiers (``*ForSequenceClassification``); the Gram
matrices need only a forward pass, so any model ``AutoModel`` loads will do. Other models
and losses go through the Python API (:func:`tiesmerge.stats.fisher_information`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from .files import Statistics
from .fisher import fisher_information
from .gram import gram_matrices

__all__ = ["read_jsonl", "hf_statistics"]


def read_jsonl(path: str | os.PathLike, *, limit: int | None = None, need_labels: bool = False) -> list[dict]:
    """The examples of a JSON-lines file, checked line by line."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the data file ({exc.strerror or exc})") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ConfigError(f"{path}:{number}: each line must be an object with a string 'text'",
                              hint='e.g. {"text": "a review", "label": 1}')
        if need_labels and (not isinstance(row.get("label"), int) or isinstance(row.get("label"), bool)):
            raise ConfigError(f"{path}:{number}: this Fisher needs an integer 'label' on every line",
                              hint="or use --fisher exact, which needs no labels")
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ConfigError(f"{path}: no examples")
    return rows


def _config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{model_dir}: no readable config.json ({exc})",
                              hint="--model takes a Hugging Face model directory") from None


def hf_statistics(kind: str, model_dir: str | os.PathLike, data: str | os.PathLike, *, fisher: str = "exact",
                  per_example: str = "loop", batch_size: int = 8, limit: int | None = None, max_length: int = 128,
                  device: str = "cpu", progress: bool = False) -> Statistics:
    """Fisher (``kind="fisher"``) or Gram (``"gram"``) statistics of an HF model on a JSONL file."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    architectures = _config(model_dir).get("architectures") or []
    classifier = any(str(a).endswith("ForSequenceClassification") for a in architectures)
    if kind == "fisher" and not classifier:
        raise ConfigError(f"{model_dir}: the Fisher needs p(y|x), and this model is not a sequence classifier "
                          f"(architectures: {', '.join(architectures) or 'none'})",
                          hint="for other models use tiesmerge.stats.fisher_information with your own logits function")
    rows = read_jsonl(data, limit=limit, need_labels=kind == "fisher" and fisher != "exact")
    loader = AutoModelForSequenceClassification if classifier else AutoModel
    model = loader.from_pretrained(model_dir).to(device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        pairs = [r["text_pair"] for r in chunk] if all("text_pair" in r for r in chunk) else None
        batch: dict[str, Any] = dict(tokenizer([r["text"] for r in chunk], pairs, padding=True, truncation=True,
                                               max_length=max_length, return_tensors="pt"))
        if all(isinstance(r.get("label"), int) for r in chunk):
            batch["labels"] = torch.tensor([r["label"] for r in chunk])
        batches.append({k: v.to(device) for k, v in batch.items()})

    def inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k != "labels"}

    if kind == "fisher":
        stats = fisher_information(model, batches, lambda m, b: m(**inputs(b)).logits, kind=fisher,
                                   targets=(lambda b: b["labels"]) if fisher != "exact" else None,
                                   per_example=per_example, progress=progress, model=model_dir)
    else:
        stats = gram_matrices(model, batches, lambda m, b: m(**inputs(b)),
                              token_mask=lambda b: b["attention_mask"].bool(), progress=progress, model=model_dir)
    stats.manifest.options.update({"data": str(data), "max_length": max_length, "batch_size": batch_size})
    return stats
