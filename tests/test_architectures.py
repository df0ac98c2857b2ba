"""Every architecture transformers builds merges by tensor name: a matrix of tiny random models
(decoders, a mixture of experts, an encoder-decoder, an encoder, a two-tower vision-text model),
tied and untied output heads. For each: a base and three perturbed fine-tunes saved with
save_pretrained, merged with TIES (defaults) through the API (one architecture through the CLI,
one from sharded inputs), loaded with from_pretrained, run, and compared with a float64 TIES
merge written here from the saved files, independently of the engine.

Cross-cutting (not one source module): io (names, ties, shards), engine, writer, transformers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers / huggingface_hub read it; the tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import tiesmerge  # noqa: E402
from tiesmerge.cli.main import main  # noqa: E402

VOCAB = 96
DENSITY = 0.2  # TIES's default: the reference below and the merge use the same value
# a small hidden size keeps the whole matrix (14 architectures, 21 cases) within a minute on 2 cores
H, FF, LAYERS, HEADS, KV = 16, 32, 2, 4, 2
DEC = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
           num_key_value_heads=KV, max_position_embeddings=32)


@dataclass(frozen=True)
class Arch:
    """How to build one tiny model and run it once."""

    build: Callable[[bool], torch.nn.Module]  # tie_word_embeddings -> a random model
    auto: Callable[[], type]  # the Auto class that loads the merged directory
    inputs: Callable[[], dict[str, torch.Tensor]]
    head: tuple[str, str] | None = None  # (input embedding, output head) parameter names, if the arch has a head


def _ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(5))


def _causal(config_cls: str, model_cls: str, embed: str = "model.embed_tokens.weight", **extra) -> Arch:
    def build(tie: bool) -> torch.nn.Module:
        cfg = getattr(transformers, config_cls)(**{**DEC, **extra}, tie_word_embeddings=tie)
        return getattr(transformers, model_cls)(cfg)

    return Arch(build, lambda: transformers.AutoModelForCausalLM, lambda: {"input_ids": _ids()},
                (embed, "lm_head.weight"))


def _gpt2(tie: bool) -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=32,
                                  tie_word_embeddings=tie)
    return transformers.GPT2LMHeadModel(cfg)


def _neox(tie: bool) -> torch.nn.Module:
    cfg = transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                                     num_attention_heads=HEADS, max_position_embeddings=32, tie_word_embeddings=tie)
    return transformers.GPTNeoXForCausalLM(cfg)


def _falcon(tie: bool) -> torch.nn.Module:
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS,
                                    num_attention_heads=HEADS, tie_word_embeddings=tie)
    return transformers.FalconForCausalLM(cfg)


def _t5(tie: bool) -> torch.nn.Module:
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=H, d_ff=FF, d_kv=4, num_layers=LAYERS, num_heads=HEADS,
                                decoder_start_token_id=0, tie_word_embeddings=tie)
    return transformers.T5ForConditionalGeneration(cfg)


def _bert(tie: bool) -> torch.nn.Module:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                  intermediate_size=FF, max_position_embeddings=32, tie_word_embeddings=tie)
    return transformers.BertForMaskedLM(cfg)


def _clip(tie: bool) -> torch.nn.Module:
    text = dict(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, max_position_embeddings=16, projection_dim=8)
    vision = dict(hidden_size=H, intermediate_size=FF, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  image_size=8, patch_size=4, projection_dim=8)
    return transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=8))


ARCHS: dict[str, Arch] = {
    "llama": _causal("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _causal("MistralConfig", "MistralForCausalLM"),
    "qwen2": _causal("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _causal("Qwen3Config", "Qwen3ForCausalLM", head_dim=4),
    "gemma2": _causal("Gemma2Config", "Gemma2ForCausalLM", head_dim=4),
    "gemma3": _causal("Gemma3TextConfig", "Gemma3ForCausalLM", head_dim=4),
    "phi3": _causal("Phi3Config", "Phi3ForCausalLM", pad_token_id=0),
    "mixtral": _causal("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2),
    "gpt2": Arch(_gpt2, lambda: transformers.AutoModelForCausalLM, lambda: {"input_ids": _ids()},
                 ("transformer.wte.weight", "lm_head.weight")),
    "gpt_neox": Arch(_neox, lambda: transformers.AutoModelForCausalLM, lambda: {"input_ids": _ids()},
                     ("gpt_neox.embed_in.weight", "lm_head.weight")),
    "falcon": Arch(_falcon, lambda: transformers.AutoModelForCausalLM, lambda: {"input_ids": _ids()},
                   ("transformer.word_embeddings.weight", "lm_head.weight")),
    "t5": Arch(_t5, lambda: transformers.AutoModelForSeq2SeqLM,
               lambda: {"input_ids": _ids(), "decoder_input_ids": _ids(2, 3)}, ("shared.weight", "lm_head.weight")),
    "bert": Arch(_bert, lambda: transformers.AutoModelForMaskedLM, lambda: {"input_ids": _ids()},
                 ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight")),
    "clip": Arch(_clip, lambda: transformers.AutoModel,
                 lambda: {"input_ids": _ids(), "pixel_values": torch.randn(2, 3, 8, 8,
                                                                           generator=torch.Generator().manual_seed(6))}),
}

# (architecture, tied head): every architecture once with its usual head, and both ways where the arch
# allows a choice. CLIP has no output head over the vocabulary; T5 only ties (transformers 5's T5Config sets
# tie_word_embeddings=True whatever it is given). GPT-NeoX stores its head as embed_out.weight, loaded as lm_head.
CASES = [("llama", False), ("llama", True), ("mistral", False), ("qwen2", True), ("qwen2", False), ("qwen3", True),
         ("qwen3", False), ("gemma2", True), ("gemma3", True), ("gemma3", False), ("phi3", False), ("mixtral", False),
         ("gpt2", True), ("gpt2", False), ("gpt_neox", False), ("gpt_neox", True), ("falcon", True), ("t5", True),
         ("bert", True), ("bert", False), ("clip", False)]
SHARDED = ("mistral", False)  # inputs saved in several shards with an index
VIA_CLI = ("qwen2", True)  # merged through `tiesmerge merge`, the rest through tiesmerge.merge


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """A 'fine-tune', in place: every parameter plus noise of its own scale (tied parameters once)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_((0.05 * p.abs().mean() + 1e-3) * torch.randn(p.shape, generator=g))


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor the directory stores, over all its shards."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _reference_ties(base: dict[str, torch.Tensor], fts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """TIES-Merging with the paper's defaults, in float64, from the stored tensors (Yadav et al. 2023):
    τ_t = θ_t − θ_base over every floating tensor; keep each model's top 20% |τ_t| over its whole model
    (entries equal to the threshold kept); elect γ = sgn(Σ_t trimmed τ_t); average the nonzero
    trimmed values whose sign is γ; θ = θ_base + 1.0 · that mean. Integer tensors come from the base."""
    names = [n for n, v in base.items() if v.is_floating_point()]
    taus = [{n: ft[n].double() - base[n].double() for n in names} for ft in fts]
    trimmed = []
    for tau in taus:
        flat = torch.cat([t.flatten().abs() for t in tau.values()])  # (N,)
        keep = int(DENSITY * flat.numel())
        threshold = flat.kthvalue(flat.numel() - keep + 1).values
        trimmed.append({n: torch.where(t.abs() >= threshold, t, torch.zeros_like(t)) for n, t in tau.items()})
    out = dict(base)
    for n in names:
        stack = torch.stack([t[n] for t in trimmed])  # (models, *S)
        gamma = stack.sum(0).sign()
        agree = (stack.sign() == gamma) & (stack != 0)
        count = agree.sum(0)
        mean = torch.where(count > 0, (stack * agree).sum(0) / count.clamp_min(1), torch.zeros_like(gamma))
        out[n] = base[n].double() + mean
    return out


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{'tied' if t else 'untied'}" for a, t in CASES])
def merged(request, tmp_path_factory):
    """(arch, tie, base model, base dir, fine-tune dirs, merged dir), saved and merged once per case."""
    name, tie = request.param
    arch = ARCHS[name]
    torch.manual_seed(0)
    model = arch.build(tie).eval()
    root = tmp_path_factory.mktemp(f"{name}-{tie}")
    shard = {"max_shard_size": "10KB"} if request.param == SHARDED else {}
    model.save_pretrained(root / "base", **shard)
    original = {n: v.clone() for n, v in model.state_dict().items()}
    dirs = []
    for k in range(3):
        _perturb(model, seed=k + 1)
        model.save_pretrained(root / f"ft{k}", **shard)
        model.load_state_dict(original)  # back to the base for the next fine-tune
        dirs.append(root / f"ft{k}")
    out = root / "merged"
    if request.param == VIA_CLI:
        args = ["merge", "--base", str(root / "base"), *(a for d in dirs for a in ("--model", str(d))),
                "--method", "ties", "-o", str(out), "--no-progress"]
        assert main(args) == 0
    else:
        assert tiesmerge.merge(root / "base", dirs, "ties", output=out) == out
    return name, tie, root / "base", dirs, out


def _load(arch: Arch, directory: Path) -> torch.nn.Module:
    return arch.auto().from_pretrained(directory).eval()


def _forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    with torch.no_grad():
        out = model(**inputs)
    return [v for v in out.values() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def test_merged_model_loads_runs_and_equals_the_float64_reference(merged):
    name, tie, base_dir, dirs, out = merged
    arch = ARCHS[name]
    if (name, tie) == SHARDED:
        assert len(list(base_dir.glob("*.safetensors"))) > 1 and (base_dir / "model.safetensors.index.json").is_file()

    loaded = _load(arch, out)
    outputs = _forward(loaded, arch.inputs())
    assert outputs and all(bool(torch.isfinite(o).all()) for o in outputs)

    base = _read_weights(base_dir)
    reference = _reference_ties(base, [_read_weights(d) for d in dirs])
    got = _read_weights(out)
    assert set(got) == set(base), set(got) ^ set(base)
    state = loaded.state_dict()
    moved = 0
    for n, ref in reference.items():
        value = got[n]
        assert value.dtype == base[n].dtype, n
        if not base[n].is_floating_point():
            assert torch.equal(value, base[n]), n
            continue
        # the same entries moved (trim and election agree exactly) ...
        assert torch.equal(value != base[n], ref.to(value.dtype) != base[n]), n
        # ... by the same amounts: float32 arithmetic against float64, a few float32 ulps of the operands
        # (base and update; their sum may cancel to a small number) apart at most
        scale = base[n].double().abs() + (ref - base[n].double()).abs()  # (*S)
        error = (value.double() - ref).abs()
        assert bool((error <= 4 * torch.finfo(torch.float32).eps * scale).all()), (n, float(error.max()))
        moved += int((value != base[n]).sum())
        if n in state:  # what from_pretrained put into the model is what was written
            assert torch.equal(state[n], value), n
    total = sum(v.numel() for v in base.values() if v.is_floating_point())
    assert 0.2 * total < moved < 0.6 * total  # three models' top 20 %, elected: a real merge, not a copy

    # the head: tied in the config -> still one tensor after loading; untied -> its own merged values
    if arch.head is not None:
        embed, head = (dict(loaded.named_parameters(remove_duplicate=False))[n] for n in arch.head)
        config = json.loads((out / "config.json").read_text())
        assert config.get("tie_word_embeddings", True) is tie
        if tie:
            assert embed.data_ptr() == head.data_ptr()
        else:
            assert embed.data_ptr() != head.data_ptr() and not torch.equal(embed, head)
