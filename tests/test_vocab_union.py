"""--vocab-policy union: models that added tokens merge into one model whose tokenizer holds the
union; base rows merge as usual, new rows are the mean of the models that have the token."""

from __future__ import annotations

import json

import pytest
import torch

import tiesmerge
from helpers_ckpt import cli_flags, load_dir, run_cli
from tiesmerge.errors import ConfigError, IncompatibleCheckpointsError
from tiesmerge.io.vocab import read_vocab, union_of

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

WORDS = ["<pad>", "<unk>", "<s>", "</s>", *"the cat sat on a mat dog ran far away bird sang song tree".split()]
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _tokenizer():
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<s>", eos_token="</s>")


def _model(rows: int, tied: bool, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config)


def _fine_tune(model, seed: int, scale: float = 0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def _store_head(directory):
    """Store the tied head under its own name too (as some exporters do): the alias path."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(directory / "model.safetensors"))
    state[HEAD] = state[EMBED].clone()
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _family(tmp_path, *, tied=False, pad_to=None, added=(("<|im_start|>", "<|im_end|>"), ("<tool>", "<|im_start|>")),
            chat_template=None, multiple=None):
    """A base and fine-tunes that each added special tokens (resizing the embedding like
    transformers users do, or filling the base's padding rows when ``pad_to`` leaves room)."""
    base_tok = _tokenizer()
    base = _model(pad_to or len(base_tok), bool(tied))
    base.save_pretrained(tmp_path / "base")
    if tied == "stored":
        _store_head(tmp_path / "base")
    base_tok.save_pretrained(tmp_path / "base")
    paths = []
    for k, tokens in enumerate(added):
        tok = _tokenizer()
        tok.add_special_tokens({"additional_special_tokens": list(tokens)})
        if chat_template and k == 0:
            tok.chat_template = chat_template
        model = _model(pad_to or len(base_tok), bool(tied))
        model.load_state_dict(base.state_dict())
        if len(tok) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tok), mean_resizing=False, pad_to_multiple_of=multiple)
        _fine_tune(model, seed=10 + k)
        model.save_pretrained(tmp_path / f"ft{k}")
        if tied == "stored":
            _store_head(tmp_path / f"ft{k}")
        tok.save_pretrained(tmp_path / f"ft{k}")
        paths.append(tmp_path / f"ft{k}")
    return tmp_path / "base", paths


@pytest.mark.parametrize("tied", [False, True, "stored"])
def test_union_merges_base_rows_as_usual_and_new_rows_as_the_mean(tmp_path, tied):
    base, fts = _family(tmp_path, tied=tied)
    out = tiesmerge.merge(base, fts, "ties", output=tmp_path / "out", vocab_policy="union")
    got = load_dir(out)
    a, b = load_dir(fts[0]), load_dir(fts[1])
    vb = len(WORDS)
    assert got[EMBED].shape == (vb + 3, 16)
    # base rows: bit for bit the truncate merge (which keeps the base's rows of every model)
    trunc = load_dir(tiesmerge.merge(base, fts, "ties", output=tmp_path / "trunc", vocab_policy="truncate"))
    assert torch.equal(got[EMBED][:vb], trunc[EMBED])
    for name in trunc:
        if name not in (EMBED, HEAD):
            assert torch.equal(got[name], trunc[name]), name
    # new tokens, in the models' order: <|im_start|> (both), <|im_end|> (model 0), <tool> (model 1)
    assert torch.allclose(got[EMBED][vb], (a[EMBED][vb] + b[EMBED][vb + 1]) / 2)
    assert torch.equal(got[EMBED][vb + 1], a[EMBED][vb + 1])
    assert torch.equal(got[EMBED][vb + 2], b[EMBED][vb])
    if tied == "stored":  # merged once, written under both names
        assert torch.equal(got[HEAD], got[EMBED])
        assert man_tied(out) == [[EMBED, HEAD]]
    elif tied:
        assert HEAD not in got
    else:
        assert got[HEAD].shape == (vb + 3, 16)
        assert torch.equal(got[HEAD][vb + 2], b[HEAD][vb])
        assert torch.equal(got[HEAD][:vb], trunc[HEAD])
    # the tokenizer and the config follow; the model loads and runs
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == vb + 3
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<tool>"]) == [vb, vb + 1, vb + 2]
    assert tok("<tool> the cat")["input_ids"][0] == vb + 2
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == vb + 3
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.isfinite(model(torch.tensor([[vb + 2, 4, 5]])).logits).all()
    man = json.loads((out / "tiesmerge.json").read_text())
    vocab = man["alignment"]["vocabulary"]
    assert vocab["tokens"] == vb + 3 and vocab["base_tokens"] == vb
    assert vocab["id_maps"][1]["moved"] == [[vb, vb + 2], [vb + 1, vb]]
    assert vocab["id_maps"][0]["moved"] == []
    assert [t["content"] for t in vocab["new_tokens"]] == ["<|im_start|>", "<|im_end|>", "<tool>"]
    assert "tokenizer.json" in vocab["files_written"]


def man_tied(out):
    return json.loads((out / "tiesmerge.json").read_text())["alignment"]["tied"]


def test_union_in_memory_and_with_an_output_dtype(tmp_path):
    base, fts = _family(tmp_path)
    state = tiesmerge.merge(base, fts, "task_arithmetic", vocab_policy="union", lam=0.5)
    assert state[EMBED].shape == (len(WORDS) + 3, 16)
    out = tiesmerge.merge(base, fts, "task_arithmetic", output=tmp_path / "bf", vocab_policy="union", lam=0.5,
                          dtype="bfloat16")
    got = load_dir(out)
    assert got[EMBED].dtype == torch.bfloat16
    assert torch.equal(got[EMBED], state[EMBED].to(torch.bfloat16))


def test_union_fills_a_padded_vocabulary_and_keeps_the_padding_rows(tmp_path):
    vb = len(WORDS)
    base, fts = _family(tmp_path, pad_to=vb + 6)  # rows for 6 more tokens: no resize needed
    out = tiesmerge.merge(base, fts, "ties", output=tmp_path / "out", vocab_policy="union")
    got, b0, b1, bb = load_dir(out), load_dir(fts[0]), load_dir(fts[1]), load_dir(base)
    assert got[EMBED].shape == (vb + 6, 16)  # the base's padded size is kept
    assert torch.equal(got[EMBED][vb + 2], b1[EMBED][vb])  # <tool> moved from model 1's id vb
    assert torch.allclose(got[EMBED][vb], (b0[EMBED][vb] + b1[EMBED][vb + 1]) / 2)
    assert torch.equal(got[EMBED][vb + 3:], bb[EMBED][vb + 3:])  # padding: the base's rows
    assert json.loads((out / "config.json").read_text())["vocab_size"] == vb + 6


def test_union_ignores_the_rows_a_model_padded_its_embedding_with(tmp_path):
    vb = len(WORDS)
    base, fts = _family(tmp_path, multiple=8)  # each model: 20 tokens in 24 rows
    assert load_dir(fts[0])[EMBED].shape[0] == 24
    out = tiesmerge.merge(base, fts, "ties", output=tmp_path / "out", vocab_policy="union")
    got, b1 = load_dir(out), load_dir(fts[1])
    assert got[EMBED].shape == (vb + 3, 16)  # the union's tokens; the models' padding is not carried
    assert torch.equal(got[EMBED][vb + 2], b1[EMBED][vb])


def test_union_takes_a_models_chat_template_when_the_base_has_none(tmp_path):
    base, fts = _family(tmp_path, chat_template="{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")
    out = tiesmerge.merge(base, fts, "ties", output=tmp_path / "out", vocab_policy="union")
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert json.loads((out / "tiesmerge.json").read_text())["alignment"]["vocabulary"]["chat_template_from"] == \
        str(fts[0])


def test_a_token_id_that_means_two_strings_is_an_error_naming_both(tmp_path):
    base, fts = _family(tmp_path)
    for name in ("tokenizer.json",):  # model 1 swaps "cat" for "cow" at id 5
        path = fts[1] / name
        path.write_text(path.read_text().replace('"cat"', '"cow"'))
    with pytest.raises(IncompatibleCheckpointsError) as info:
        tiesmerge.plan_merge(base, fts, "ties", vocab_policy="union")
    text = str(info.value)
    assert "token id 5" in text and "'cow'" in text and "'cat'" in text
    assert "model 1" in text and str(fts[1]) in text and "model 0" in text and str(fts[0]) in text


def test_a_grown_model_vocabulary_and_adapters_are_refused(tmp_path):
    base, fts = _family(tmp_path)
    path = fts[0] / "tokenizer.json"
    data = json.loads(path.read_text())
    data["model"]["vocab"]["newword"] = len(WORDS) + 5
    path.write_text(json.dumps(data))
    with pytest.raises(IncompatibleCheckpointsError, match="grew its tokenizer's own vocabulary"):
        tiesmerge.plan_merge(base, fts, "ties", vocab_policy="union")
    with pytest.raises(ConfigError, match="is a merge policy"):
        tiesmerge.analyze(base, fts, vocab_policy="union")


def test_union_without_a_tokenizer_names_the_model(tmp_path):
    base, fts = _family(tmp_path)
    for f in fts[1].glob("tokenizer*"):
        f.unlink()
    (fts[1] / "special_tokens_map.json").unlink(missing_ok=True)
    with pytest.raises(tiesmerge.errors.CheckpointError, match="has no tokenizer"):
        tiesmerge.plan_merge(base, fts, "ties", vocab_policy="union")



def test_a_base_that_added_tokens_a_model_lacks_is_said_to_be_a_fine_tune(tmp_path):
    """hp69a c24: a base-less mergekit recipe merges onto its first model; where that one added tokens the others
    lack, union said only "every model must keep the base's tokens": the base is a fine-tune, and base_model fixes
    it (the order of the models did, by chance)."""
    base, fts = _family(tmp_path)
    with pytest.raises(IncompatibleCheckpointsError, match="is missing from model 0's tokenizer") as caught:
        tiesmerge.plan_merge(fts[0], [base], "ties", vocab_policy="union")
    assert "the base looks like a fine-tune" in caught.value.hint and "base_model:" in caught.value.hint

def test_a_recipes_vocab_policy_is_named_as_its_key(tmp_path, capsys):
    """hp68a c64: a recipe's vocab_policy: union was worded as the flag ("--vocab-policy union needs every model's
    tokenizer"), never given; the flag over the recipe is named as the flag."""
    base, fts = _family(tmp_path)
    for f in fts[1].glob("tokenizer*"):
        f.unlink()
    (fts[1] / "special_tokens_map.json").unlink(missing_ok=True)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: ties\nbase: {base}\nmodels: [{fts[0]}, {fts[1]}]\nvocab_policy: union\n")
    rc, _, err = run_cli(["merge", str(recipe), "-o", str(tmp_path / "out")], capsys)
    assert rc != 0 and "vocab_policy: union needs every model's tokenizer" in err and "--vocab-policy" not in err, err
    recipe.write_text(f"method: ties\nbase: {base}\nmodels: [{fts[0]}, {fts[1]}]\nvocab_policy: truncate\n")
    rc, _, err = run_cli(["merge", str(recipe), "--vocab-policy", "union", "-o", str(tmp_path / "out")], capsys)
    assert rc != 0 and "--vocab-policy union needs every model's tokenizer" in err, err


def test_union_of_the_tokenizers_as_data(tmp_path):
    base, fts = _family(tmp_path)
    u = union_of(read_vocab(base, "base"), [read_vocab(f, str(f)) for f in fts])
    assert u.size == len(WORDS) + 3
    assert [(t.content, t.sources) for t in u.new] == [
        ("<|im_start|>", ((0, len(WORDS)), (1, len(WORDS) + 1))), ("<|im_end|>", ((0, len(WORDS) + 1),)),
        ("<tool>", ((1, len(WORDS)),))]
    assert all(t.entry["special"] for t in u.new)


def test_a_token_added_with_other_options_is_warned_of(tmp_path):
    """hp64a c07: a chat token special in one model and plain in another took the first model's entry silently (a
    special token is neither split nor decoded as a plain one). The first's is kept and the difference said; the
    same token with the same options (the family above) is not."""
    import warnings

    from tiesmerge.errors import MergeWarning

    base, fts = _family(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        union_of(read_vocab(base, "base"), [read_vocab(f, str(f)) for f in fts])
    tok = _tokenizer()
    tok.add_tokens(["<tool>", "<|im_start|>"])  # plain added tokens, not special
    tok.save_pretrained(fts[1])
    said = (r"'<\|im_start\|>' has other options in model 1 than in model 0 "
            r"\(.*special True in model 0, False in model 1\)")
    with pytest.warns(MergeWarning, match=said + ": the union keeps model 0's"):
        u = union_of(read_vocab(base, "base"), [read_vocab(f, str(f)) for f in fts])
    assert next(t for t in u.new if t.content == "<|im_start|>").entry["special"]

def test_union_through_the_cli_and_its_error(tmp_path, capsys):
    base, fts = _family(tmp_path)
    code, out, err = run_cli(["merge", *cli_flags(base, fts), "--vocab-policy", "union", "-o", tmp_path / "out"],
                             capsys)
    assert code == 0, err
    assert load_dir(tmp_path / "out")[EMBED].shape[0] == len(WORDS) + 3
    code, out, err = run_cli(["merge", *cli_flags(base, fts), "-o", tmp_path / "out2"], capsys)
    assert code != 0
    assert "union" in err


def test_union_of_slow_tokenizer_files_and_their_output(tmp_path):
    """vocab.txt + added_tokens.json (no tokenizer.json): read, united, written, and loaded."""
    from tiesmerge.io.vocab import write_tokenizer_files

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat"]
    for name, added in (("b", {}), ("a0", {"<x>": 8}), ("a1", {"<y>": 8, "<x>": 9})):
        d = tmp_path / name
        d.mkdir()
        (d / "vocab.txt").write_text("\n".join(words) + "\n")
        (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "BertTokenizer"}))
        if added:
            (d / "added_tokens.json").write_text(json.dumps(added))
    u = union_of(read_vocab(tmp_path / "b", "b"), [read_vocab(tmp_path / n, n) for n in ("a0", "a1")])
    assert [(t.id, t.content, t.sources) for t in u.new] == [(8, "<x>", ((0, 8), (1, 9))), (9, "<y>", ((1, 8),))]
    out = tmp_path / "out"
    out.mkdir()
    for f in (tmp_path / "b").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    written, _ = write_tokenizer_files(u, out, 10)
    assert set(written) == {"tokenizer_config.json", "added_tokens.json"}
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert len(tok) == 10 and tok.convert_tokens_to_ids(["<x>", "<y>"]) == [8, 9]


@pytest.mark.parametrize("where, key, value", [("ft1", "tokenizer.json", 5), ("base", "tokenizer.json", 5),
                                               ("base", "tokenizer_config.json", [1, 2]),
                                               ("base", "tokenizer_config.json", "ab"),
                                               ("ft0", "tokenizer_config.json", 5)])
def test_tokenizer_lists_of_the_wrong_type_are_named_before_the_merge(tmp_path, where, key, value):
    """hp21 F3/F4: `"added_tokens": 5` in a tokenizer.json, or a tokenizer_config.json's added_tokens_decoder of the
    wrong type, gave "unexpected TypeError / ValueError ... a bug" (the base's only when the output was written)."""
    base, fts = _family(tmp_path)
    folder = {"base": base, "ft0": fts[0], "ft1": fts[1]}[where]
    data = json.loads((folder / key).read_text())
    data["added_tokens" if key == "tokenizer.json" else "added_tokens_decoder"] = value
    (folder / key).write_text(json.dumps(data))
    field = "added_tokens" if key == "tokenizer.json" else "added_tokens_decoder"
    with pytest.raises(tiesmerge.errors.CheckpointError, match=f"{key}: {field} is"):
        tiesmerge.merge(base, fts, "ties", vocab_policy="union", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["tokenizer_config.json", "special_tokens_map.json"])
def test_a_single_additional_special_token_stays_one_token(tmp_path, key):
    """hp21 F7: the base's `"additional_special_tokens": "<s>"` was written out as ["<", "s", ">", ...]; `5` or `[5]`
    was "unexpected ... a bug"."""
    base, fts = _family(tmp_path)
    path = base / key
    data = json.loads(path.read_text()) if path.exists() else {}
    data["additional_special_tokens"] = "<s>"
    path.write_text(json.dumps(data))
    tiesmerge.merge(base, fts, "ties", vocab_policy="union", output=tmp_path / "out")
    written = json.loads((tmp_path / "out" / key).read_text())["additional_special_tokens"]
    assert written[0] == "<s>" and "<" not in written and "<|im_start|>" in written
    for bad in (5, [5]):
        data["additional_special_tokens"] = bad
        path.write_text(json.dumps(data))
        with pytest.raises(tiesmerge.errors.CheckpointError, match=f"{key}: additional_special_tokens is"):
            tiesmerge.merge(base, fts, "ties", vocab_policy="union", output=tmp_path / "out2")
        assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("bad", [1.5, 10**30])
def test_a_token_id_that_is_no_small_integer_is_named(tmp_path, bad):
    """hp21 N3/N4: a vocabulary id of 1.5 was taken as 1; an added token's id of 10**30 surfaced as a tokenizer of
    10**30 + 1 tokens."""
    base, fts = _family(tmp_path)
    data = json.loads((fts[1] / "tokenizer.json").read_text())
    data["added_tokens"][-1]["id"] = bad
    (fts[1] / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(tiesmerge.errors.CheckpointError, match=r"token id .* is not an integer from 0 to"):
        tiesmerge.plan_merge(base, fts, "ties", vocab_policy="union")


def test_added_rows_past_the_output_dtype_blame_the_models_not_the_base(tmp_path):
    """hp64a c48, c52: a model's added-token row past float16 (1e5), merged with --dtype float16, was "copied from the
    base ... the base checkpoint is damaged"."""
    from safetensors.torch import load_file, save_file

    from tiesmerge.errors import InvalidTensorError

    base, fts = _family(tmp_path)
    state = load_file(str(fts[0] / "model.safetensors"))
    state[HEAD][len(WORDS) + 1] = 1e5  # <|im_end|>, model 0's own token
    save_file(state, str(fts[0] / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidTensorError) as err:
        tiesmerge.merge(base, fts, "ties", output=tmp_path / "out", vocab_policy="union", dtype="float16")
    assert "the tokens the models added" in err.value.message and "damaged" not in err.value.hint
    assert "--dtype bfloat16 or float32" in err.value.hint and not (tmp_path / "out").exists()


def test_a_token_holding_a_lone_surrogate_is_refused_before_the_merge(tmp_path):
    """hp64a c108: a tokenizer.json token "\\ud800" (valid JSON, no UTF-8 text) failed the union's tokenizer write after
    the whole merge, as "unexpected UnicodeEncodeError ... a bug"."""
    from tiesmerge.errors import CheckpointError

    base, fts = _family(tmp_path)
    tj = fts[0] / "tokenizer.json"
    tj.write_text(tj.read_text().replace('"<|im_end|>"', '"\\ud800"'))
    with pytest.raises(CheckpointError, match="holds a lone UTF-16 surrogate"):
        tiesmerge.merge(base, fts, "ties", output=tmp_path / "out", vocab_policy="union")
    assert not (tmp_path / "out").exists()


def test_a_fine_tune_standing_as_the_base_is_named_as_such(tmp_path):
    """hp64a c22, c23, c123: a mergekit recipe without base_model merges onto its first model, whose added tokens
    then disagree with another model's: the hint said "the model was not fine-tuned with the base's tokenizer"."""
    base, fts = _family(tmp_path)
    with pytest.raises(IncompatibleCheckpointsError) as err:
        tiesmerge.merge(fts[0], [fts[1], base], "task_arithmetic", output=tmp_path / "out", vocab_policy="union")
    assert "a token the base itself added" in err.value.hint and "base_model" in err.value.hint


def test_a_reference_that_added_tokens_merges_under_truncate(tmp_path):
    """hp64a c120, c121: --vocab-policy truncate --sign-from <a model that added tokens> (the hint of the union's
    refusal) was refused as "the reference must be fine-tuned from the same base"; without a policy that hint named
    no way out."""
    base, fts = _family(tmp_path)
    from tiesmerge.methods import Ties

    out = tiesmerge.merge(base, fts, Ties(sign_from=str(fts[0])), output=tmp_path / "out", vocab_policy="truncate")
    assert load_dir(out)[EMBED].shape[0] == len(WORDS)
    plain = []
    for k in range(2):  # fine-tunes that kept the base's vocabulary
        model = transformers.LlamaForCausalLM.from_pretrained(base)
        _fine_tune(model, seed=30 + k).save_pretrained(tmp_path / f"plain{k}")
        _tokenizer().save_pretrained(tmp_path / f"plain{k}")
        plain.append(tmp_path / f"plain{k}")
    with pytest.raises(IncompatibleCheckpointsError) as err:
        tiesmerge.merge(base, plain, Ties(sign_from=str(fts[1])), output=tmp_path / "o2")
    assert "--vocab-policy truncate" in err.value.hint
    out = tiesmerge.merge(base, plain, Ties(sign_from=str(fts[1])), output=tmp_path / "o3", vocab_policy="truncate")
    assert load_dir(out)[EMBED].shape[0] == len(WORDS)


@pytest.mark.parametrize("policy", ["error", "truncate"])
def test_models_filling_the_bases_padding_rows_with_other_tokens_are_refused(tmp_path, policy):
    """hp64a c72, c74: a base padded past its tokenizer, two models putting different added tokens in the same padding
    rows: the rows were merged silently (two tokens' embeddings mixed) under the default policy and truncate."""
    base, fts = _family(tmp_path, pad_to=24)
    with pytest.raises(IncompatibleCheckpointsError, match="a row the base's tokenizer leaves unused") as err:
        tiesmerge.merge(base, fts, "ties", output=tmp_path / "out", vocab_policy=policy)
    assert "--vocab-policy union" in err.value.hint
    same, _ = _family(tmp_path / "same", pad_to=24, added=(("<a>",), ("<a>",)))
    tiesmerge.merge(same, _, "ties", output=tmp_path / "ok", vocab_policy=policy)  # the same token there: fine


def test_a_models_tokenizer_behind_a_link_leaving_it_is_refused_not_skipped(tmp_path):
    """hp64a c101, c105: a model's tokenizer.json linked outside its folder (a swapped tokenizer, or a FIFO) was
    skipped by the default policy's tokenizer check, and the model merged silently."""
    import os

    from tiesmerge.errors import CheckpointError

    base, fts = _family(tmp_path, added=((), ()))
    outside = tmp_path / "elsewhere.json"
    (fts[0] / "tokenizer.json").rename(outside)
    os.symlink(outside, fts[0] / "tokenizer.json")
    with pytest.raises(CheckpointError, match="outside"):
        tiesmerge.merge(base, fts, "ties", output=tmp_path / "out")


def test_a_base_whose_tokenizer_outgrows_its_rows_is_named(tmp_path):
    """hp64a c173, c174: a base carrying a fine-tune's tokenizer (more tokens than its rows) merged silently, and under
    union the models were blamed for the tokens the base has no rows for."""
    import shutil

    from tiesmerge.errors import MergeWarning

    base, fts = _family(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (fts[0] / name).exists():
            shutil.copy(fts[0] / name, base / name)
    plain = []
    for k in range(2):
        model = transformers.LlamaForCausalLM.from_pretrained(base)
        _fine_tune(model, seed=40 + k).save_pretrained(tmp_path / f"plain{k}")
        _tokenizer().save_pretrained(tmp_path / f"plain{k}")
        plain.append(tmp_path / f"plain{k}")
    with pytest.warns(MergeWarning, match="the base's tokenizer holds 20 tokens, but its token tables have 18 rows"):
        tiesmerge.merge(base, plain, "ties", output=tmp_path / "out")
    with pytest.raises(IncompatibleCheckpointsError, match="the base's tokenizer holds 20 tokens"):
        tiesmerge.merge(base, fts, "ties", output=tmp_path / "u", vocab_policy="union")


def _baseless(tmp_path, name, method, first, second, tokenizer=None):
    recipe = tmp_path / name
    recipe.write_text(f"merge_method: {method}\nmodels:\n  - model: {first}\n    parameters: {{weight: 0.5}}\n"
                      f"  - model: {second}\n    parameters: {{weight: 0.5}}\n"
                      + (f"tokenizer_source: {tokenizer}\n" if tokenizer else ""))
    return recipe


def test_a_baseless_recipe_of_other_vocabularies_is_said_in_its_terms(tmp_path, capsys):
    """hp69a c24: a base-less mergekit linear (or nuslerp) of a model that added tokens, then one that did not, was
    "shapes differ between the base and model 0" (its models[0] and models[1]), hinting tokenizer_source: union,
    which then failed: "missing from model 0's tokenizer". Now the shapes are named by the recipe's entries, and
    linear under union reads as the base the model whose tokens every other holds (mergekit's union does not depend
    on the order); nuslerp, whose interpolation has an order, is told to swap; models that each lack another's
    tokens are told to give base_model."""
    base, fts = _family(tmp_path)
    out = tmp_path / "out"
    for method in ("linear", "nuslerp"):
        rc, _, err = run_cli(["merge", str(_baseless(tmp_path, f"{method}.yaml", method, fts[0], base)),
                              "-o", str(out)], capsys)
        assert rc != 0 and f"models[0] ({fts[0]}) and models[1] ({base}) differ in shape" in err, err
        assert "tokenizer_source: union" in err and "the base" not in err, err
    rc, _, err = run_cli(["merge", str(_baseless(tmp_path, "l.yaml", "linear", fts[0], base, "union")),
                          "-o", str(out)], capsys)
    assert rc == 0 and f"{base} (models[1]) is read as the base" in err, err
    swapped = tmp_path / "swapped"
    assert run_cli(["merge", str(_baseless(tmp_path, "s.yaml", "linear", base, fts[0], "union")),
                    "-o", str(swapped)], capsys)[0] == 0
    merged, reference = load_dir(out), load_dir(swapped)
    assert merged.keys() == reference.keys()
    for name in merged:  # the same merge up to the order of a float32 sum of two
        torch.testing.assert_close(merged[name], reference[name], rtol=0, atol=1e-6)
    rc, _, err = run_cli(["merge", str(_baseless(tmp_path, "n.yaml", "nuslerp", fts[0], base, "union")),
                          "-o", str(tmp_path / "n")], capsys)
    assert rc != 0 and f"models[1] ({base}) lacks some of models[0]'s tokens: list models[1] first" in err, err
    rc, _, err = run_cli(["merge", str(_baseless(tmp_path, "b.yaml", "linear", fts[1], fts[0], "union")),
                          "-o", str(tmp_path / "b")], capsys)
    assert rc != 0 and "no model's tokens are all held by every other model" in err and "base_model" in err, err
    assert "at the same ids" in err, err  # (hp73a c49: the same tokens at other ids were refused in words of none)


def test_a_baseless_recipes_tokenizer_source_is_checked_against_every_model(tmp_path, capsys):
    """hp72a c02, c03, c39: union over models whose tokenizers cannot be read was said as "no model's tokens are all
    held by every other model" (the merge now names the missing tokenizer); tokenizer_source: base over a model of
    fewer rows than models[0] failed at merge time in the engine's words ("the base", "model 0"); and the shape
    check offered tokenizer_source: base from the first model that differs, while a third had fewer rows."""
    from safetensors.torch import load_file, save_file

    base, fts = _family(tmp_path)
    out = tmp_path / "out"
    rc, _, err = run_cli(["merge", str(_baseless(tmp_path, "b.yaml", "linear", fts[0], base, "base")),
                          "-o", str(out)], capsys)
    assert rc != 0 and f"models[1] ({base}) has " in err, err
    assert "of shape (18, 16) against models[0]'s (20, 16)" in err, err
    assert "a cut cannot give it rows it lacks" in err and "model 0" not in err, err
    small = tmp_path / "small"  # the base with its token tables cut to 16 rows: fewer than every other model's
    small.mkdir()
    state = load_file(str(base / "model.safetensors"))
    save_file({n: (t[:16].clone() if t.shape[0] == 18 else t) for n, t in state.items()},
              str(small / "model.safetensors"), metadata={"format": "pt"})
    (small / "config.json").write_text((base / "config.json").read_text())
    three = tmp_path / "three.yaml"
    three.write_text("merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {p}\n    parameters: {{weight: 1.0}}\n" for p in (base, fts[0], small)))
    rc, _, err = run_cli(["merge", str(three), "-o", str(out)], capsys)
    assert rc != 0 and "differ in shape" in err and "tokenizer_source: union" in err, err
    assert "tokenizer_source: base" not in err, err  # small has fewer rows than models[0]: a cut cannot help
    for folder in (base, fts[0]):  # no tokenizer at all: named as such, not as tokens no model shares
        for f in list(folder.glob("tokenizer*")) + list(folder.glob("special_tokens_map.json")):
            f.unlink()
    rc, _, err = run_cli(["merge", str(_baseless(tmp_path, "u.yaml", "linear", fts[0], base, "union")),
                          "-o", str(out)], capsys)
    assert rc != 0 and "no model's tokens" not in err and "tokenizer" in err, err
