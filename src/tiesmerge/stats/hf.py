"""Statistics of Hugging Face models from a JSON-lines file: what ``tiesmerge stats`` runs.

The data file holds one example per line: ``{"text": "...", "label": 2}`` (``text_pair`` for
sentence pairs; ``label`` is needed by the empirical and batched Fisher only). The Fisher
needs p(y|x), so it takes sequence classifiers (``*ForSequenceClassification``); the Gram
matrices need only a forward pass, so any model ``AutoModel`` loads will do. Other models
and losses go through the Python API (:func:`tiesmerge.stats.fisher_information`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..evaluation.loading import (
    align_pad_token,
    check_vocabulary,
    config_num_labels,
    count_cut,
    encode,
    fitted_length,
    forward_checked,
    from_pretrained,
    input_rows,
    is_encoder_decoder,
    refuse_converted,
    refuse_multi_label,
    warn_unknown,
)
from ..io.checkpoint import open_checkpoint
from ..limits import check_text_pairs, read_json, read_json_lines, warn_unread_keys
from ..paths import check_input, check_model_dir
from .files import Statistics
from .fisher import fisher_information
from .gram import gram_matrices

__all__ = ["read_jsonl", "hf_statistics"]

_MAX_DATA_BYTES = 4 << 30  # a JSON-lines file of examples, read whole


def read_jsonl(path: str | os.PathLike, *, limit: int | None = None, need_labels: bool = False,
               num_labels: int | None = None, empty_texts: bool = False, unread_said: bool = True) -> list[dict]:
    """The examples of a JSON-lines file, checked line by line (``num_labels``: each label must be
    a class of the model, 0 .. num_labels - 1; -1 would silently pick the last class; ``empty_texts``: the caller
    checks empty texts itself, in its own terms)."""
    path = Path(path)
    hint = 'a JSON-lines file: one {"text": ..., "label": ...} object per line'
    rows = []
    numbered = read_json_lines(path, "the data file", max_bytes=_MAX_DATA_BYTES, error=ConfigError, hint=hint,
                               limit=limit)
    for number, row in numbered:
        if not isinstance(row.get("text"), str) and isinstance(row.get("prompt"), str):  # hp36 C51
            raise ConfigError(f"{path}:{number}: a 'prompt' line (choice-accuracy's rows); these rows name the prompt "
                              "'text'", hint='e.g. {"text": "Is it spam? ", "choices": ["yes", "no"], "label": 1}')
        if not isinstance(row.get("text"), str):
            raise ConfigError(f"{path}:{number}: each line must be an object with a string 'text'",
                              hint='e.g. {"text": "a review", "label": 1}')
        if "text_pair" in row and not isinstance(row["text_pair"], str):  # the tokenizer takes text, nothing else
            raise ConfigError(f"{path}:{number}: 'text_pair' must be a string, got {type(row['text_pair']).__name__}",
                              hint='e.g. {"text": "a premise", "text_pair": "a hypothesis", "label": 1}')
        if not empty_texts and not row["text"].strip():  # tokenizes to nothing: no input to take statistics of
            raise ConfigError(f"{path}:{number}: empty or missing 'text'", hint="remove the line, or give it a text")
        if need_labels and (not isinstance(row.get("label"), int) or isinstance(row.get("label"), bool)):
            raise ConfigError(f"{path}:{number}: this Fisher needs an integer 'label' on every line",
                              hint="or use --fisher exact, which needs no labels")
        label = row.get("label")
        if num_labels is not None and need_labels and not 0 <= label < num_labels:
            raise ConfigError(f"{path}:{number}: label {label} is not a class of the model, which has {num_labels} "
                              f"(labels 0 to {num_labels - 1})",
                              hint="map the data's labels to the model's classes (its config's id2label)")
        rows.append(row)
    check_text_pairs(numbered, path)  # after each line's own checks: a bad text_pair is named as such first
    if unread_said:  # adapt says them per forward: a forward of the user's own may read any key
        warn_unread_keys(numbered, path, ("text", "text_pair", "label", "choices"), "tiesmerge stats")
    return rows


def _config(model_dir: Path) -> dict:
    """The model's config.json, after checking that its weights are safetensors tiesmerge can read
    (a pickle is refused: loading one can run code; a truncated file fails here, not in transformers)."""
    check_input(model_dir, "the model")
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: not a directory", hint="--model takes a Hugging Face model directory")
    if os.path.lexists(model_dir / "tiesmerge_stats.json"):  # (hp71b c18: "holds no tokenizer", then no config)
        raise CheckpointError(f"{model_dir}: is a statistics folder (tiesmerge_stats.json: what tiesmerge stats "
                              "wrote), not a model: its tensors are Fisher or Gram values",
                              hint="--model takes the model the statistics are to be computed of (a Hugging Face "
                                   "model directory)")
    try:
        open_checkpoint(model_dir).close()
    except CheckpointError as exc:
        if "pickle" in exc.message:
            raise CheckpointError(f"{model_dir}: holds PyTorch pickle weights; loading pickles can run arbitrary "
                                  "code, so tiesmerge stats reads only safetensors models",
                                  hint="convert the model to safetensors (save_pretrained(safe_serialization=True))"
                                  ) from None
        raise
    check_model_dir(model_dir, "the model")  # transformers follows links: its files checked first; a tokenizer
    config = read_json(model_dir / "config.json", "the model's config")
    if not isinstance(config, dict):
        raise CheckpointError(f"{model_dir / 'config.json'}: holds a {type(config).__name__}, not a JSON object",
                              hint="--model takes a Hugging Face model directory")
    return config


_num_labels = config_num_labels  # the classifier's classes as transformers reads config.json (one helper: hp40 V2)


def _check_names(model: torch.nn.Module, model_dir: Path, architectures: list) -> None:
    """Statistics are named after the weights of the module transformers built from config.json; most of them
    must be tensors of the checkpoint, or a merge would find none of its weights' statistics (a config without
    ``architectures`` loads a causal LM headless, its names without "model.")."""
    from ..io.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model_dir)
    try:
        stored = set(ckpt.names())
    finally:
        ckpt.close()
    built = [n for n, _ in model.named_parameters()]
    missing = [n for n in built if n not in stored]
    if built and len(missing) * 2 > len(built):
        some = sorted(stored)[:2]
        declared = ", ".join(map(str, architectures)) if isinstance(architectures, list) else repr(architectures)
        # the hint must not ask for what config.json already says (hp42 C47: it named the right class)
        hint = ("set config.json's architectures to the class the weights were saved from, as a list (e.g. "
                '"architectures": ["LlamaForCausalLM"])' if not architectures else
                "tiesmerge stats builds sequence classifiers, causal and masked language models (*ForCausalLM, "
                "*LMHeadModel, *ForMaskedLM) and bare encoders; check that the weights are of the declared class")
        raise ConfigError(f"{model_dir}: transformers built {type(model).__name__} from config.json (architectures: "
                          f"{declared or 'none'}), whose weights are named like {missing[0]!r}, but the "
                          f"checkpoint's are named like {some}: its statistics would match no tensor of the model",
                          hint=hint)


_TEXT_HEADS = ("LMHeadModel", "ForMaskedLM", "ForCausalLM")  # language-model heads run on texts alone


def _declared_text_model(architectures: list) -> Any:
    """The transformers class config.json declares, where it is a language model run on texts alone (GPT-2's
    GPT2LMHeadModel, BERT's BertForMaskedLM): loaded as AutoModel, its weights lose their prefix ("transformer.",
    "bert.") and the statistics matched no tensor of the checkpoint (hp42 C47)."""
    import transformers

    for name in architectures:
        if isinstance(name, str) and name.endswith(_TEXT_HEADS):
            cls = getattr(transformers, name, None)
            if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
                return cls
    return None


def hf_statistics(kind: str, model_dir: str | os.PathLike, data: str | os.PathLike, *, fisher: str = "exact",
                  per_example: str = "loop", batch_size: int = 8, limit: int | None = None, max_length: int = 128,
                  device: str = "cpu", progress: bool = False) -> Statistics:
    """Fisher (``kind="fisher"``) or Gram (``"gram"``) statistics of an HF model on a JSONL file."""
    from ..inputs import device_of

    device = str(device_of(device))  # cpu, or a CUDA device that exists: checked before any model is loaded
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_dir = Path(model_dir)
    config = _config(model_dir)
    architectures = config.get("architectures") or []
    classifier = any(str(a).endswith("ForSequenceClassification") for a in architectures)
    if kind == "fisher" and not classifier:
        raise ConfigError(f"{model_dir}: the Fisher needs p(y|x), and this model is not a sequence classifier "
                          f"(architectures: {', '.join(architectures) or 'none'})",
                          hint="for other models use tiesmerge.stats.fisher_information with your own logits function")
    if kind == "fisher" and _num_labels(model_dir, config) < 2:  # hp35 E37: every value 0.0, written as statistics
        raise ConfigError(f"{model_dir}: a head of 1 output (num_labels 1: a regression head) has no class "
                          "distribution: the log-probability of its one class is 0, so its Fisher would be 0 "
                          "everywhere", hint="the Fisher needs a classifier of 2 or more classes; for this model "
                                             "use stats gram and --method regmean, or a method without statistics")
    if kind == "fisher" and classifier:
        refuse_multi_label(model_dir, "the Fisher of stats fisher (the log-likelihood of a softmax)")
    uses_labels = kind == "fisher" and fisher != "exact"
    rows = read_jsonl(data, limit=limit, need_labels=uses_labels,
                      num_labels=_num_labels(model_dir, config) if uses_labels else None)
    # the class the checkpoint was saved from, so the statistics are named as its tensors are (a causal LM
    # loaded as AutoModel drops the "model." prefix, and a RegMean merge would find no Gram matrix for its weights)
    causal = any(str(a).endswith("ForCausalLM") for a in architectures)
    loader = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM if causal else \
        _declared_text_model(architectures) or AutoModel
    refuse_converted(model_dir, "stats (statistics named after the checkpoint's tensors)")
    if is_encoder_decoder(model_dir) and not classifier:  # hp35 E3: "fails in its forward pass"
        raise ConfigError(f"{model_dir}: an encoder-decoder model ({', '.join(map(str, architectures)) or 'T5-like'}); "
                          "stats runs a model on texts alone, and this one needs decoder inputs too",
                          hint="statistics of encoder-decoder models are not supported; merge them with a method "
                               "that needs none (ties, task_arithmetic, tsv_m, ...)")
    model = from_pretrained(loader, model_dir).to(device)  # refuses modules the weights lack (loading.py)
    _check_names(model, model_dir, architectures)  # before the statistics: they are named after the model's weights
    tokenizer = from_pretrained(AutoTokenizer, model_dir, "its tokenizer")
    check_vocabulary(tokenizer, input_rows(model), model_dir)  # hp40 V1: not an IndexError blamed on config.json
    max_length = fitted_length(model, max_length)  # never past the model's position table
    padding = "right, with the tokenizer's pad token"
    if tokenizer.pad_token_id is not None:  # a classifier saved with pad_token_id null finds its answer by it
        align_pad_token(model, tokenizer, model_dir)
    if tokenizer.pad_token_id is None:
        # Llama/GPT tokenizers have none. Any stand-in would be read by a classifier's pooling (it finds the last
        # real token by the pad id), so each example goes alone: exact, only slower
        batch_size, padding = 1, "none: the tokenizer has no pad token, so one example per batch"
    pairs_all = [r["text_pair"] for r in rows] if rows and all("text_pair" in r for r in rows) else None
    warn_unknown(tokenizer, [r["text"] for r in rows], max_length=max_length, where=str(data), stacklevel=3,
                 effect="the statistics describe how the model reads that token, not the texts",
                 whose="the model's tokenizer")
    cut = count_cut(tokenizer, [r["text"] for r in rows], pairs_all, max_length=max_length)
    if cut:  # as adapt says it (hp41 C12: every example cut silently)
        import warnings

        from ..errors import MergeWarning

        warnings.warn(MergeWarning(f"{cut:,} of the {len(rows):,} examples are longer than {max_length:,} tokens "
                                   "(--max-length, or the model's positions) and are cut: the statistics describe "
                                   "their first tokens"), stacklevel=2)
    batches = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        pairs = [r["text_pair"] for r in chunk] if all("text_pair" in r for r in chunk) else None
        batch = encode(tokenizer, [r["text"] for r in chunk], pairs, max_length=max_length, padding=batch_size > 1,
                       directory=model_dir)
        # a label torch cannot hold (past int64) is no class: such a batch has no labels (unused by gram and the
        # exact Fisher; the Fisher kinds that use them checked every label against the classes first)
        if all(isinstance(r.get("label"), int) and not isinstance(r.get("label"), bool)
               and -2**63 <= r["label"] < 2**63 for r in chunk):
            batch["labels"] = torch.tensor([r["label"] for r in chunk])
        batches.append({k: v.to(device) for k, v in batch.items()})

    def forward(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Any:
        with forward_checked(model_dir):  # only the model's own code: an error of ours stays ours
            return m(**{k: v for k, v in batch.items() if k != "labels"})

    if kind == "fisher":
        stats = fisher_information(model, batches, lambda m, b: forward(m, b).logits, kind=fisher,
                                   targets=(lambda b: b["labels"]) if fisher != "exact" else None,
                                   per_example=per_example, progress=progress, model=model_dir)
    else:
        conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
        if conv1d:  # hp36 C21: GPT-2's attention and MLP are transformers' Conv1D, no nn.Linear: said, not silent
            import warnings

            from ..errors import MergeWarning

            warnings.warn(MergeWarning(
                f"{len(conv1d)} layer(s) of {model_dir} are transformers' Conv1D ({', '.join(conv1d[:2])}"
                f"{', ...' if len(conv1d) > 2 else ''}), not nn.Linear: they get no Gram statistics, so RegMean "
                "averages their weights"), stacklevel=2)
        try:
            stats = gram_matrices(model, batches, forward, token_mask=lambda b: b["attention_mask"].bool(),
                                  progress=progress, model=model_dir)
        except ConfigError as exc:
            if not conv1d or "no nn.Linear" not in exc.message:
                raise
            # GPT-2 loaded whole (hp42 C47): its layers are Conv1D and its head is tied to the embedding
            raise ConfigError(f"{model_dir}: every layer RegMean could use is transformers' Conv1D ({len(conv1d)}, "
                              f"e.g. {conv1d[0]}) or a head tied to the embedding, so there is no nn.Linear to take "
                              "Gram statistics of", hint="merge this model with a method that needs no statistics "
                                                        "(ties, task_arithmetic, tsv_m, ...)") from None
    stats.manifest.options.update({"data": str(data), "max_length": max_length, "batch_size": batch_size,
                                   "padding": padding, "examples_cut": cut})
    return stats
