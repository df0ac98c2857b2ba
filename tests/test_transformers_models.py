"""Real (tiny, randomly initialised) transformers models saved with save_pretrained, merged from
their directories: the output loads with AutoModel*.from_pretrained, runs, and holds exactly the
weights of an in-memory merge of the same state dicts.

Cross-cutting (not one source module): real model directories through the API, the engine and the writer.
"""

from __future__ import annotations

import copy
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it; the tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")

import tiesmerge  # noqa: E402

VOCAB = 128


def _llama(tie: bool):
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(cfg), transformers.AutoModelForCausalLM


def _bert():
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    return transformers.BertForMaskedLM(cfg), transformers.AutoModelForMaskedLM


def _perturbed(model, seed: int, scale: float = 0.02):
    """A 'fine-tune': every parameter plus noise. parameters() yields a tied tensor once, so ties survive."""
    ft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return ft


@pytest.fixture(scope="module", params=["llama-untied", "llama-tied", "bert"])
def family(request, tmp_path_factory):
    """(name, base model, fine-tunes, Auto class, base dir, fine-tune dirs), saved with save_pretrained."""
    torch.manual_seed(0)
    kind = request.param
    model, auto = _bert() if kind == "bert" else _llama(tie=kind == "llama-tied")
    model.eval()
    fts = [_perturbed(model, seed) for seed in (1, 2, 3)]
    root = tmp_path_factory.mktemp(kind)
    model.save_pretrained(root / "base", safe_serialization=True)
    for k, ft in enumerate(fts):
        ft.save_pretrained(root / f"ft{k}", safe_serialization=True)
    return kind, model, fts, auto, root / "base", [root / f"ft{k}" for k in range(3)]


def _forward(model):
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("method,opts", [("ties", {"density": 0.3}), ("task_arithmetic", {"lam": 0.5})])
def test_merged_directory_loads_runs_and_matches_in_memory_merge(family, tmp_path, method, opts):
    kind, base, fts, auto, base_dir, ft_dirs = family
    out = tiesmerge.merge(base_dir, ft_dirs, method, output=tmp_path / "merged", shard_size="40KB", **opts)
    assert (out / "model.safetensors.index.json").is_file()  # sharded: loading follows the index
    assert (out / "config.json").is_file()

    loaded = auto.from_pretrained(out).eval()
    logits = _forward(loaded)
    assert logits.shape == (2, 10, VOCAB) and bool(torch.isfinite(logits).all())

    mem = tiesmerge.merge(base.state_dict(), [ft.state_dict() for ft in fts], method, **opts)
    got = loaded.state_dict()
    assert set(got) == set(mem), set(got) ^ set(mem)
    for name, value in mem.items():
        assert torch.equal(got[name], value), name

    # the merged weights, put into a fresh model, give the same outputs as the loaded directory
    fresh = copy.deepcopy(base)
    fresh.load_state_dict(mem)
    torch.testing.assert_close(_forward(fresh.eval()), logits)

    if kind == "llama-tied":
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        assert mem["lm_head.weight"] is mem["model.embed_tokens.weight"]  # merged once, tied in memory too
    if kind == "llama-untied":
        assert not torch.equal(got["lm_head.weight"], got["model.embed_tokens.weight"])

    # the merge really moved the weights, and the manifest is there
    moved = [n for n, v in base.state_dict().items() if n in got and not torch.equal(got[n], v)]
    assert len(moved) > len(mem) // 2
    man = json.loads((out / "tiesmerge.json").read_text())
    assert man["recipe"]["method"] == method and len(man["inputs"]["models"]) == 3

    if kind == "llama-untied" and method == "ties":  # one architecture is enough for the dtype check
        out16 = tiesmerge.merge(base_dir, ft_dirs, method, output=tmp_path / "bf16", dtype="bfloat16", **opts)
        config = json.loads((out16 / "config.json").read_text())
        assert config.get("dtype", config.get("torch_dtype")) == "bfloat16"
        loaded16 = auto.from_pretrained(out16, dtype="auto").eval()
        assert loaded16.model.embed_tokens.weight.dtype == torch.bfloat16
        assert bool(torch.isfinite(_forward(loaded16).float()).all())
        mem16 = tiesmerge.merge(base.state_dict(), [ft.state_dict() for ft in fts], method, dtype="bfloat16", **opts)
        got16 = loaded16.state_dict()
        assert all(torch.equal(got16[n], v) for n, v in mem16.items())
