"""`tiesmerge stats fisher|gram` on a tiny BERT classifier, then `tiesmerge merge --stats`."""

from __future__ import annotations

import copy
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # the tests never download
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from helpers_ckpt import assert_no_output  # noqa: E402
from tiesmerge.cli.main import main  # noqa: E402
from tiesmerge.stats import load_stats  # noqa: E402

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film", "plot", "very", "not"]
TEXTS = [("good film", 0), ("bad plot", 1), ("very good plot", 0), ("not good", 1), ("very bad film", 2)]


def _save_tokenizer(directory) -> None:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
    fast.save_pretrained(directory)


@pytest.fixture(scope="module")
def classifiers(tmp_path_factory):
    """(root, base dir, fine-tune dirs, data file): a 3-class BERT and two perturbed copies."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(WORDS), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=3)
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
        _save_tokenizer(root / f"m{k}")
        dirs.append(root / f"m{k}")
    data = root / "data.jsonl"
    data.write_text("\n".join(json.dumps({"text": t, "label": y}) for t, y in TEXTS) + "\n")
    return root, dirs[0], dirs[1:], data


def test_stats_then_merge_with_fisher_and_regmean(classifiers, tmp_path, capsys):
    root, base, fts, data = classifiers
    for kind in ("fisher", "gram"):
        for k, ft in enumerate(fts):
            assert main(["stats", kind, "--model", str(ft), "--data", str(data), "--batch-size", "2",
                         "-o", str(tmp_path / f"{kind}{k}")]) == 0
            assert f"wrote {kind} statistics" in capsys.readouterr().out
    fisher = load_stats(tmp_path / "fisher0")
    assert fisher.manifest.examples == len(TEXTS) and fisher.manifest.options["kind"] == "exact"
    assert fisher.manifest.model_digest.startswith("files:")
    assert "classifier.weight" in fisher.tensors and (fisher.tensors["classifier.weight"] > 0).all()
    gram = load_stats(tmp_path / "gram0")
    assert gram.tensors["bert.encoder.layer.0.intermediate.dense.weight"].shape == (16, 16)
    assert gram.tensors["classifier.weight"].shape == (16, 16)  # the head on the pooled vector
    for method, kind, extra in (("fisher", "fisher", ["--normalize", "rms"]), ("regmean", "gram", ["--alpha", "0.9"])):
        out = tmp_path / f"out-{method}"
        argv = ["merge", "--method", method, "--base", str(base), *extra, "-o", str(out)]
        for k, ft in enumerate(fts):
            argv += ["--model", str(ft), "--stats", str(tmp_path / f"{kind}{k}")]
        assert main(argv) == 0, capsys.readouterr().err
        manifest = json.loads((out / "tiesmerge.json").read_text())
        assert manifest["method"]["name"] == method and len(manifest["statistics"]) == 2
        merged = transformers.AutoModelForSequenceClassification.from_pretrained(out)
        assert merged(input_ids=torch.tensor([[4, 6]])).logits.shape == (1, 3)


def test_recipe_with_per_model_statistics(classifiers, tmp_path, capsys):
    root, base, fts, data = classifiers
    for k, ft in enumerate(fts):
        assert main(["stats", "gram", "--model", str(ft), "--data", str(data), "-o", str(tmp_path / f"g{k}")]) == 0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"method: regmean\nbase: {base}\nmodels:\n"
                      + "".join(f"  - {{path: {ft}, stats: g{k}}}\n" for k, ft in enumerate(fts)))
    assert main(["validate", str(recipe)]) == 0
    assert main(["merge", str(recipe), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()
    recipe.write_text(f"method: regmean\nbase: {base}\nmodels: [{fts[0]}, {fts[1]}]\nstats: [g0]\n")
    assert main(["validate", str(recipe)]) == 2
    assert "'stats' lists 1 directories for 2 models" in capsys.readouterr().err


def test_stats_errors(classifiers, tmp_path, capsys):
    root, base, fts, data = classifiers
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "good film"}\n{"label": 1}\n')
    assert main(["stats", "fisher", "--model", str(fts[0]), "--data", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "bad.jsonl:2: each line must be an object with a string 'text'" in capsys.readouterr().err
    unlabelled = tmp_path / "unlabelled.jsonl"
    unlabelled.write_text('{"text": "good film"}\n')
    assert main(["stats", "fisher", "--fisher", "empirical", "--model", str(fts[0]), "--data", str(unlabelled),
                 "-o", str(tmp_path / "o")]) == 2
    assert "needs an integer 'label'" in capsys.readouterr().err
    assert_no_output(tmp_path / "o")
    # merging without statistics
    assert main(["merge", "--method", "fisher", "--base", str(base), "--model", str(fts[0]), "--model", str(fts[1]),
                 "-o", str(tmp_path / "m")]) == 2
    assert "needs fisher statistics" in capsys.readouterr().err
    assert_no_output(tmp_path / "m")


def test_methods_lists_the_data_aware_methods(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "fisher" in out and "regmean" in out and "--alpha" in out and "--normalize" in out
