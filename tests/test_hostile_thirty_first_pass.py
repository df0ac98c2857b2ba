"""The thirty-first hostile pass (issue 13) and what was found beside it: numba's and matplotlib's settings files in
the working folder, and numba's own complaints about NUMBA_* values it cannot parse."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers_ckpt import load_dir, write_family_dirs


def _run_in(folder, argv, env_extra=None, timeout=300):
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(__import__("tiesmerge").__file__)),
                                                    env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "tiesmerge", *argv], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _merge_in(folder, flags, out, env_extra=None):
    return _run_in(folder, ["merge", *flags, "-o", str(out)], env_extra)


def test_a_numba_settings_file_in_the_working_folder_is_not_read(tmp_path):
    """numba reads .numba_config.yaml from the working folder (a downloaded model's, say): `disable_jit: 1` failed the
    merge as "unexpected NotImplementedError ... bug", `cache_dir:` made numba write its cache anywhere on disk, and a
    malformed file stopped it with a YAML traceback. Now the file is not read, and a warning says so."""
    b, ms = write_family_dirs(tmp_path)
    flags = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1])]
    elsewhere = tmp_path / "elsewhere"
    runs = {"plain": None,
            "settings": f"disable_jit: 1\nthreading_layer: tbb\ncache_dir: {elsewhere}\nopt: 9\n",
            "malformed": "[\n", "a list": "- a\n"}
    merged = {}
    for name, text in runs.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        if text is not None:
            (folder / ".numba_config.yaml").write_text(text)
        done = _merge_in(folder, flags, folder / "out")
        assert done.returncode == 0, done.stderr
        assert "bug" not in done.stderr and "Traceback" not in done.stderr, done.stderr
        if text is not None:
            assert f"{folder / '.numba_config.yaml'} is not read: tiesmerge takes numba's settings from NUMBA_*" \
                in done.stderr, done.stderr
        merged[name] = load_dir(folder / "out")
    assert not elsewhere.exists()
    for name in runs:
        for key, tensor in merged["plain"].items():
            assert merged[name][key].equal(tensor), (name, key)


def test_a_numba_variable_numba_cannot_parse_is_one_line(tmp_path):
    """hp30 N2: NUMBA_OPT=9 or an empty NUMBA_DISABLE_JIT printed numba's RuntimeWarning with a whole traceback."""
    b, ms = write_family_dirs(tmp_path)
    flags = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1])]
    done = _merge_in(tmp_path, flags, tmp_path / "out", {"NUMBA_OPT": "9", "NUMBA_DISABLE_JIT": ""})
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "RuntimeWarning" not in done.stderr, done.stderr
    assert "warning: NUMBA_OPT='9' is not a value numba reads (ValueError: Environment variable `NUMBA_OPT` is set " \
        "to an unsupported value '9'" in done.stderr, done.stderr
    assert "warning: NUMBA_DISABLE_JIT='' is not a value numba reads" in done.stderr, done.stderr


def test_a_matplotlib_settings_file_in_the_working_folder_is_not_read(tmp_path):
    """matplotlib reads ./matplotlibrc first: `text.usetex: True` failed every report as "unexpected RuntimeError ...
    bug" (no latex), and a FIFO of that name blocked the report forever. Now the file is not read, with a warning."""
    b, ms = write_family_dirs(tmp_path)
    flags = ["--base", str(b), "--model", str(ms[0]), "--model", str(ms[1])]
    for name in ("usetex", "fifo"):
        folder = tmp_path / name
        folder.mkdir()
        if name == "fifo":
            os.mkfifo(folder / "matplotlibrc")
        else:
            (folder / "matplotlibrc").write_text("text.usetex: True\ntext.latex.preamble: \\usepackage{nosuch}\n")
        done = _run_in(folder, ["analyze", *flags, "-o", str(folder / "report")], timeout=120)
        assert done.returncode == 0, done.stderr
        assert f"{folder / 'matplotlibrc'} is not read: a settings file in the working folder" in done.stderr
        assert (folder / "report" / "report.html").is_file() and (folder / "report" / "sign_conflicts.png").is_file()


# ---------------------------------------------------------------- adapters, checked against PEFT's own loader

import json  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import tiesmerge  # noqa: E402
from helpers_adapters import random_ia3, random_lora, write_ia3_dir, write_lora_dir  # noqa: E402
from helpers_ckpt import make_base, write_hf_dir  # noqa: E402
from tiesmerge.errors import IncompatibleCheckpointsError  # noqa: E402
from tiesmerge.methods import TaskArithmetic  # noqa: E402


def _randomized(model, kind):
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for name, p in model.named_parameters():
            if kind in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=generator) if kind == "ia3_l"
                        else 0.2 * torch.randn(p.shape, generator=generator))
    return model


def _trained(model):
    """Every trainable tensor of a PEFT model moved (a trained adapter, not a fresh one)."""
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model


def _tiny_gpt2(tmp_path, transformers):
    """A GPT-2 (Conv1D modules) saved as the base, loaded again."""
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=8,
                                                         vocab_size=30)).save_pretrained(tmp_path / "base")
    return transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base")


def _tied_llama(tmp_path, transformers):
    """A Llama whose head is tied to its embedding, saved as the base, loaded again."""
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        vocab_size=40, tie_word_embeddings=True)).save_pretrained(tmp_path / "base")
    return transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")


def _merged_like_peft(tmp_path, model, base_dir, kind, names):
    """The adapter saved by PEFT, merged alone by tiesmerge (task arithmetic, lam 1), against merge_and_unload."""
    _randomized(model, kind).save_pretrained(tmp_path / "adapter")
    reference = model.merge_and_unload().state_dict()
    ours = tiesmerge.merge(base_dir, [tmp_path / "adapter"], TaskArithmetic(lam=1.0))
    checked = [n for n in reference if any(m in n for m in names)]
    assert checked
    for name in checked:
        torch.testing.assert_close(ours[name], reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_ia3_on_a_conv1d_base_matches_peft(tmp_path):
    """C17/C18: GPT-2's Conv1D weights are stored (in, out); PEFT's (IA)³ then scales their columns for outputs and
    rows for inputs. tiesmerge refused c_attn (48 != 16) and scaled the square c_proj on the wrong axis."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = peft.get_peft_model(_tiny_gpt2(tmp_path, transformers),
                                peft.IA3Config(target_modules=["c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
                                               feedforward_modules=["mlp.c_proj"]))
    _merged_like_peft(tmp_path, model, tmp_path / "base", "ia3_l", ("c_attn", "c_proj", "c_fc"))


def test_lora_on_clvps_conv1d_matches_peft(tmp_path):
    """C22: CLVP's decoder MLP (c_fc, c_proj) is a Conv1D too; tiesmerge took it for an nn.Linear (and said so)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ClvpDecoderConfig(vocab_size=30, max_position_embeddings=16, max_text_tokens=8,
                                         hidden_size=16, num_hidden_layers=1, num_attention_heads=2, n_inner=16)
    torch.manual_seed(0)
    transformers.ClvpForCausalLM(cfg).save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(transformers.ClvpForCausalLM.from_pretrained(tmp_path / "base"),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_fc", "c_proj"]))
    _merged_like_peft(tmp_path, model, tmp_path / "base", "lora_B", ("c_fc", "c_proj"))


def _lora(tmp_path, *, config=None, extra=None):
    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    return b, base, write_lora_dir(tmp_path / "lora", random_lora(base, 4, seed=1), alpha=4, config=config,
                                   extra=extra)


def test_a_config_without_target_modules_is_refused(tmp_path):
    """C29/C30: with no target_modules PEFT adapts its table's defaults for the model type (q_proj and v_proj of a
    Llama) and drops the rest; tiesmerge merged every module in the file."""
    b, base, lora = _lora(tmp_path, config={"target_modules": None})
    with pytest.raises(IncompatibleCheckpointsError, match="target_modules is not set, so PEFT adapts its own "
                                                           "default modules for the model type"):
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))
    ia3 = write_ia3_dir(tmp_path / "ia3", random_ia3(base, seed=1))
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "feedforward_modules": None}))
    with pytest.raises(IncompatibleCheckpointsError, match="feedforward_modules is not set, so PEFT takes its own "
                                                           "default for the model type"):
        tiesmerge.merge(b, [ia3], TaskArithmetic(lam=1.0))
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "target_modules": None}))
    with pytest.raises(IncompatibleCheckpointsError, match="target_modules is not set"):
        tiesmerge.merge(b, [ia3], TaskArithmetic(lam=1.0))


def test_a_config_without_r_means_pefts_default_rank(tmp_path):
    """C44: PEFT builds every module with r = 8 when the config has none, and refuses rank-4 factors; tiesmerge took
    the factors' rank (and scaled by alpha / 4)."""
    b, base, lora = _lora(tmp_path)
    config = json.loads((lora / "adapter_config.json").read_text())
    del config["r"]
    (lora / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(IncompatibleCheckpointsError, match=r"r is not set \(PEFT's default r is 8\) but the LoRA "
                                                           r"factors of .* have rank 4"):
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))


def test_whole_tensors_peft_would_drop_are_refused(tmp_path):
    """C39: a plain `<module>.bias` of an adapted module (PEFT keeps it at base_layer.bias); C42: a base_layer tensor of
    a module the adapter does not adapt (PEFT has no base_layer there). PEFT drops both without a word."""
    module = "model.layers.0.self_attn.q_proj"
    for extra, said in (({module + ".bias": torch.ones(8)}, f"is a whole bias of '{module}', which the adapter's LoRA "
                                                             "factors adapt"),
                        ({"model.embed_tokens.base_layer.weight": torch.ones(32, 8)},
                         "is a base_layer tensor of 'model.embed_tokens', which the adapter does not adapt")):
        folder = tmp_path / str(len(said))
        b, base, lora = _lora(folder, extra=extra)
        with pytest.raises(IncompatibleCheckpointsError, match=said.replace(".", r"\.")):
            tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))


def test_a_model_folder_with_a_plus_in_its_name_is_said_as_such(tmp_path, capsys):
    """C47: a recipe's `model: plus+dir`, a local folder, was said to apply "a LoRA to a model other than base_model"
    (neither `plus` nor `dir` exists), under a hint listing the supported methods."""
    from helpers_ckpt import copy_model_dir, run_cli

    b, ms = write_family_dirs(tmp_path)
    plus = copy_model_dir(ms[1], tmp_path / "plus+dir")
    recipe = tmp_path / "mk.yaml"
    recipe.write_text(f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {ms[0]}\n"
                      f"    parameters: {{weight: 1.0}}\n  - model: {plus}\n    parameters: {{weight: 1.0}}\n")
    rc, _, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "mk")], capsys)
    assert rc != 0 and f"'{plus}' is a folder here, but mergekit (and tiesmerge) read a '+' in a model as " \
        "MODEL+LORA" in err, err
    assert "a model other than base_model" not in err and "hint: fix each problem named above" in err, err


def test_a_config_that_adapts_none_of_the_files_modules_says_so(tmp_path):
    """C62: target_modules "q_proj" as a string is a regex the whole path must match: PEFT adapts none of the file's
    modules, and the message said PEFT "would load the adapter without them"."""
    b, base, lora = _lora(tmp_path, config={"target_modules": "q_proj"})
    with pytest.raises(IncompatibleCheckpointsError, match="PEFT adapts none of them"):
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))
    b, base, lora = _lora(tmp_path / "some", config={"target_modules": ["q_proj"]})
    with pytest.raises(IncompatibleCheckpointsError, match="PEFT would load the adapter without them"):
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))


@pytest.mark.parametrize("ensure", [False, True])
def test_a_saved_embedding_of_a_tied_base(tmp_path, ensure):
    """C68: modules_to_save ["embed_tokens"] on a base that ties its head: PEFT runs the new embedding with the old head
    (ensure_weight_tying off, its default); the merged model's head became the new embedding. Now refused. C69: with
    ensure_weight_tying PEFT saves equal copies of both and keeps them tied; that was refused as "an adapter on a tied
    head". Now merged, = PEFT's merge_and_unload."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                             **({"ensure_weight_tying": True} if ensure else {}))
    model = _trained(peft.get_peft_model(_tied_llama(tmp_path, transformers), config))
    model.save_pretrained(tmp_path / "adapter")
    if not ensure:
        with pytest.raises(IncompatibleCheckpointsError, match="PEFT runs the new embedding with the base's old head"):
            tiesmerge.merge(tmp_path / "base", [tmp_path / "adapter"], TaskArithmetic(lam=1.0))
        return
    reference = model.merge_and_unload().state_dict()
    ours = tiesmerge.merge(tmp_path / "base", [tmp_path / "adapter"], TaskArithmetic(lam=1.0))
    torch.testing.assert_close(ours["model.embed_tokens.weight"], reference["model.embed_tokens.weight"])
    torch.testing.assert_close(ours["model.embed_tokens.weight"], reference["lm_head.weight"])  # tied, as PEFT's
    assert "lm_head.weight" not in ours  # the tied output stores it once, as the base


def test_peft_s_own_seq_cls_adapter_with_trained_biases_merges_as_peft(tmp_path):
    """C77: PEFT's save_pretrained of a SEQ_CLS LoRA with bias "all" writes classifier.bias and
    classifier.modules_to_save.bias (equal) and classifier.original_module.bias; tiesmerge refused the file as holding
    the module twice, with a hint to save it again with PEFT, which wrote exactly this."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  vocab_size=40, num_labels=3)
    torch.manual_seed(1)
    transformers.BertForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(transformers.BertForSequenceClassification.from_pretrained(tmp_path / "base"),
                                peft.LoraConfig(r=2, target_modules=["query", "value"], bias="all",
                                                task_type="SEQ_CLS"))
    _trained(model).save_pretrained(tmp_path / "adapter")
    reference = model.merge_and_unload().state_dict()
    ours = tiesmerge.merge(tmp_path / "base", [tmp_path / "adapter"], TaskArithmetic(lam=1.0))
    assert set(ours) <= set(reference)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_conv1d_layout_taken_from_the_config_is_said(tmp_path):
    """C21: given as a lone file, a GPT-2 base has no model_type, and the adapter's fan_in_fan_out decides the layout
    of c_proj (square: it fits either way) without a word."""
    import warnings as pywarnings

    from tiesmerge.errors import MergeWarning

    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = peft.get_peft_model(_tiny_gpt2(tmp_path, transformers),
                                peft.LoraConfig(r=2, lora_alpha=4, target_modules=["attn.c_proj"]))
    _randomized(model, "lora_B").save_pretrained(tmp_path / "adapter")
    for base, said in ((tmp_path / "base", False), (tmp_path / "base" / "model.safetensors", True)):
        with pywarnings.catch_warnings(record=True) as caught:
            pywarnings.simplefilter("always")
            tiesmerge.merge(base, [tmp_path / "adapter"], TaskArithmetic(lam=1.0))
        messages = [str(w.message) for w in caught if issubclass(w.category, MergeWarning)]
        assert any("is taken from the adapter's fan_in_fan_out (true)" in m for m in messages) == said, messages


@pytest.mark.parametrize("pattern", [r".*\.(q_proj|[[:alpha:]]_proj)", r".*[[:digit:]].*q_proj",
                                     r".*\.(?:q_pro){e<=1}j", r".*\.(?:k_pro){e<=1}j|.*\.up_proj",
                                     r".*\.(q|k){1,2}_proj"])
def test_adapter_selectors_read_as_pythons_re(pattern):
    """C81: PEFT matches target_modules with re, where [[:alpha:]] is a set of '[', ':', 'a', ... then a literal ']'
    and {e<=1} is literal text; the regex package (on which adapter selectors run) reads a POSIX class and fuzzy
    matching there: tiesmerge adapted k_proj where PEFT does not. And re's "Possible nested set" FutureWarning
    reached the terminal."""
    import re
    import warnings as pywarnings

    from tiesmerge.io.peft_targets import Targeting

    modules = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                    "self_attn.qq_proj", "mlp.up_proj", "x.q_projj")]
    with pywarnings.catch_warnings():
        pywarnings.simplefilter("error")  # no warning of re's reaches the user
        targeting = Targeting.of({"target_modules": pattern}, "cfg")
        ours = [targeting.why_not(m) is None for m in modules]
    with pywarnings.catch_warnings():
        pywarnings.simplefilter("ignore", FutureWarning)
        assert ours == [re.fullmatch(pattern, m) is not None for m in modules]


def test_a_lora_on_a_tied_embedding_with_ensure_weight_tying_runs_as_peft(tmp_path):
    """C79: with ensure_weight_tying PEFT adapts lm_head with the embedding's factors (transposed) and saves them,
    though target_modules names only the embedding; tiesmerge refused them as not targeted. Now the head's twin
    factors are the embedding's change, held once by the tied output, and the merged model's logits are the running
    adapter's. (PEFT 0.21's own merge_and_unload adds that change twice to the shared matrix: 4.9 off in the logits.)"""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = _trained(peft.get_peft_model(_tied_llama(tmp_path, transformers),
                                         peft.LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"],
                                                         ensure_weight_tying=True)))
    model.save_pretrained(tmp_path / "adapter")
    tiesmerge.merge(tmp_path / "base", [tmp_path / "adapter"], TaskArithmetic(lam=1.0), output=tmp_path / "out")
    running = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"),
                                             tmp_path / "adapter").eval()
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    tokens = torch.tensor([[1, 5, 9, 30, 2, 39]])
    with torch.no_grad():
        torch.testing.assert_close(merged(tokens).logits, running(tokens).logits, atol=1e-5, rtol=1e-5)


def test_validate_reports_every_input_problem(tmp_path, capsys):
    """C74: validate promises every problem at once; the inputs' checks stopped at the first (a missing folder hid an
    adapter of another model and a model of other shapes; a bad density hid all of them)."""
    from helpers_ckpt import run_cli

    b, ms = write_family_dirs(tmp_path)
    other = write_hf_dir(tmp_path / "other", {"x.weight": torch.ones(3, 3)})
    stray = write_lora_dir(tmp_path / "stray", {"zz.q_proj": (torch.ones(2, 8), torch.ones(8, 2))}, alpha=4)
    for extra, first in (("", "no such file or directory"), ("parameters: {density: 2}\n", "density must be")):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {stray}, {other}, {tmp_path / 'missing'}]\n"
                          + extra)
        rc, out, err = run_cli(["validate", str(recipe)], capsys)
        assert rc != 0 and "Traceback" not in err, err
        assert first in err and "targets module 'zz.q_proj'" in err and "model 2 (" in err, err
        assert ("4 problems" if extra else "3 problems") in err, err


def test_a_tensor_in_two_shards_with_other_values_is_refused(tmp_path):
    """C84: the index puts lm_head.weight in shard 1, shard 2 stores another copy; transformers loads every tensor of
    every shard (the last read wins), tiesmerge merged the index's copy. Equal copies stay one tensor."""
    from safetensors.torch import save_file

    from tiesmerge.errors import CheckpointError

    base = make_base()
    for kind in ("equal", "other"):
        folder = tmp_path / kind
        folder.mkdir()
        names = sorted(base)
        first, second = names[: len(names) // 2], names[len(names) // 2:]
        head = "lm_head.weight"
        assert head in first or head in second
        owner, stray = (first, second) if head in first else (second, first)
        stray_copy = base[head] if kind == "equal" else base[head] + 5
        save_file({n: base[n].contiguous() for n in first} | ({} if head in first else {head: stray_copy}),
                  str(folder / "model-00001-of-00002.safetensors"))
        save_file({n: base[n].contiguous() for n in second} | ({} if head in second else {head: stray_copy}),
                  str(folder / "model-00002-of-00002.safetensors"))
        index = {n: "model-00001-of-00002.safetensors" if n in first else "model-00002-of-00002.safetensors"
                 for n in names}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
        if kind == "equal":
            checkpoint = tiesmerge.open_checkpoint(folder)
            assert sorted(checkpoint.names()) == names
            checkpoint.close()
        else:
            with pytest.raises(CheckpointError, match="tensor 'lm_head.weight' is stored in two shards with different "
                                                      "values"):
                tiesmerge.open_checkpoint(folder)


@pytest.mark.parametrize("tied", [True, False])
def test_a_saved_shared_embedding_of_an_encoder_decoder_is_refused(tmp_path, tied):
    """C103: T5 with modules_to_save ["shared"]: PEFT replaces only the `shared` attribute, its encoder and decoder keep
    the old embedding (and the head where tied), while the merged model tied all of them to the new one."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
                                num_heads=2, decoder_start_token_id=0, tie_word_embeddings=tied)
    torch.manual_seed(11)
    transformers.T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "base"),
                                peft.LoraConfig(r=2, target_modules=["q"], modules_to_save=["shared"]))
    _randomized(model, "modules_to_save").save_pretrained(tmp_path / "adapter")
    with pytest.raises(IncompatibleCheckpointsError, match="PEFT replaces only the 'shared' attribute"):
        tiesmerge.merge(tmp_path / "base", [tmp_path / "adapter"], TaskArithmetic(lam=1.0))


def test_a_lower_case_peft_type_is_refused(tmp_path):
    """C93: PEFT's PeftType values are upper case; `peft_type: "lora"` was merged, and PEFT cannot load it."""
    from tiesmerge.errors import CheckpointError

    b, base, lora = _lora(tmp_path, config={"peft_type": "lora"})
    with pytest.raises(CheckpointError, match="peft_type is 'lora'; PEFT reads 'LORA' only"):
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))


# ---------------------------------------------------------------- the thirty-second pass

def _encoder_decoder(tmp_path, transformers):
    """A BERT encoder with a GPT-2 decoder (cross-attention: c_attn, q_attn, c_proj, all Conv1D)."""
    encoder = transformers.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=40)
    decoder = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=8, vocab_size=40, is_decoder=True,
                                      add_cross_attention=True)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    torch.manual_seed(0)
    transformers.EncoderDecoderModel(config=config).save_pretrained(tmp_path / "base")
    return transformers.EncoderDecoderModel.from_pretrained(tmp_path / "base")


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_a_conv1d_decoder_nested_in_an_encoder_decoder_matches_peft(tmp_path, kind):
    """hp32 C02/C03/C12: an EncoderDecoderModel's model_type is "encoder-decoder"; its GPT-2 decoder's Conv1D modules
    were taken for nn.Linear (LoRA's ΔW transposed, (IA)³ on the wrong axis), with a false warning."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    model = _encoder_decoder(tmp_path, transformers)
    targets = ["attn.c_proj", "crossattention.q_attn", "crossattention.c_attn", "mlp.c_fc"]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets) if kind == "lora" else \
        peft.IA3Config(target_modules=targets, feedforward_modules=["mlp.c_fc"])
    _merged_like_peft(tmp_path, peft.get_peft_model(model, config), tmp_path / "base",
                      "lora_B" if kind == "lora" else "ia3_l", ("c_proj", "q_attn", "c_attn", "c_fc"))


def test_an_empty_trainable_token_list_is_refused(tmp_path):
    """hp32 C22: trainable_token_indices [] makes PEFT wrap the embedding and fail to load the adapter (no delta);
    tiesmerge merged it. {} wraps nothing and merges."""
    from tiesmerge.errors import CheckpointError

    b, base, lora = _lora(tmp_path, config={"trainable_token_indices": []})
    with pytest.raises(CheckpointError, match=r"trainable_token_indices \[\]"):
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))
    b, base, lora = _lora(tmp_path / "dict", config={"trainable_token_indices": {}})
    tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))


def test_ia3_ignores_the_layer_fields_peft_ignores(tmp_path):
    """hp32 C54: IA3Config has no layers_to_transform / layers_pattern (PEFT warns and loads every vector); tiesmerge
    applied them and refused the other layers' vectors."""
    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    ia3 = write_ia3_dir(tmp_path / "ia3", random_ia3(base, seed=1))
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "layers_to_transform": [1],
                                                         "layers_pattern": "layers"}))
    tiesmerge.merge(b, [ia3], TaskArithmetic(lam=1.0))


def test_an_adapter_module_path_with_a_control_character_is_refused(tmp_path):
    """hp32 C79: a module named `blk.q\\n`: PEFT's `(.*\\.)?(q)$` matches before the final newline (re's $), tiesmerge's
    \\Z did not, and another alpha was used. Such paths are refused."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.peft_targets import check_adapted

    with pytest.raises(CheckpointError, match="holds a control character"):
        check_adapted({"target_modules": ["q"]}, ["blk.q\n"], "cfg")
    check_adapted({"target_modules": ["q"]}, ["blk.q"], "cfg")


def test_ia3_feedforward_modules_outside_target_modules_is_refused(tmp_path):
    """hp32 C66: IA3Config refuses feedforward_modules that are not a subset of target_modules; tiesmerge merged."""
    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    ia3 = write_ia3_dir(tmp_path / "ia3", random_ia3(base, seed=1))
    config = json.loads((ia3 / "adapter_config.json").read_text())
    (ia3 / "adapter_config.json").write_text(json.dumps({**config, "feedforward_modules": ["down_proj"]}))
    with pytest.raises(IncompatibleCheckpointsError, match="feedforward_modules names 'down_proj', which "
                                                           "target_modules does not"):
        tiesmerge.merge(b, [ia3], TaskArithmetic(lam=1.0))


def test_validate_lists_input_problems_beside_value_errors(tmp_path, capsys, monkeypatch):
    """hp32 C60: beside a recipe's value errors (tiesmerge's or a mergekit recipe's), a model listed twice and a
    missing one showed only once the values were fixed."""
    from helpers_ckpt import run_cli

    b, ms = write_family_dirs(tmp_path)
    monkeypatch.chdir(tmp_path)  # mergekit resolves its paths against the working folder
    recipes = {"ours.yaml": f"method: ties\nbase: {b}\nmodels: [{ms[0]}, {ms[0]}, {tmp_path / 'nope'}]\n"
                            "parameters: {density: 1.5}\n",
               "mk.yaml": f"merge_method: linear\nbase_model: {b}\nmodels:\n"
                          + "".join(f"  - model: {m}\n    parameters: {{weight: 1}}\n"
                                    for m in (ms[0], ms[0], tmp_path / "nope"))
                          + "parameters: {normalize: 7}\n"}
    for name, text in recipes.items():
        (tmp_path / name).write_text(text)
        rc, _, err = run_cli(["validate", str(tmp_path / name)], capsys)
        # mk.yaml: also its base_model, which the models do not list and no weight is given for (hp37b M05)
        assert rc != 0 and ("4 problems" if name == "mk.yaml" else "3 problems") in err, err
        assert "no such file or directory" in err and "model 1 is listed twice (also model 0)" in err, err


def test_a_lora_on_a_convolution_is_refused_as_such(tmp_path):
    """hp32 C68: PEFT's LoRA on a Conv2d (4-D factors) was refused as factors of the wrong shapes, with a hint about
    the command's options."""
    from tiesmerge.errors import CheckpointError

    module = "model.layers.0.self_attn.q_proj"
    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    lora = write_lora_dir(tmp_path / "lora", {module: (torch.ones(2, 8, 1, 1), torch.ones(8, 2, 1, 1))}, alpha=4)
    with pytest.raises(CheckpointError, match="adapts a convolution"):
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))


def test_an_adapter_named_by_transformers_5s_loaded_names_is_said(tmp_path):
    """hp32 C04/C05: Llava's files keep `language_model.model.layers...`, transformers 5 loads the modules as
    `model.language_model.layers...`, and an adapter trained there names those: the refusal's hint said it was
    trained on another base model. It now names the base tensor that ends as the module does."""
    base = {"language_model.model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8),
            "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight": torch.randn(8, 8)}
    b = write_hf_dir(tmp_path / "base", base)
    module = "model.language_model.layers.0.self_attn.q_proj"
    lora = write_lora_dir(tmp_path / "lora", {module: (torch.ones(2, 8), torch.ones(8, 2))}, alpha=4)
    with pytest.raises(IncompatibleCheckpointsError, match="it stores 'language_model.model.layers.0.self_attn.q_proj"
                                                           ".weight', which ends as that module does") as caught:
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))
    assert "transformers 5 loads some models under module names other than their files'" in str(caught.value)


def test_all_linear_leaves_out_an_output_head_of_any_name(tmp_path):
    """hp32 C87: all-linear leaves out the model's output embedding (PEFT finds it by identity); tiesmerge knew it by
    a few names (lm_head, embed_out) and merged factors for BERT's cls.predictions.decoder, which PEFT drops."""
    query = "bert.encoder.layer.0.attention.self.query"
    base = {"bert.embeddings.word_embeddings.weight": torch.randn(40, 16), query + ".weight": torch.randn(16, 16),
            "cls.predictions.decoder.weight": torch.randn(40, 16)}
    b = write_hf_dir(tmp_path / "base", base)
    factors = {query: (torch.ones(2, 16), torch.ones(16, 2)), "cls.predictions.decoder": (torch.ones(2, 16),
                                                                                           torch.ones(40, 2))}
    lora = write_lora_dir(tmp_path / "lora", factors, alpha=4, config={"target_modules": "all-linear"})
    with pytest.raises(IncompatibleCheckpointsError, match="'cls.predictions.decoder' \\(40, 16\\) has the shape of "
                                                           "the input embedding"):
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))
    del factors["cls.predictions.decoder"]
    lora = write_lora_dir(tmp_path / "lora2", factors, alpha=4, config={"target_modules": "all-linear"})
    tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))


def test_a_temporary_folder_inside_an_input_is_refused(tmp_path):
    """hp32 C94: TMPDIR set to the base's folder: the run made (and removed) its private torch folder inside the
    input, which a kill would have left there."""
    b, ms = write_family_dirs(tmp_path)
    done = _run_in(tmp_path, ["merge", "--base", str(b), "--model", str(ms[0]), "--model", str(ms[1]), "-o",
                              str(tmp_path / "out")], {"TMPDIR": str(b)})
    assert done.returncode != 0 and "(TMPDIR) lies inside the base" in done.stderr, done.stderr
    assert sorted(p.name for p in b.iterdir() if p.name.startswith("tiesmerge-")) == []
    assert not (tmp_path / "out").exists()


def test_factors_under_pefts_default_adapter_name_merge_as_peft_loads_them(tmp_path):
    """hp32 C102: PEFT 0.21 loads factors keyed `...lora_A.default.weight` (a PeftModel's state_dict() saved as is) as
    the adapter's own; tiesmerge refused them as a state dict. The merge equals the plain file's."""
    from safetensors.torch import load_file, save_file

    b, base, lora = _lora(tmp_path)
    plain = tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))
    weights = load_file(str(lora / "adapter_model.safetensors"))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in weights.items()},
              str(lora / "adapter_model.safetensors"))
    named = tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))
    for key, tensor in plain.items():
        assert named[key].equal(tensor), key


def test_a_lora_on_an_alias_of_a_shared_embedding_is_said_as_such(tmp_path):
    """hp32 C113: BART's encoder and decoder embed_tokens are tied to model.shared, the one tensor its file stores; a
    LoRA on embed_tokens was refused as "trained on another base model"."""
    base = {"model.shared.weight": torch.randn(40, 16), "model.encoder.layers.0.fc1.weight": torch.randn(32, 16)}
    b = write_hf_dir(tmp_path / "base", base)
    lora = write_lora_dir(tmp_path / "lora", {"model.encoder.embed_tokens": (torch.ones(2, 40), torch.ones(16, 2))},
                          alpha=4, config={"target_modules": ["embed_tokens"]})
    import safetensors.torch as st_torch

    weights = st_torch.load_file(str(lora / "adapter_model.safetensors"))  # an embedding's factors are named so
    st_torch.save_file({k.replace("lora_A.weight", "lora_embedding_A").replace("lora_B.weight", "lora_embedding_B"): v
                        for k, v in weights.items()}, str(lora / "adapter_model.safetensors"))
    with pytest.raises(IncompatibleCheckpointsError, match="stores as its shared embedding 'model.shared.weight'"):
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))


@pytest.mark.parametrize("config, said", [
    ({"rank_pattern": []}, "rank_pattern is a list, not a mapping"),
    ({"alpha_pattern": 0}, "alpha_pattern is a int, not a mapping"),
    ({"modules_to_save": "lm_head"}, "modules_to_save is 'lm_head', not a list of module names"),
    ({"layers_pattern": "layers"}, "layers_pattern is set without layers_to_transform"),
])
def test_config_fields_peft_cannot_load_are_refused(tmp_path, config, said):
    """hp32 C145, C146, C153: a falsy non-mapping rank_pattern / alpha_pattern was read as none, modules_to_save as a
    string as none, layers_pattern without layers_to_transform as no layer restriction; PEFT loads none of them."""
    from tiesmerge.errors import CheckpointError

    b, base, lora = _lora(tmp_path, config=config)
    with pytest.raises(CheckpointError, match=re.escape(said)):
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))


def test_an_ia3_adapter_on_a_tied_head_is_said_as_such(tmp_path):
    """hp32 C140: PEFT saves lm_head.base_layer.weight beside (IA)³ on a tied head; the refusal said modules_to_save
    are not supported (the config has none)."""
    from safetensors.torch import load_file, save_file

    from tiesmerge.errors import CheckpointError

    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    ia3 = write_ia3_dir(tmp_path / "ia3", random_ia3(base, seed=1))
    weights = load_file(str(ia3 / "adapter_model.safetensors"))
    weights["base_model.model.lm_head.base_layer.weight"] = base["lm_head.weight"]
    save_file(weights, str(ia3 / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="the base weight PEFT saves beside an adapter on a tied layer"):
        tiesmerge.merge(b, [ia3], TaskArithmetic(lam=1.0))


def test_a_saved_embedding_of_a_resized_vocabulary_is_said_as_such(tmp_path):
    """hp32 C143: an adapter saving embed_tokens with two added rows was refused as a shape mismatch under the generic
    hint (after --vocab-policy union's refusal had suggested truncate)."""
    module = "model.embed_tokens"
    base = make_base()
    b = write_hf_dir(tmp_path / "base", base)
    grown = torch.cat([base[module + ".weight"], torch.randn(2, 8)])
    lora = write_lora_dir(tmp_path / "lora", random_lora(base, 2, seed=1), alpha=4,
                          extra={module + ".weight": grown}, config={"modules_to_save": ["embed_tokens"]})
    with pytest.raises(IncompatibleCheckpointsError,
                       match="trained with a resized vocabulary \\(34 rows, the base 32\\)"):
        tiesmerge.merge(b, [lora], TaskArithmetic(lam=1.0))


def test_consensus_with_k_0_says_it_is_task_arithmetic(tmp_path):
    """hp33 C76: consensus --k 0 keeps every entry (no mask), a task arithmetic; it ran without a word."""
    import warnings as pywarnings

    from tiesmerge.errors import MergeWarning

    b, ms = write_family_dirs(tmp_path)
    with pywarnings.catch_warnings(record=True) as caught:
        pywarnings.simplefilter("always")
        tiesmerge.merge(b, ms, "consensus", k=0)
    assert any("k = 0 keeps every entry" in str(w.message) for w in caught if issubclass(w.category, MergeWarning))


def test_a_write_error_names_the_output_not_its_temporary_folder(tmp_path):
    """hp33 C38: under a file-size limit the error named `.tiesmerge-tmp-…/model.safetensors`, a file that is gone."""
    import resource

    from safetensors.torch import save_file

    for name in ("b", "f1", "f2"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.randn(512, 512)}, str(tmp_path / name / "model.safetensors"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(tiesmerge.__file__)), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "tiesmerge", "merge", "--allow-distant", "--base", "b", "--model",
                           "f1", "--model", "f2", "-o", "out"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)))
    assert done.returncode != 0 and f"{tmp_path / 'out' / 'model.safetensors'}: cannot write it" in done.stderr, \
        done.stderr
    assert ".tiesmerge-tmp" not in done.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["b", "f1", "f2"]


def test_a_link_where_the_demo_writes_a_merged_model_is_refused(tmp_path, capsys):
    """hp33 C59: a rerun of the demo replaced a symlink planted at merged-average with its own folder, silently."""
    from helpers_ckpt import run_cli

    work, mine = tmp_path / "work", tmp_path / "mine"
    argv = ["demo", "--synthetic", "--params", "0.01", "--workdir", str(work)]
    rc, _, err = run_cli(argv, capsys)
    assert rc == 0, err
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    merged = next(p for p in work.iterdir() if p.name.startswith("merged-"))
    import shutil

    shutil.rmtree(merged)
    merged.symlink_to(mine)
    rc, _, err = run_cli(argv, capsys)
    assert rc != 0 and "a link (to" in err and "where the demo writes its merged" in err, err
    assert merged.is_symlink() and (mine / "keep.txt").read_text() == "mine"


def test_a_file_of_an_earlier_output_is_said_as_such(tmp_path):
    """hp33 C53: a --json / --checkpoint path naming a file inside an earlier output directory was refused as "a file
    tiesmerge did not write" (tiesmerge wrote it, as part of that output)."""
    from tiesmerge.errors import OutputError
    from tiesmerge.paths import check_output_file

    b, ms = write_family_dirs(tmp_path)
    tiesmerge.merge(b, ms, "ties", output=tmp_path / "out")
    with pytest.raises(OutputError, match="would replace a file of the tiesmerge output"):
        check_output_file(tmp_path / "out" / "tiesmerge.json", True, [], "--json")


def test_a_small_file_is_read_without_reserving_its_bound(tmp_path):
    """hp33 C103: read_regular read f.read(max_bytes + 1): every stats run reserved 4 GiB of address space for a data
    file of 66 bytes, and failed as "unexpected MemoryError" under ulimit -v."""
    import resource

    small = tmp_path / "data.jsonl"
    small.write_text('{"text": "a"}\n')
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30)); "
            "from tiesmerge.paths import read_regular; "
            f"print(len(read_regular({str(small)!r}, 'data', max_bytes=8 << 30)))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(tiesmerge.__file__)), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "14", done.stderr[-2000:]
    assert resource.RLIMIT_AS  # the limit exists on this platform


def test_a_config_claiming_more_labels_than_any_weight_is_refused(tmp_path):
    """hp33 C99/C105: num_labels = 1e8 beside a 2-class head: transformers built a 1e8-entry id2label (5.5 GB, then
    "unexpected MemoryError ... a bug")."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation import loading

    folder = write_hf_dir(tmp_path / "m", make_base())
    with pytest.raises(CheckpointError, match="num_labels = 100,000,000, more than any dimension of the weights"):
        loading._check_sizes(folder, folder / "config.json", {"num_labels": 10**8})
    loading._check_sizes(folder, folder / "config.json", {"num_labels": 2})


def test_running_out_of_memory_is_no_bug(monkeypatch, capsys):
    """hp33 C99: a MemoryError (an input sizing a library's table) was reported as "a bug in tiesmerge"."""
    from helpers_ckpt import run_cli
    from tiesmerge.cli import commands

    def exhausted(args):
        raise MemoryError()

    monkeypatch.setitem(commands.HANDLERS, "validate", exhausted)
    rc, _, err = run_cli(["validate", "x.yaml"], capsys)
    assert rc != 0 and "error: ran out of memory" in err and "a bug in tiesmerge" not in err, err


def test_validate_lists_a_model_given_twice_beside_a_missing_base(tmp_path, capsys):
    """hp33 C110: with the base missing, a model listed twice showed only once the base existed."""
    from helpers_ckpt import run_cli

    _, ms = write_family_dirs(tmp_path)
    (tmp_path / "r.yaml").write_text(f"method: ties\nbase: {tmp_path / 'nobase'}\nmodels: [{ms[0]}, {ms[0]}]\n"
                                     "parameters: {density: 2}\n")
    err = run_cli(["validate", str(tmp_path / "r.yaml")], capsys)[2]
    assert "3 problems" in err and "model 1 is listed twice" in err and "nobase" in err, err


def test_the_launcher_imports_nothing_slow_before_its_ctrl_c_guard(tmp_path):
    """hp33 C154: a Ctrl-C 20 ms after `python -m tiesmerge` started printed a traceback from typing's import (re,
    enum) in _launch, before entry()'s guard; __main__ now guards its import too."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(os.path.dirname(tiesmerge.__file__)), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", "import sys; import tiesmerge._launch; "
                           "print(sorted(m for m in ('typing', 're', 'enum') if m in sys.modules))"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


@pytest.mark.parametrize("config, said", [({"vocab_size": 10**8}, "vocab_size = 100,000,000, a width no tensor"),
                                          ({"max_position_embeddings": 10**9}, "max_position_embeddings = "
                                                                                "1,000,000,000, more positions")])
def test_a_config_sizing_tables_past_its_weights_is_refused(tmp_path, config, said):
    """hp33's next area: config fields transformers sizes tables by (vocab_size, max_position_embeddings) are held to
    the weights (vocab_size) or to a bound (positions) before the config reaches transformers."""
    from tiesmerge.errors import CheckpointError
    from tiesmerge.evaluation import loading

    folder = write_hf_dir(tmp_path / "m", make_base())
    with pytest.raises(CheckpointError, match=re.escape(said)):
        loading._check_sizes(folder, folder / "config.json", config)
    loading._check_sizes(folder, folder / "config.json", {"vocab_size": 32, "max_position_embeddings": 131072})


def test_a_lookaround_selector_on_a_non_ascii_path_is_refused_not_run_unbounded(tmp_path):
    """Review of hp32 C23's fix: on a non-ASCII path a lookaround selector with \\w ran on re itself, which has no time
    limit (`(?=.*q)(\\w+)+x` backtracks without end); it is a typed error now, at once."""
    import time

    from tiesmerge.errors import CheckpointError
    from tiesmerge.io.peft_targets import check_adapted

    started = time.perf_counter()
    with pytest.raises(CheckpointError, match="holds non-ASCII characters"):
        check_adapted({"target_modules": r"(?=.*q)(\w+)+x"}, ["blk." + "é" * 40 + "q"], "cfg")
    assert time.perf_counter() - started < 10
