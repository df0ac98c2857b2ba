"""Suite-wide settings, and the fixtures that test modules share: tiny model families on disk
(written by helpers_ckpt, helpers_adapters and helpers_models) and tiny transformers models."""

from __future__ import annotations

import copy
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers_adapters import lora_delta, random_lora, write_lora_dir  # noqa: E402
from helpers_ckpt import make_base, make_family, write_hf_dir  # noqa: E402
from helpers_models import CLASSIFIER_WORDS, ENCODER_WORDS, TEXTS, save_word_tokenizer, tiny_bert_encoder  # noqa: E402


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the suite's remembered file digests out of the user's ~/.cache."""
    monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


# ------------------------------------------------------------------ families of checkpoints


@pytest.fixture
def family():
    """A base state dict and two fine-tunes (helpers_ckpt.make_family)."""
    return make_family(2)


@pytest.fixture
def hf(tmp_path):
    """base (3 shards + index, config, tokenizer files) and two fine-tunes as HF dirs."""
    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base, shards=3)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft, shards=k + 1) for k, ft in enumerate(fts)]
    return base, fts, b, ms


@pytest.fixture
def models(tmp_path):
    """A base (2 shards) and two fine-tunes as HF dirs: (base, fine-tunes, base dir, their dirs)."""
    base, fts = make_family(2)
    b = write_hf_dir(tmp_path / "base", base, shards=2)
    ms = [write_hf_dir(tmp_path / f"ft{k}", ft) for k, ft in enumerate(fts)]
    return base, fts, b, ms


@pytest.fixture()
def lora_family(tmp_path):
    """A base directory, three LoRA adapters of ranks 2, 4, 3 (one rsLoRA), and their dense ΔW."""
    base = make_base(0)
    write_hf_dir(tmp_path / "base", base)
    specs = [(2, 4.0, False), (4, 16.0, True), (3, 3.0, False)]
    dirs, deltas = [], []
    for k, (rank, alpha, rs) in enumerate(specs):
        factors = random_lora(base, rank, seed=k)
        dirs.append(write_lora_dir(tmp_path / f"lora{k}", factors, alpha=alpha, rslora=rs))
        deltas.append(lora_delta(factors, alpha, rslora=rs))
    return base, tmp_path / "base", dirs, deltas


# ------------------------------------------------------------------ tiny transformers models (skipped without them)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """(root, base dir, fine-tune dirs, data file): a 3-class BERT and two perturbed copies."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(CLASSIFIER_WORDS), hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                                  num_labels=3)
    model = transformers.BertForSequenceClassification(cfg).eval()
    root = tmp_path_factory.mktemp("cls")
    dirs = []
    for k in range(3):
        m = copy.deepcopy(model)
        if k:
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        m.save_pretrained(root / f"m{k}", safe_serialization=True)
        save_word_tokenizer(root / f"m{k}")
        dirs.append(root / f"m{k}")
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in TEXTS) + "\n")
    return root, dirs[0], dirs[1:], data


@pytest.fixture(scope="module")
def bert_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *ENCODER_WORDS]) + "\n")
    # transformers 5 takes the vocab as ``vocab=`` (a ``vocab_file=`` keyword is silently ignored)
    try:
        tok = transformers.BertTokenizerFast(vocab=str(vocab))
    except TypeError:  # transformers 4
        tok = transformers.BertTokenizerFast(vocab_file=str(vocab))
    assert len(tok) == 5 + len(ENCODER_WORDS)
    assert tok.unk_token_id not in tok(" ".join(ENCODER_WORDS))["input_ids"]
    return tok


@pytest.fixture(scope="module")
def encoder(bert_tokenizer):
    enc = tiny_bert_encoder(bert_tokenizer)
    enc.eval()
    return enc
