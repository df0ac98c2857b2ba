"""Tiny trainable models and their data, built here (random weights, no downloads), for the
statistics and evaluation tests: a torch classifier, a BERT sequence classifier's word-level
tokenizer and texts, a BERT sentence encoder. transformers and tokenizers are imported by the
functions that need them (the callers skip without them)."""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["tiny_classifier", "data", "batches", "logits", "CLASSIFIER_WORDS", "TEXTS", "save_word_tokenizer",
           "ENCODER_WORDS", "tiny_bert_encoder"]

# ------------------------------------------------------------------ statistics: a tiny classifier and data


def tiny_classifier(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def data(seed: int = 1, n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def logits(module: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return module(batch[0])


# ------------------------------------------------------------------ a BERT sequence classifier's vocabulary and data

CLASSIFIER_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film", "plot", "very", "not"]
TEXTS = [("good film", 0), ("bad plot", 1), ("very good plot", 0), ("not good", 1), ("very bad film", 2)]


def save_word_tokenizer(directory: str | Path) -> None:
    """A word-level tokenizer of CLASSIFIER_WORDS, saved as transformers loads it."""
    import tokenizers
    import transformers

    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(CLASSIFIER_WORDS)},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(directory)


# ------------------------------------------------------------------ a tiny BERT sentence encoder

ENCODER_WORDS = ("the cat sat on a mat dog ran far away bird sang song tree green red blue house small big "
                 "old new river fast slow sun moon star night day rain snow cold warm").split()


def tiny_bert_encoder(tokenizer, seed: int = 0, hidden: int = 32):
    """A 2-layer, ``hidden``-wide random BERT as a :class:`~tiesmerge.evaluation.encoder.SentenceEncoder`."""
    import transformers

    from tiesmerge.evaluation.encoder import SentenceEncoder

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=2 * hidden, max_position_embeddings=64)
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    return SentenceEncoder(model, tokenizer, max_length=32)
