"""Issue 13, the fourteenth independent hostile pass: one case per finding (and the ninth pass's notes left open)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file

import tiesmerge
from helpers_adapters import random_lora, write_lora_dir
from helpers_ckpt import SHAPES, make_family, run_cli, write_family_dirs, write_hf_dir
from tiesmerge.analysis.summary import summarise
from tiesmerge.errors import (
    CheckpointError,
    ConfigError,
    IncompatibleCheckpointsError,
    InvalidTensorError,
    MergeWarning,
    OutputError,
)
from tiesmerge.methods import NuSlerp, Slerp


@pytest.fixture
def family(tmp_path):
    return write_family_dirs(tmp_path)


def test_a_pipe_reached_through_links_is_called_a_pipe(family, tmp_path):
    """Pass 9's note: `--base /dev/stdin` on a pipe said "a link to /proc/self/fd/0, which does not exist"."""
    b, ms = family
    (tmp_path / "chain").symlink_to("/dev/stdin")  # chain -> /dev/stdin -> /proc/self/fd/0 -> pipe:[N]
    done = subprocess.run([sys.executable, "-m", "tiesmerge.cli.main", "merge", "--base", str(tmp_path / "chain"),
                           "--model", str(ms[0]), "--model", str(ms[1]), "-o", str(tmp_path / "out")],
                          input="x", capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "is a pipe (pipe:[" in done.stderr and "does not exist" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_a_layer_past_the_given_layers_takes_the_gradients_last_value(tmp_path):
    """F1: slerp with a gradient and `--layers` below the model's layer count crashed ("unexpected IndexError")
    on the first layer past it; such layers now sit at the gradient's end (as every layer does with --layers 1)."""
    shapes = {**SHAPES, "model.layers.2.self_attn.q_proj.weight": (8, 8), "model.layers.2.mlp.up_proj.weight": (16, 8)}
    base, fts = make_family(1, shapes=shapes)
    b, m = write_hf_dir(tmp_path / "base", base), write_hf_dir(tmp_path / "ft", fts[0])
    out = tmp_path / "out"
    with pytest.warns(MergeWarning, match="past its end for layers 2 to 2, which take its last values"):
        tiesmerge.merge(str(b), [str(m)], Slerp(anchor="base", t_by_name="self_attn=0,1;*=0.5", layers=2),
                        output=str(out))
    merged = load_file(str(out / "model.safetensors"))
    name = "model.layers.2.self_attn.q_proj.weight"  # t = 1: the model itself
    torch.testing.assert_close(merged[name], fts[0][name], rtol=1e-5, atol=1e-6)


def test_nuslerp_weights_that_imply_a_t_outside_0_1_are_refused(family, tmp_path, capsys):
    """F2: `--weights 1 -0.999999` implied t = -999999 and extrapolated silently (the output 4e4 from inputs of 1),
    where `--t -5` is refused; the API, recipes, analyze and search take the same rule from the method."""
    b, ms = family
    rc, _, err = run_cli(["merge", "--method", "nuslerp", "--base", b, "--model", ms[0], "--model", ms[1],
                          "--weights", "1", "-0.999999", "-o", tmp_path / "out", "--no-progress"], capsys)
    assert rc != 0 and "t = w_1 / (w_0 + w_1) = -999999, outside [0, 1]" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="outside"):
        NuSlerp(weights=(1.0, -0.5)).requirements()
    NuSlerp(weights=(-1.0, -3.0)).requirements()  # one sign: t = 0.75


def test_a_method_spec_value_holding_commas_can_be_quoted():
    """Case 71 (a note): `analyze --method 'slerp:t_by_name=...'` could not carry a schedule (its commas split it)."""
    from tiesmerge.api import method_of_spec

    got = method_of_spec('slerp:t_by_name="self_attn=0,1;*=0.5",layers=2,anchor=base')
    assert (got.t_by_name, got.layers, got.anchor) == ("self_attn=0,1;*=0.5", 2, "base")
    assert method_of_spec("nuslerp:weights=[1,2],flatten=false").weights == (1, 2)
    with pytest.raises(ConfigError, match="is not KEY=VALUE"):
        method_of_spec('slerp:t_by_name="a=0,1",1')


def test_an_overflow_hint_offers_a_smaller_lam_only_to_methods_that_have_one(tmp_path):
    """Cases 28 and 31 (notes): Model Stock's overflow said "use a smaller lam or smaller per-model weights", and it
    has neither; an interpolation's hint now points at the inputs (and a wider dtype for float16)."""
    g = torch.Generator().manual_seed(0)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g) * 1e30}
    b = write_hf_dir(tmp_path / "base", base)
    ms = [write_hf_dir(tmp_path / f"ft{k}", {n: v + torch.randn(v.shape, generator=g) * 1e28 for n, v in base.items()})
          for k in range(3)]
    with pytest.raises(InvalidTensorError) as info:
        tiesmerge.merge(str(b), [str(m) for m in ms], "model_stock", output=str(tmp_path / "stock"))
    assert "lam" not in info.value.hint and "check the inputs" in info.value.hint
    assert not (tmp_path / "stock").exists()
    with pytest.raises(InvalidTensorError) as info:  # ties scales: a smaller lam is the advice
        tiesmerge.merge(str(b), [str(m) for m in ms], "ties", lam=1e10, output=str(tmp_path / "ties"))
    assert "smaller lam" in info.value.hint


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
def test_a_fused_merge_that_changes_nothing_warns_as_the_torch_path_does(tmp_path, method):
    """Case 25 (a note): dare_ties (the fused kernels) wrote the base without the "changed no entry" warning that
    dare_linear (torch) gives on the same input; the fused path now watches its output's bytes the same way. (A
    drop rate of 0.9 expects 1.6 of the 16 entries kept, so no earlier warning; seed 3 drops them all.)"""
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(2, 4, generator=g)}
    b = write_hf_dir(tmp_path / "base", base)
    ms = [str(write_hf_dir(tmp_path / f"ft{k}", {"a.weight": base["a.weight"] + 0.1 * torch.randn(2, 4, generator=g)}))
          for k in range(2)]
    with pytest.warns(MergeWarning, match="changed no entry"):
        out = tiesmerge.merge(str(b), ms, method, drop_rate=0.9, seed=3, output=str(tmp_path / "zero"))
    assert torch.equal(load_file(str(out / "model.safetensors"))["a.weight"], base["a.weight"])
    with warnings.catch_warnings():  # a merge that changes something: no such warning
        warnings.simplefilter("error", MergeWarning)
        tiesmerge.merge(str(b), ms, method, drop_rate=0.5, seed=0, output=str(tmp_path / "plain"))
    with warnings.catch_warnings(record=True) as record:  # a cause said first: not repeated
        warnings.simplefilter("always")
        tiesmerge.merge(str(b), ms, method, weights=(0.0, 0.0), output=str(tmp_path / "weights0"))
    said = [str(w.message) for w in record if issubclass(w.category, MergeWarning)]
    assert any("every model's weight is 0" in m for m in said) and not any("changed no entry" in m for m in said)


def _lora_merge(tmp_path, base, model_type, modules, fan_in_fan_out, name):
    config = None if model_type is None else {"model_type": model_type}
    b = write_hf_dir(tmp_path / f"base-{name}", base, config=config)
    if model_type is None:  # a base whose architecture cannot be told
        (b / "config.json").unlink()
    factors = random_lora(base, 2, 1, modules) if modules[0].startswith("model.") else None
    if factors is None:  # GPT-2's Conv1D stores (in, out): the factors of ΔW (out, in) = its transpose
        g = torch.Generator().manual_seed(1)
        factors = {m: (torch.randn(2, base[m + ".weight"].shape[0], generator=g) * 0.3,
                       torch.randn(base[m + ".weight"].shape[1], 2, generator=g) * 0.3) for m in modules}
    lora = write_lora_dir(tmp_path / f"lora-{name}", factors, alpha=4, config={"fan_in_fan_out": fan_in_fan_out})
    out = tiesmerge.merge(str(b), [str(lora)], "task_arithmetic", lam=1.0, output=str(tmp_path / f"out-{name}"))
    merged = load_file(str(out / "model.safetensors"))
    return factors, {m: merged[m + ".weight"] - base[m + ".weight"] for m in modules}


def test_fan_in_fan_out_follows_the_modules_layout_as_peft_does(tmp_path):
    """F3: `fan_in_fan_out: true` on a Llama adapter transposed ΔW of every square module (PEFT ignores the flag on an
    nn.Linear, with a warning, and forces it on GPT-2's Conv1D); the flag decides only where the base's architecture
    is unknown."""
    base, _ = make_family(1, with_int=False)
    modules = ["model.layers.0.self_attn.q_proj"]  # square (8, 8): a transpose fits too
    with pytest.warns(MergeWarning, match="fan_in_fan_out is true, but in the base \\(llama\\)"):
        factors, delta = _lora_merge(tmp_path, base, "llama", modules, True, "llama")
    a, b = factors[modules[0]]
    torch.testing.assert_close(delta[modules[0]], 2.0 * (b @ a), rtol=1e-5, atol=1e-5)  # s = 4 / 2, untransposed
    _, unknown = _lora_merge(tmp_path, base, None, modules, True, "unknown")  # no model_type: the flag decides
    torch.testing.assert_close(unknown[modules[0]], 2.0 * (b @ a).T, rtol=1e-5, atol=1e-5)
    gpt2 = {"transformer.h.0.attn.c_attn.weight": torch.randn(8, 24), "transformer.h.0.attn.c_proj.weight":
            torch.randn(8, 8)}
    with pytest.warns(MergeWarning, match="fan_in_fan_out is false, but in the base \\(gpt2\\)"):
        factors, delta = _lora_merge(tmp_path, gpt2, "gpt2", ["transformer.h.0.attn.c_attn"], False, "gpt2")
    a, b = factors["transformer.h.0.attn.c_attn"]  # Conv1D (in 8, out 24): B (24, r) A (r, 8), stored as (B A)^T
    torch.testing.assert_close(delta["transformer.h.0.attn.c_attn"], 2.0 * (b @ a).T, rtol=1e-5, atol=1e-5)


def test_a_lora_shape_mismatch_names_the_shape_it_compared(tmp_path):
    """Case 119 (a note): a transposed ΔW that did not fit printed the untransposed shape, equal to the base's."""
    base, _ = make_family(1, with_int=False)
    g = torch.Generator().manual_seed(1)  # up_proj (16, 8) as B (16, r) A (r, 8): fits only untransposed
    module = "model.layers.0.mlp.c_fc"
    renamed = {**base, module + ".weight": base["model.layers.0.mlp.up_proj.weight"]}
    b = write_hf_dir(tmp_path / "base2", renamed, config={"model_type": "gpt2"})
    factors = {module: (torch.randn(2, 8, generator=g), torch.randn(16, 2, generator=g))}
    lora = write_lora_dir(tmp_path / "lora", factors, alpha=4)
    with pytest.raises(IncompatibleCheckpointsError, match=r"ΔW = \(B·A\)ᵀ of shape \(8, 16\), which does not fit"):
        tiesmerge.merge(str(b), [str(lora)], "task_arithmetic", output=str(tmp_path / "out"))


def test_complex_tensors_are_refused_with_what_to_do(tmp_path):
    """Cases 105, 106 (notes): a complex64 state dict entry was copied with the warning that the base's tensors are
    "integers or booleans"; a C64 safetensors file's refusal hinted at `merge --help`."""
    base, fts = make_family(1, with_int=False)
    odd = {**base, "model.freqs": torch.randn(4, dtype=torch.complex64)}
    with pytest.raises(CheckpointError, match="is complex64; tiesmerge merges real floating tensors") as info:
        tiesmerge.merge(odd, [{**fts[0], "model.freqs": odd["model.freqs"]}], "ties")
    assert "view_as_real" in info.value.hint
    from safetensors.torch import save_file
    (tmp_path / "c").mkdir()
    save_file({"model.freqs": torch.randn(4, dtype=torch.complex64)}, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="has dtype C64") as info:
        tiesmerge.open_checkpoint(str(tmp_path / "c"))
    assert "BF16" in info.value.hint


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_16", "olora", "corda", "loftq"])
def test_an_adapter_initialised_from_the_base_itself_is_refused(tmp_path, init):
    """Case 117 (a note): a PiSSA adapter saved without conversion merged onto the original base without a word,
    although its B·A is relative to the residual base PEFT made at initialisation."""
    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, 1), alpha=4, config={"init_lora_weights": init})
    with pytest.raises(CheckpointError, match=f"init_lora_weights '{init}'.*path_initial_model_for_weight_conversion"):
        tiesmerge.merge(str(b), [str(lora)], "task_arithmetic", output=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    plain = write_lora_dir(tmp_path / "plain", random_lora(base, 2, 1), alpha=4, config={"init_lora_weights": True})
    tiesmerge.merge(str(b), [str(plain)], "task_arithmetic", output=str(tmp_path / "ok"))  # converted: merged


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_a_slerp_whose_norms_overflow_says_so(tmp_path, monkeypatch, kernels):
    """Case 26 (a note): values of 1e30 make the squared norms overflow, and the angle was taken as 90 degrees silently
    (as mergekit and torch do): the output stays theirs, with a warning, on the fused and the torch path alike."""
    monkeypatch.setenv("TIESMERGE_KERNELS", kernels)
    g = torch.Generator().manual_seed(0)
    b = write_hf_dir(tmp_path / "base", {"a.weight": torch.randn(8, 8, generator=g) * 1e30})
    m = write_hf_dir(tmp_path / "m", {"a.weight": torch.randn(8, 8, generator=g) * 1e30})
    with pytest.warns(MergeWarning, match="has an infinite norm in float32"):
        tiesmerge.merge(str(b), [str(m)], Slerp(anchor="base"), output=str(tmp_path / "out"), allow_distant=True)
    assert torch.isfinite(load_file(str(tmp_path / "out" / "model.safetensors"))["a.weight"]).all()


_OPEN_FOR_WRITING = ("import os, sys\ntry:\n    os.close(os.open(sys.argv[1], os.O_WRONLY | os.O_NONBLOCK))\n"
                     "except OSError as e:\n    print(e.errno)\n")


def _open_for_writing_elsewhere(path) -> str:
    """Another process opens ``path`` for writing without blocking: held back (EAGAIN) while a lease is held."""
    return subprocess.run([sys.executable, "-c", _OPEN_FOR_WRITING, str(path)], capture_output=True, text=True,
                          timeout=60).stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read leases are Linux's")
def test_a_leased_file_opened_for_writing_elsewhere_stops_the_read(tmp_path):
    """F (case 150): a weights file truncated while mapped killed the process with SIGBUS (no message, a temporary
    left). Files are read under a read lease: the other process is held back, the merge stops with an error."""
    from tiesmerge.io import leases

    path = tmp_path / "w.bin"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert leases.hold(fd, path)
        leases.check()  # nothing happened yet
        assert _open_for_writing_elsewhere(path) == "11"  # EAGAIN: held back
        with pytest.raises(CheckpointError, match="another process opened this file for writing"):
            leases.check()
    finally:
        leases.release(fd)
        os.close(fd)
    leases.check()  # let go: nothing left to report
    assert _open_for_writing_elsewhere(path) == ""  # and the other process goes on


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read leases are Linux's")
def test_a_merge_whose_input_is_opened_for_writing_stops_and_leaves_nothing(family, tmp_path, monkeypatch):
    from tiesmerge.engine import reader as reader_module

    b, ms = family
    weights = ms[1] / "model.safetensors"
    before = weights.read_bytes()
    real_read, calls = reader_module.Reader.read, []

    def read(self, chunk, slot):  # the second chunk read: another process opens model 1's weights to write them
        calls.append(chunk)
        if len(calls) == 2:
            assert _open_for_writing_elsewhere(weights) == "11"
        return real_read(self, chunk, slot)

    monkeypatch.setattr(reader_module.Reader, "read", read)
    with pytest.raises(CheckpointError, match="another process opened this file for writing"):
        tiesmerge.merge(str(b), [str(m) for m in ms], "ties", output=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tiesmerge-*"))
    assert weights.read_bytes() == before
    assert _open_for_writing_elsewhere(weights) == ""  # the files were let go


def test_a_file_without_a_lease_is_read_not_mapped(family, monkeypatch):
    """Where no lease can be held (another user's file, a file system without leases), the rows are read with pread:
    a file truncated meanwhile reads short, a typed error, never a SIGBUS."""
    from tiesmerge.io.checkpoint import open_checkpoint

    b, _ = family
    monkeypatch.setenv("TIESMERGE_LEASES", "0")
    ckpt = open_checkpoint(str(b))
    try:
        assert not ckpt.mappable("model.embed_tokens.weight")
    finally:
        ckpt.close()
    monkeypatch.setenv("TIESMERGE_LEASES", "1")
    ckpt = open_checkpoint(str(b))
    try:
        assert ckpt.mappable("model.embed_tokens.weight") == sys.platform.startswith("linux")
    finally:
        ckpt.close()


def test_average_weights_that_nearly_cancel_are_refused(family, tmp_path, capsys):
    """Case 133 (a note): `average --weights 1 -0.999999` (sum 1e-6) scaled the models by ±1e6, exit 0; a sum of
    exactly 0 was refused."""
    b, ms = family
    rc, _, err = run_cli(["merge", "--method", "average", "--base", b, "--model", ms[0], "--model", ms[1], "--weights",
                          "1", "-0.999999", "-o", tmp_path / "out", "--no-progress"], capsys)
    assert rc != 0 and "so near 0 that normalised by their sum they reach ±1e+06" in err
    assert not (tmp_path / "out").exists()
    tiesmerge.merge(str(b), [str(m) for m in ms], "average", weights=(1.5, -0.5), output=str(tmp_path / "ok"))


def test_identical_models_of_an_interpolation_are_not_told_to_use_weights(family, tmp_path):
    """Case 148 (a note): slerp of two byte-identical models said "give a weight instead" (slerp has no weights)."""
    import shutil

    b, ms = family
    twin = shutil.copytree(ms[0], tmp_path / "twin")
    with pytest.warns(MergeWarning, match="combines a model with itself") as record:
        tiesmerge.merge(str(b), [str(ms[0]), str(twin)], "slerp", output=str(tmp_path / "out"))
    assert not any("give a weight" in str(w.message) for w in record)
    with pytest.warns(MergeWarning, match="counts twice in the merge \\(give a weight"):
        tiesmerge.merge(str(b), [str(ms[0]), str(twin)], "ties", output=str(tmp_path / "ties"))


@pytest.mark.parametrize("key", ["dtype", "out_dtype"])
@pytest.mark.parametrize("value", [[1], {"a": 1}])
def test_a_mergekit_dtype_that_is_no_text_is_a_typed_error(family, tmp_path, capsys, key, value):
    """Cases 160, 161: `dtype: [1]` in a mergekit recipe was "unexpected TypeError: unhashable type: 'list'"."""
    import yaml

    b, ms = family
    recipe = {"merge_method": "ties", "base_model": str(b), "models": [{"model": str(m)} for m in ms],
              "parameters": {"density": 0.5, "weight": 1.0}, key: value}
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump(recipe))
    rc, _, err = run_cli(["validate", path], capsys)
    assert rc == 2 and f"{key} {value!r} is not one of" in err and "unexpected" not in err


def test_force_replaces_only_an_earlier_output_of_the_same_command(family, tmp_path, capsys):
    """F17 (case 182, a note): `analyze -o MERGED --force` replaced a merged model with a report (and `stats --force`
    replaced a merged model or a report), where analyze's help promises to replace only a report."""
    b, ms = family
    merged = tmp_path / "merged"
    tiesmerge.merge(str(b), [str(m) for m in ms], "ties", output=str(merged))
    before = sorted(p.name for p in merged.iterdir())
    rc, _, err = run_cli(["analyze", "--base", b, "--model", ms[0], "--model", ms[1], "-o", merged, "--force",
                          "--no-progress"], capsys)
    assert rc != 0 and "holds a merged model" in err and "Traceback" not in err
    assert sorted(p.name for p in merged.iterdir()) == before
    report = tmp_path / "report"
    for _ in range(2):  # a report over a report: replaced
        rc, _, err = run_cli(["analyze", "--base", b, "--model", ms[0], "--model", ms[1], "-o", report, "--force",
                              "--no-progress"], capsys)
        assert rc == 0, err
    with pytest.raises(OutputError, match="holds an analysis report"):
        tiesmerge.merge(str(b), [str(m) for m in ms], "ties", output=str(report), force=True)
    tiesmerge.merge(str(b), [str(m) for m in ms], "ties", output=str(merged), force=True)  # its own kind: replaced


@pytest.mark.parametrize("mode", ["huge", "nan", "1d"])
def test_ia3_vectors_are_checked_before_the_merge(tmp_path, mode):
    """F19 (cases 187-189, notes): an (IA)³ vector of 1e30 merged (exit 0, weights of 1e28), a NaN was named by the
    base weight's name with the vector's shape, and a 1-D vector was blamed on another base model."""
    from helpers_adapters import random_ia3, write_ia3_dir

    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    vectors = random_ia3(base, 1)
    name = next(iter(vectors))
    if mode == "huge":
        vectors[name] = torch.full_like(vectors[name], 1e30)
    elif mode == "nan":
        vectors[name] = vectors[name].clone()
        vectors[name][0] = float("nan")
    else:
        vectors[name] = vectors[name].reshape(-1)
    adapter = write_ia3_dir(tmp_path / "ia3", vectors)
    want = {"huge": "scales the weights by up to 1e\\+30", "nan": f"vector '.*{name}.ia3_l' .* holds NaN",
            "1d": "is 1-D"}[mode]
    with pytest.raises(InvalidTensorError if mode == "nan" else CheckpointError, match=want):
        tiesmerge.merge(str(b), [str(adapter)], "task_arithmetic", output=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_tied_head_stored_anyway_is_the_embedding_not_another_architecture(tmp_path):
    """F20 (cases 191, 192, notes): a fine-tune of a tied model whose writer stored lm_head.weight anyway (the
    embedding's bytes) was refused as "another architecture"; a head that differs is named as trained untied."""
    base, fts = make_family(2, with_int=False)
    tied = {"tie_word_embeddings": True}
    drop = {k: v for k, v in base.items() if k != "lm_head.weight"}
    b = write_hf_dir(tmp_path / "base", drop, config=tied)
    m0 = write_hf_dir(tmp_path / "m0", {k: v for k, v in fts[0].items() if k != "lm_head.weight"}, config=tied)
    stored = {**{k: v for k, v in fts[1].items() if k != "lm_head.weight"},
              "lm_head.weight": fts[1]["model.embed_tokens.weight"].clone()}
    m1 = write_hf_dir(tmp_path / "m1", stored, config=tied)
    out = tiesmerge.merge(str(b), [str(m0), str(m1)], "ties", output=str(tmp_path / "out"))
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    untied = write_hf_dir(tmp_path / "m2", {**stored, "lm_head.weight": fts[1]["lm_head.weight"]}, config=tied)
    with pytest.raises(IncompatibleCheckpointsError, match="fine-tuned with an untied output head"):
        tiesmerge.merge(str(b), [str(m0), str(untied)], "ties", output=str(tmp_path / "out2"))


def test_a_float16_adapter_whose_factors_overflow_gets_only_the_error(tmp_path, capsys):
    """F16 (case 177, a note): `--output-format adapter --lam 1e30 --dtype float16` warned "|B·A| = nan ... its float16
    factors are finite" and then failed on factors that were not finite: only the error now."""
    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    loras = [write_lora_dir(tmp_path / f"l{k}", random_lora(base, 2, k), alpha=4) for k in range(2)]
    rc, _, err = run_cli(["merge", "--base", b, "--model", loras[0], "--model", loras[1], "--output-format",
                          "adapter", "--rank", "2", "--lam", "1e30", "--dtype", "float16", "-o", tmp_path / "out",
                          "--no-progress"], capsys)
    assert rc != 0 and "not finite" in err and "|B·A| = nan" not in err and "factors are finite" not in err, err
    assert not (tmp_path / "out").exists()


def test_a_ray_address_that_accepts_but_is_no_cluster_is_named(monkeypatch):
    """F18 (case 184, a note): `--ray ray://HOST:PORT` where something accepts the connection but no Ray cluster
    answers waited for Ray's client and said only "ray client connection timeout": the address is named now."""
    ray = pytest.importorskip("ray")
    from tiesmerge.tuning import executors

    def refuse(*args, **kwargs):
        raise ConnectionError("ray client connection timeout")

    monkeypatch.setattr(executors, "_check_reachable", lambda address, timeout=5.0: None)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
    with pytest.raises(ConfigError, match="--ray ray://10.255.255.1:10001: a connection was accepted there"):
        executors.RayExecutor("ray://10.255.255.1:10001")


def test_force_refuses_a_folder_holding_markers_of_two_kinds(family, tmp_path, capsys):
    """Pass 15 F3: a report's analysis.json moved beside a merged model made `analyze --force` replace the model (its
    own marker was there), and `merge --force` deleted the moved analysis.json."""
    import shutil

    b, ms = family
    merged, report = tmp_path / "merged", tmp_path / "report"
    tiesmerge.merge(str(b), [str(m) for m in ms], "ties", output=str(merged))
    rc, _, err = run_cli(["analyze", "--base", b, "--model", ms[0], "--model", ms[1], "-o", report, "--no-progress"],
                         capsys)
    assert rc == 0, err
    shutil.copy2(report / "analysis.json", merged / "analysis.json")  # the numbers kept with the model
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    rc, _, err = run_cli(["analyze", "--base", b, "--model", ms[0], "--model", ms[1], "-o", merged, "--force",
                          "--no-progress"], capsys)
    assert rc != 0 and "holds a merged model" in err
    with pytest.raises(OutputError, match="holds an analysis report"):
        tiesmerge.merge(str(b), [str(m) for m in ms], "ties", output=str(merged), force=True)
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before


def test_the_digest_cache_is_parsed_once_written_once_and_bounded(tmp_path, monkeypatch):
    """Pass 15 F2: the digest cache was parsed, and rewritten whole, once per input file, and never pruned: a cache of
    300,000 entries (under its 64 MiB cap) made a merge of 42 small shards take 76 s on every run."""
    import json

    from tiesmerge.io import card

    monkeypatch.setenv("TIESMERGE_CACHE_DIR", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "digests.json"
    cache.parent.mkdir()
    planted = {f"/x/{i}/model.safetensors": {"stamp": [1, i, 2, 3, 4], "sha256": "ab" * 32} for i in range(25_000)}
    cache.write_text(json.dumps(planted))
    assert card.load_cache(cache) is card.load_cache(cache)  # parsed once while the file is the same
    writes = []
    real = card.remember_many
    monkeypatch.setattr(card, "remember_many", lambda path, items: (writes.append(len(items)), real(path, items)))
    base, fts = make_family(2, with_int=False)
    sharded = [write_hf_dir(tmp_path / f"s{k}", sd, shards=3) for k, sd in enumerate([base, *fts])]
    tiesmerge.merge(str(sharded[0]), [str(p) for p in sharded[1:]], "ties", output=str(tmp_path / "out"))
    assert writes == [9]  # three models of three shards: one write
    kept = json.loads(cache.read_text())
    shards = [str(f.resolve()) for d in sharded for f in d.glob("*.safetensors")]
    assert len(kept) == card._MAX_ENTRIES and set(list(kept)[-9:]) == set(shards)  # the newest kept, the oldest gone
    assert "/x/0/model.safetensors" not in kept and "/x/24999/model.safetensors" in kept


@pytest.mark.parametrize("alpha", [0, -8])
def test_a_lora_alpha_that_is_not_positive_warns(tmp_path, alpha):
    """Pass 15 N5 (cases 121, 122): lora_alpha 0 merged to exactly the base, a negative one reversed the adapter,
    both silently."""
    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, 1), alpha=alpha)
    with pytest.warns(MergeWarning, match=f"lora_alpha is {alpha}"):
        tiesmerge.merge(str(b), [str(lora)], "task_arithmetic", output=str(tmp_path / "out"))


def test_method_specs_with_deep_values_or_an_open_quote_are_named():
    """Pass 15 F4 and case 109: a 50,000-deep [[[... value was "a bug in tiesmerge"; an unclosed quote blamed the
    option it swallowed."""
    from tiesmerge.api import method_of_spec

    with pytest.raises(ConfigError, match="nested too deep"):
        method_of_spec("ties:densities=" + "[" * 50_000)
    with pytest.raises(ConfigError, match="a double quote is not closed"):
        method_of_spec('slerp:t_by_name="self_attn=0,1;*=0.5,layers=2')


def test_an_adapter_trained_on_another_named_base_warns(tmp_path):
    """Pass 15 case 133 (a note): an adapter whose base_model_name_or_path names another model merged without a word
    where the base's config names itself; a local path on either side names nothing to compare."""
    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base, config={"_name_or_path": "org/tiny-base"})
    other = write_lora_dir(tmp_path / "other", random_lora(base, 2, 1), alpha=4,
                           config={"base_model_name_or_path": "meta-llama/Llama-2-7b-hf"})
    with pytest.warns(MergeWarning, match="trained on 'meta-llama/Llama-2-7b-hf'"):
        tiesmerge.merge(str(b), [str(other)], "task_arithmetic", output=str(tmp_path / "out"))
    same = write_lora_dir(tmp_path / "same", random_lora(base, 2, 1), alpha=4,
                          config={"base_model_name_or_path": "org/tiny-base"})
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        tiesmerge.merge(str(b), [str(same)], "task_arithmetic", output=str(tmp_path / "ok"))


@pytest.mark.parametrize("method", ["dare_linear", "magnitude_prune", "tsv_m", "ties"])
def test_a_lam_so_small_that_nothing_changes_warns(family, tmp_path, method):
    """Pass 15 case 207: `--lam 1e-30` wrote exactly the base without a word (its delta was not zero, so the torch
    path counted it as a change, though it rounds away when added)."""
    b, ms = family
    with pytest.warns(MergeWarning, match="changed no entry"):
        tiesmerge.merge(str(b), [str(m) for m in ms], method, lam=1e-30, output=str(tmp_path / "out"))


def test_notes_of_the_fifteenth_pass(family, tmp_path, capsys):
    """Pass 15 notes: demo --params without --synthetic was ignored (the 3-minute MiniLM demo ran); an index entry
    'sub/../shard' (inside the folder) was called a path outside it."""
    rc, _, err = run_cli(["demo", "--params", "5", "--workdir", tmp_path / "demo"], capsys)
    assert rc != 0 and "--params 5 sizes the synthetic model" in err and not (tmp_path / "demo").exists()
    b, _ = family
    (b / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "sub/../model.safetensors"}}')
    with pytest.raises(CheckpointError, match="a path through '..'"):
        tiesmerge.open_checkpoint(str(b))


@pytest.mark.parametrize("method", [Slerp(), NuSlerp(of="models")])
def test_an_interpolation_of_the_models_is_not_written_as_an_adapter(tmp_path, method):
    """Pass 15 F10: slerp (of the models) with --output-format adapter wrote the slerp of the task vectors, another
    merge than the same command's full model, silently (model_stock was refused)."""
    base, _ = make_family(1, with_int=False)
    b = write_hf_dir(tmp_path / "base", base)
    loras = [str(write_lora_dir(tmp_path / f"l{k}", random_lora(base, 2, k), alpha=4)) for k in range(2)]
    with pytest.raises(ConfigError, match="interpolates the models' own values"):
        tiesmerge.merge(str(b), loras, method, output=str(tmp_path / "out"), output_format="adapter")
    assert not (tmp_path / "out").exists()
    tiesmerge.merge(str(b), loras, NuSlerp(), output=str(tmp_path / "tv"), output_format="adapter")  # task vectors


def test_notes_of_the_fifteenth_pass_on_specs_recipes_and_weights(family, tmp_path, capsys):
    """Pass 15 F7, F8.2, F11: nuslerp weights -1, 1 (mixed signs, sum 0) became t = 0.5 silently; `slices: null`
    (mergekit's default) was refused as unsupported; the API's merge did not take the spec form analyze takes."""
    import yaml

    b, ms = family
    with pytest.raises(ConfigError, match="opposite signs"):
        NuSlerp(weights=(-1.0, 1.0)).requirements()
    recipe = {"merge_method": "ties", "base_model": str(b), "models": [{"model": str(m)} for m in ms],
              "parameters": {"density": 0.5, "weight": 1.0}, "slices": None}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    rc, _, err = run_cli(["validate", tmp_path / "r.yml"], capsys)
    assert rc == 0, err
    out = tiesmerge.merge(str(b), [str(m) for m in ms], "ties:density=0.5", output=str(tmp_path / "spec"))
    assert json.loads((out / "tiesmerge.json").read_text())["method"]["options"]["density"] == 0.5
    with pytest.raises(ConfigError, match="given beside the spec"):
        tiesmerge.merge(str(b), [str(m) for m in ms], "ties:density=0.5", lam=2.0)


def test_force_on_a_link_never_replaces_the_link_nor_its_target(family, tmp_path):
    """Pass 15 F8.7: with --force the target's own files were checked and the merge refused; the link was then
    replaced by the output (the hint offered it). hp47 c56: --force replaces only a folder tiesmerge wrote, and a link
    at -o /dev/stdout is the system's: a link is never replaced, --force included; its target is untouched."""
    b, ms = family
    user = tmp_path / "userdir"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    (tmp_path / "l").symlink_to(user)
    for force in (False, True):
        with pytest.raises(OutputError, match="tiesmerge never replaces a link, --force included"):
            tiesmerge.merge(str(b), [str(m) for m in ms], "ties", output=str(tmp_path / "l"), force=force)
    assert (tmp_path / "l").is_symlink()
    assert sorted(p.name for p in user.iterdir()) == ["keep.txt"] and (user / "keep.txt").read_text() == "mine"


def test_notes_of_the_sixteenth_pass_on_grids():
    """Pass 16 notes: `--grid lam=1,1,1` merged and scored the same point three times; a method with nothing to search
    said "(it has: )"."""
    from tiesmerge.tuning.search import parse_grid
    from tiesmerge.tuning.space import build_space

    assert parse_grid("ties", ["lam=1,1,1"])["lam"] == (1.0,)
    with pytest.raises(ConfigError, match="model_stock has none"):  # (its switch: tune's, hp85b c56)
        build_space("model_stock", 3, axes=["filter_wise"])


def test_a_float16_base_merged_into_an_adapter_factors_in_float32(tmp_path):
    """Pass 16 F1: float16 LoRA factors of 6e4 on a float16 base, adapter output without --dtype: the merged task
    vectors were formed in the base's float16 and overflowed ("not finite in F32 ... use a smaller lam"), while
    `--dtype float32` worked: a merged adapter's task vectors are float32 whatever the output dtype."""
    base, _ = make_family(1, with_int=False, dtype=torch.float16)
    b = write_hf_dir(tmp_path / "base", base)
    loras = []
    for k in range(2):
        factors = random_lora({n: v.float() for n, v in base.items()}, 2, k)
        big = {m: (torch.full_like(a, 6e4 - 1000 * k).half(), torch.full_like(f, 6e4).half())
               for m, (a, f) in factors.items()}
        loras.append(str(write_lora_dir(tmp_path / f"l{k}", big, alpha=4)))
    out = tiesmerge.merge(str(b), loras, "ties", output=str(tmp_path / "out"), output_format="adapter", rank=2)
    assert all(torch.isfinite(v).all() for v in load_file(str(out / "adapter_model.safetensors")).values())


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_model_stock_extrapolating_far_warns(tmp_path, monkeypatch, kernels):
    """Pass 16 F2: two task vectors at cos -0.999 gave t = -1998 (the output 45 task vectors away from the base),
    exit 0, silently; computed as mergekit does, now with a warning, on the fused and the torch path."""
    monkeypatch.setenv("TIESMERGE_KERNELS", kernels)
    g = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(16, 8, generator=g)}
    tau = 0.01 * torch.randn(16, 8, generator=g)
    b = write_hf_dir(tmp_path / "base", base)
    ms = [str(write_hf_dir(tmp_path / f"m{k}", {"a.weight": base["a.weight"] + sign * tau + 1e-5 * torch.randn(
        16, 8, generator=g)})) for k, sign in enumerate((1, -1))]
    with pytest.warns(MergeWarning, match="outside \\[0, 1\\]"):
        tiesmerge.merge(str(b), ms, "model_stock", output=str(tmp_path / "out"))


def test_nuslerp_row_wise_under_flatten_is_said_to_change_nothing(family, tmp_path):
    """Pass 16 F3: `nuslerp --row-wise` with flatten on (the default) wrote the plain nuslerp, silently."""
    b, ms = family
    with pytest.warns(MergeWarning, match="row_wise changes nothing"):
        tiesmerge.merge(str(b), [str(m) for m in ms], NuSlerp(row_wise=True), output=str(tmp_path / "out"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MergeWarning)
        tiesmerge.merge(str(b), [str(m) for m in ms], NuSlerp(row_wise=True, flatten=False),
                        output=str(tmp_path / "o2"))


def test_options_given_as_numpy_or_torch_scalars_are_their_numbers():
    """Pass 16 N4: density=np.float32(0.5) or a 0-d tensor was refused as "must be a fraction in (0, 1]"."""
    import numpy as np

    assert Slerp(t=np.float32(0.25)).t == 0.25 and type(Slerp(t=np.float64(0.5)).t) is float
    assert NuSlerp(t=torch.tensor(0.5)).t == 0.5
    with pytest.raises(ConfigError):  # an array is no scalar
        Slerp(t=np.array([0.5]))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="read leases are Linux's")
def test_a_lease_break_while_the_lease_table_is_locked_does_not_deadlock(tmp_path):
    """Review: the SIGIO handler took the module's lock, which the main thread may hold when the handler runs
    (inside hold, release or check): it waited for itself."""
    code = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from tiesmerge.io import leases
        path = Path({str(tmp_path / "w.bin")!r})
        path.write_bytes(b"x" * 64)
        fd = os.open(path, os.O_RDONLY)
        assert leases.hold(fd, path)
        with leases._LOCK:
            os.kill(os.getpid(), signal.SIGIO)  # the handler runs here, the lock held
            total = sum(range(1000))
        leases.release(fd)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_notes_of_the_sixteenth_pass_on_messages(family, tmp_path, capsys):
    """Pass 16 N2, N3, N9: nuslerp weights 0, 0 became t = 0.5 without a word; a complete file with a number in its
    __metadata__ was called truncated ("download it again"); a base-less mergekit nuslerp of two models said
    "merged 1 model"."""
    b, ms = family
    with pytest.warns(MergeWarning, match="the weights sum to 0 .* t = 0.5 is taken"):
        tiesmerge.merge(str(b), [str(m) for m in ms], NuSlerp(weights=(0.0, 0.0)), output=str(tmp_path / "zero"))
    header = {"__metadata__": {"format": "pt", "step": 1}, "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    raw = json.dumps(header).encode()
    odd = tmp_path / "odd.safetensors"
    odd.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    with pytest.raises(CheckpointError) as caught:
        tiesmerge.open_checkpoint(str(odd))
    assert "holds non-string value(s) ('step')" in caught.value.hint and "download" not in caught.value.hint
    recipe = tmp_path / "nuslerp.yaml"
    recipe.write_text(f"merge_method: nuslerp\nmodels: [{{model: {ms[0]}}}, {{model: {ms[1]}}}]\n"
                      "parameters: {weight: 1}\n")
    rc, out, _ = run_cli(["merge", recipe, "-o", tmp_path / "mk", "--no-progress"], capsys)
    assert rc == 0 and "merged 2 models with nuslerp" in out, out


def test_notes_of_the_sixteenth_pass_on_search_and_analysis(family, tmp_path):
    """Pass 16 N7, N8: a search of nuslerp weights over -1:1 stopped at its first mixed-sign candidate instead of
    being refused up front; `analyze` of one model under two paths said nothing of it (merge warns)."""
    from tiesmerge.tuning.space import build_space

    with pytest.raises(ConfigError, match=r"weights over -1:1: a candidate such as \(-1.0, 1.0\) would be refused"):
        build_space("nuslerp", 2, axes=["weights"], ranges={"weights": (-1.0, 1.0)})
    assert build_space("nuslerp", 2, axes=["weights"], ranges={"weights": (0.1, 1.0)}).dimension == 2
    b, ms = family
    twin = tmp_path / "twin"
    twin.mkdir()
    for f in ms[0].iterdir():
        (twin / f.name).write_bytes(f.read_bytes())
    data = tiesmerge.analyze(str(b), [str(ms[0]), str(twin), str(ms[1])])
    assert data["identical_pairs"] == [[0, 1]]
    assert any("Model(s) 0 and 1 have the same task vector" in line for line in summarise(data))
    assert tiesmerge.analyze(str(b), [str(m) for m in ms])["identical_pairs"] == []
