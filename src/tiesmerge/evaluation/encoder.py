"""Sentence encoders with frozen cosine heads: the benchmark's stand-in for CLIP's text heads.

An encoder is a BERT-style model + attention-masked mean pooling + L2 normalisation (the
all-MiniLM-L6-v2 recipe; a sentence-transformers folder that declares CLS or max pooling is pooled
so). Each task's classifier is frozen: the normalised embeddings, by the
*base* encoder, of one description per class; logits = scale * cosine. Only the encoder is
fine-tuned and merged, as the paper's vision setting keeps CLIP's zero-shot heads fixed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["SentenceEncoder", "CosineHead", "mean_pool", "pool", "pooling_of", "build_head", "LOGIT_SCALE"]

LOGIT_SCALE = 20.0  # cosine similarities live in [-1, 1]; x20 gives a usable softmax temperature


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, D), (B, T) -> (B, D): the mean of the real tokens' states."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)


POOLINGS = ("mean", "cls", "max")  # sentence-transformers' modes tiesmerge's encoder reproduces


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """(B, T, D), (B, T) -> (B, D) by ``mode``: the real tokens' mean, the first token's state (CLS), or the real
    tokens' elementwise max."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(~mask.bool().unsqueeze(-1), torch.finfo(hidden.dtype).min).amax(1)
    return mean_pool(hidden, mask)


def pooling_of(directory: str | os.PathLike) -> str:
    """The pooling a sentence-transformers folder declares (modules.json -> its Pooling module's config.json), or
    "mean" where it declares none (a plain transformers folder: the all-MiniLM-L6-v2 recipe). A folder whose
    declared pooling tiesmerge's encoder does not reproduce (weighted mean, last token, several at once) is scored
    with mean pooling, said in a warning (hp42 D67: a CLS-pooling model was scored with mean pooling silently)."""
    import warnings

    from ..errors import CheckpointError, MergeWarning
    from ..limits import read_json
    from ..paths import inside

    directory = Path(directory)
    if not (directory / "modules.json").is_file():
        return "mean"
    try:
        modules = read_json(directory / "modules.json", "the sentence-transformers modules")
        entry = next((m for m in modules if isinstance(m, dict) and str(m.get("type", "")).endswith(".Pooling")),
                     None) if isinstance(modules, list) else None
        # modules the encoder does not apply (a Dense projection after the pooling): said, not left out silently
        # (hp45 c34: scored without the Dense, no word)
        skipped = sorted({str(m.get("type", "?")).rsplit(".", 1)[-1][:60] for m in modules if isinstance(m, dict)
                          and str(m.get("type", "")).rsplit(".", 1)[-1] not in ("Transformer", "Pooling", "Normalize")}
                         ) if isinstance(modules, list) else []
        if skipped:
            warnings.warn(MergeWarning(f"{directory}: its sentence-transformers modules {', '.join(skipped[:5])} are "
                                       "not applied by tiesmerge's encoder (transformer, pooling, normalization "
                                       "only): its scores are of the embeddings before them"), stacklevel=3)
        if entry is None or not isinstance(entry.get("path"), str):
            return "mean"
        folder = inside(directory / entry["path"], directory, "the Pooling module's folder")
        config = read_json(folder / "config.json", "the Pooling module's config")
    except (CheckpointError, OSError) as exc:  # unreadable: the encoder's own default, said (hp45 c61: a FIFO)
        warnings.warn(MergeWarning(f"{directory}: its sentence-transformers pooling settings cannot be read "
                                   f"({str(getattr(exc, 'message', exc))[:200]}): it is scored with mean pooling"),
                      stacklevel=3)
        return "mean"
    if not isinstance(config, dict):
        return "mean"
    modes = [m for m, key in (("cls", "pooling_mode_cls_token"), ("mean", "pooling_mode_mean_tokens"),
                              ("max", "pooling_mode_max_tokens"),
                              ("mean_sqrt_len", "pooling_mode_mean_sqrt_len_tokens"),
                              ("weightedmean", "pooling_mode_weightedmean_tokens"),
                              ("lasttoken", "pooling_mode_lasttoken")) if config.get(key) is True]
    if len(modes) == 1 and modes[0] in POOLINGS:
        return modes[0]
    if modes:
        warnings.warn(MergeWarning(f"{directory}: its sentence-transformers Pooling module declares "
                                   f"{' + '.join(modes)} pooling, which tiesmerge's encoder does not reproduce: it is "
                                   "scored with mean pooling"), stacklevel=3)
    return "mean"


class SentenceEncoder(torch.nn.Module):
    """A transformers encoder that maps texts to unit vectors.

    >>> enc = SentenceEncoder.from_pretrained("path/to/all-MiniLM-L6-v2")   # doctest: +SKIP
    >>> enc.encode(["a sentence"]).shape                                    # doctest: +SKIP
    torch.Size([1, 384])
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, max_length: int = 128, pooling: str = "mean") -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        from .loading import fitted_length

        self.max_length = fitted_length(model, max_length)  # never past the model's position table

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, state: Mapping[str, torch.Tensor] | None = None,
                        max_length: int = 128, device: str | torch.device = "cpu") -> SentenceEncoder:
        """Load an HF encoder directory; ``state`` (e.g. a merged state dict) replaces its weights."""
        from transformers import AutoModel, AutoTokenizer

        from ..paths import check_model_dir

        directory = check_model_dir(directory, "the encoder")  # transformers follows links: files checked first
        from .loading import check_vocabulary, from_pretrained, input_rows

        tokenizer = from_pretrained(AutoTokenizer, directory, "its tokenizer")
        model = from_pretrained(AutoModel, directory, add_pooling_layer=False) \
            if _is_bert(directory) else from_pretrained(AutoModel, directory)
        check_vocabulary(tokenizer, input_rows(model), directory)  # hp40 V1: before a forward's IndexError
        if state is not None:
            missing, unexpected = model.load_state_dict(dict(state), strict=False)
            real_missing = [k for k in missing if "position_ids" not in k]
            if real_missing or unexpected:
                raise ValueError(f"state does not fit {directory}: missing {real_missing[:3]}, "
                                 f"unexpected {unexpected[:3]}")
        return cls(model.to(device), tokenizer, max_length=max_length, pooling=pooling_of(directory))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        from .loading import encode

        batch = encode(self.tokenizer, list(texts), max_length=self.max_length)
        return {k: v.to(device) for k, v in batch.items()}

    def forward(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Tokenized batch -> (B, D) unit vectors (differentiable, for fine-tuning)."""
        hidden = self.model(**batch).last_hidden_state  # (B, T, D)
        return torch.nn.functional.normalize(pool(hidden, batch["attention_mask"], self.pooling), dim=-1)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 64) -> torch.Tensor:
        """(N, D) unit vectors; texts are batched by length so padding stays small."""
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        chunks = []
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            chunks.append((idx, self(self.tokenize([texts[j] for j in idx])).float().cpu()))
        width = chunks[0][1].shape[1] if chunks else self.model.config.hidden_size
        out = torch.empty(len(texts), width)
        for idx, emb in chunks:
            out[idx] = emb
        self.train(was_training)
        return out


def _is_bert(directory: Path) -> bool:
    import json

    try:
        return json.loads((directory / "config.json").read_text()).get("model_type") == "bert"
    except (OSError, ValueError, RecursionError, AttributeError):
        return False


@dataclass(frozen=True)
class CosineHead:
    """A frozen classifier: logits = scale * (unit embedding @ class_embeddings.T)."""

    class_embeddings: torch.Tensor  # (C, D), unit rows
    scale: float = LOGIT_SCALE

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, D) -> (B, C)."""
        return self.scale * embeddings @ self.class_embeddings.to(embeddings.device, embeddings.dtype).T


def build_head(base_encoder: SentenceEncoder, descriptions: Sequence[str], *, scale: float = LOGIT_SCALE) -> CosineHead:
    """The zero-shot head of one task, from the *base* encoder's embeddings of its class descriptions."""
    return CosineHead(base_encoder.encode(list(descriptions)), scale)
