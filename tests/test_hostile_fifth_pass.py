"""Issue 13, the fifth independent hostile pass: one case per finding, checked as the catalogue checks its cases
(exit status, message, no traceback, nothing left, inputs unchanged).

- a model folder whose tokenizer_config.json maps AutoTokenizer to a .py file beside the weights: transformers
  asked "run the custom code? [y/N]" on the terminal and ran the file on "y". tiesmerge never runs a model's code.
- `tiesmerge stats` on a model whose tokenizer has no pad token (Llama, GPT) failed as "a bug in tiesmerge".
"""

from __future__ import annotations

import io
import json
import shutil
import sys

import pytest
import torch

from helpers_ckpt import run_cli
from test_hostile_catalogue import snapshot

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")


def _tiny_llama(folder, *, pad: bool = False):
    """A 2-layer Llama with a word-level tokenizer of 64 words t0..t63 (no pad token unless ``pad``)."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"t{i}": i for i in range(64)}, unk_token="t0"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0", **({"pad_token": "t0"} if pad else {})}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _data(path, rows):
    path.write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    return path


def test_a_tokenizer_that_maps_to_code_in_the_model_folder_is_refused_without_running_it(tmp_path, capsys,
                                                                                         monkeypatch):
    inputs = tmp_path / "inputs"
    m = _tiny_llama(inputs / "m")
    config = json.loads((m / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil.EvilTokenizer", None]},
                  pad_token="t0")
    (m / "tokenizer_config.json").write_text(json.dumps(config))
    ran = tmp_path / "PWNED"
    (m / "evil.py").write_text(f"open({str(ran)!r}, 'w').write('a stranger code ran')\n")
    data = _data(inputs / "d.jsonl", ["t1 t2 t3"] * 4)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # whoever asks gets a yes: nobody may ask
    before = snapshot(inputs)
    rc, out, err = run_cli(["stats", "gram", "--model", str(m), "--data", str(data), "-o", str(tmp_path / "st")],
                           capsys)
    assert rc == 1, err
    assert "never runs a model's own code" in err and "auto_map" in err and "Traceback" not in err, err
    assert "custom code" not in out + err, out + err  # no prompt was printed
    assert not ran.exists()
    assert not (tmp_path / "st").exists()
    assert snapshot(inputs) == before


def test_stats_on_a_tokenizer_without_a_pad_token_runs_one_example_per_batch(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    inputs = tmp_path / "inputs"
    m = _tiny_llama(inputs / "m")
    padded = _tiny_llama(inputs / "padded", pad=True)  # the same weights, a pad token: batches of 8
    data = _data(inputs / "d.jsonl", ["t1 t2 t3", "t4 t5", "t6 t7 t8 t9 t10", "t11"] * 3)
    monkeypatch.chdir(tmp_path)
    before = snapshot(inputs)
    for model, out in ((m, "st"), (padded, "st_padded")):
        rc, _, err = run_cli(["stats", "gram", "--model", str(model), "--data", str(data), "-o", str(tmp_path / out)],
                             capsys)
        assert rc == 0, err
    manifest = (tmp_path / "st" / "tiesmerge_stats.json").read_text()
    one, eight = (load_file(next((tmp_path / o).glob("*.safetensors"))) for o in ("st", "st_padded"))
    assert one.keys() == eight.keys() and one
    for name in one:  # padding is masked out: the same Gram matrices, batched or not
        torch.testing.assert_close(one[name], eight[name], rtol=1e-4, atol=1e-5)
    assert "no pad token" in manifest
    assert "no pad token" not in (tmp_path / "st_padded" / "tiesmerge_stats.json").read_text()
    assert snapshot(inputs) == before
    shutil.rmtree(tmp_path / "st")
